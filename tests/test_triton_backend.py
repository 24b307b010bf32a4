"""The Triton backend's availability and its errors: what a user is told, and when."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels.backends import resolve_backend

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_cuda_tensor_without_usable_triton_is_refused():
    with pytest.raises(pk.BackendUnavailableError, match="TRITON_INTERPRET=1 is set"):
        resolve_backend("triton", torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_cpu_tensor_without_interpreter_says_how_to_test():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, patnet_kernels as pk\n"
            "x = torch.randn(1, 8, 4, 4); w = torch.randn(2, 2, 3, 3)\n"
            "try:\n    pk.partial_conv3x3(x, w, backend='triton')\n"
            "except pk.BackendUnavailableError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    assert "refused:" in out and "TRITON_INTERPRET=1" in out, out


def test_auto_never_picks_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert pk.info()["backends"]["triton"]["available"] == (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def test_bad_input_is_refused_before_any_kernel_runs():
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(ValueError, match="weight"):
        pk.partial_conv3x3(x, torch.randn(2, 3, 3, 3), backend="triton")
    with pytest.raises((TypeError, ValueError), match="dtype"):
        pk.partial_conv3x3(x, torch.randn(2, 2, 3, 3, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="channels"):
        pk.partial_conv3x3(x, torch.randn(9, 9, 3, 3), backend="triton")
