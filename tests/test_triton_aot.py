"""Every shipped Triton kernel configuration compiles for sm_90 and sm_80 ahead of time.

The interpreter that runs the parity tests on the CPU compiles nothing, so a kernel that the
real compiler rejects, or that needs more shared memory than an H100 / A100 block has, would
pass them. This runs ``python -m patnet_kernels.triton.aot`` in a process without
TRITON_INTERPRET: about a second per kernel and target on this CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "patnet_kernels.triton.aot", "--arch", "90", "80"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert " 0 failed" in report and "FAILED" not in report, report[-6000:]
