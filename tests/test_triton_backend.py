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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the interpreter's conversion (a GPU rounds to nearest itself)")
def test_interpreter_rounds_float32_to_bfloat16_as_a_gpu_does():
    """conftest makes Triton's interpreter round float32 to bfloat16 to nearest, ties to even,
    as a GPU and torch do (it rounds toward zero): kernel outputs stored in bfloat16 are then
    the GPU's, and the tests' bfloat16 budgets judge the kernels, not that truncation."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_as(x_ptr, y_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(y_ptr.dtype.element_ty))

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    x[:3] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, float("nan")])  # (ties, NaN)
    y = torch.empty(4096, dtype=torch.bfloat16)
    store_as[(1,)](x, y, N=4096)
    assert torch.equal(y[3:], x[3:].to(torch.bfloat16))
    assert y[:2].tolist() == x[:2].to(torch.bfloat16).tolist() == [1.0, 1.015625]
    assert torch.isnan(y[2])
