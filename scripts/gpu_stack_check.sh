#!/usr/bin/env bash
# The lent GPU machines' software, on this machine (no GPU needed): what their first run builds
# and compiles, checked before it runs there.
#
#   bash scripts/gpu_stack_check.sh [--tests] [VENV]  (default ~/.cache/patnet_kernels/gpu-stack)
#
#   1. a virtual environment with the GPU image's torch (GPU_MACHINE_TORCH, its CUDA 13.0 build
#      from PyPI, about 5 GB) and Triton (GPU_MACHINE_TRITON), both in
#      patnet_kernels/triton/aot.py; made once, reused after;
#   2. the CUDA extension JIT-built as the GPU machine builds it (_cuda_ext.load(): csrc/ with
#      nvcc for setup.py's targets, sm_80 and sm_90 + PTX, bindings.cpp against that torch,
#      linked), loaded, every op that csrc/bindings.cpp defines found registered with a CUDA
#      kernel, and every bad-input case of tests/test_cuda_backend.py raising its error
#      through the real build's checks (on fake CUDA tensors). What scripts/nvcc_check.py (CI)
#      cannot show: the link, the load and the throws;
#   3. python -m patnet_kernels.triton.aot for their sm_90 under that Triton (as CI's
#      --gpu-triton);
#   4. with --tests: the CPU test suite (pytest -m "not slow and not gpu", Triton under its
#      interpreter, the CUDA kernels through their emulation) under that torch and Triton
#      (tens of minutes), less the ahead-of-time compile test (step 3 is its check here). Triton 3.6's interpreter needs numpy < 2.3 (a newer numpy refuses its
#      int() of a one-element array: "only 0-dimensional arrays can be converted"), so the
#      environment takes numpy < 2.3; the GPU machine's numpy (2.5) never meets it there, where
#      the kernels are compiled.
#
# Needs nvcc (CUDA 13) and ninja. CUDA_HOME: as set, else the toolkit root torch would take,
# else /usr/local/cuda (an nvcc wrapper script in /usr/local/bin misleads torch). The CUDA
# library headers that torch's ATen/cuda includes (cuSPARSE, cuBLAS, ...) are taken from the
# environment's nvidia wheels where the toolkit has only the compiler. Exit status 0: all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=0
if [ "${1:-}" = "--tests" ]; then TESTS=1; shift; fi
VENV=${1:-$HOME/.cache/patnet_kernels/gpu-stack}
PY=${PYTHON:-python3}
read -r TORCH_VERSION TRITON_VERSION ARCH < <(PYTHONPATH=. "$PY" -c "
from benchmarks.gpu_report import gpu_machine_pins
pins = gpu_machine_pins()
print(pins['GPU_MACHINE_TORCH'], pins['GPU_MACHINE_TRITON'], pins['GPU_MACHINE_ARCH'])")
VPY="$VENV/bin/python"
STEPS=$([ "$TESTS" = 1 ] && echo 4 || echo 3)

echo "[1/$STEPS] environment $VENV: torch $TORCH_VERSION (CUDA build), triton $TRITON_VERSION"
if ! "$VPY" -c "import numpy, pytest, torch, triton, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION+') and torch.version.cuda and triton.__version__ == '$TRITON_VERSION' and tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 3)))" 2>/dev/null; then
  "$PY" -m venv --clear "$VENV"
  # (PIP_CONSTRAINT emptied: a machine-wide cap on torch must not swap the version asked for)
  PIP_CONSTRAINT= "$VPY" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.3" ninja pytest
fi
"$VPY" -c "import torch, triton; print('      torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)"

export PATH="$VENV/bin:$PATH"  # (its ninja)
echo "[2/$STEPS] the CUDA extension, JIT-built against that torch for sm_80 and sm_90 (+ PTX)"
(  # (CUDA_HOME, CPATH and the arch list for this step only)
# (the targets setup.py builds, _build.DEFAULT_ARCH_LIST: the JIT build takes the GPU's own,
# and there is none here)
read -r FOUND_HOME TORCH_CUDA_ARCH_LIST < <("$VPY" -c "
import sys; sys.path.insert(0, 'patnet_kernels')
import _build
home = _build.find_cuda_home()
print(home if home and not _build.toolkit_problem(home) else '/usr/local/cuda',
      _build.DEFAULT_ARCH_LIST)")
export CUDA_HOME=${CUDA_HOME:-$FOUND_HOME} TORCH_CUDA_ARCH_LIST
WHEEL_HEADERS=$("$VPY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))" 2>/dev/null || true)
export CPATH="${CPATH:+$CPATH:}$WHEEL_HEADERS"
echo "      CUDA_HOME=$CUDA_HOME (nvcc: $(command -v nvcc || echo none))"
PYTHONPATH=. "$VPY" - <<'PYCODE'
import re, time, torch
from pathlib import Path
from patnet_kernels import _cuda_ext
start = time.perf_counter()
print("      " + _cuda_ext.load(), f"({time.perf_counter() - start:.0f} s)")
defined = re.findall(r'm\.def\("(\w+)\(', Path("csrc/bindings.cpp").read_text())
missing = [n for n in defined if not torch._C._dispatch_has_kernel_for_dispatch_key(
    getattr(torch.ops.patnet_cuda, n).default.name(), "CUDA")]
print(f"      {len(defined) - len(missing)} of the {len(defined)} ops of csrc/bindings.cpp have "
      f"a CUDA kernel" + (f"; missing: {', '.join(missing)}" if missing else ""))
# ... and the autograd kernels that refuse a gradient through them (no silent zero)
missing += [f"{n} (Autograd)" for n in defined if not torch._C._dispatch_has_kernel_for_dispatch_key(
    getattr(torch.ops.patnet_cuda, n).default.name(), "Autograd")]
print("      every op has its not-implemented Autograd kernel" if not missing else
      f"      missing: {', '.join(missing)}")
# Every bad-input case of tests/test_cuda_backend.py (CHECKED) through the real build's checks:
# its arguments as fake CUDA tensors (FakeTensorMode: shape, dtype and strides, no memory, no
# GPU), each op's CUDA kernel called directly. Each must raise its error, which Python catches:
# on the first GPU run such throws killed the process (_build.CXX_FLAGS); a crash ends this
# script here, faulthandler's stack on stderr.
import faulthandler, sys
from torch._subclasses.fake_tensor import FakeTensorMode
faulthandler.enable()
sys.path.insert(0, "tests")
import test_cuda_backend
mode = FakeTensorMode(allow_non_fake_inputs=True)
def on_fake_gpu(arg):
    if not (isinstance(arg, torch.Tensor) and arg.dim() > 0):
        return arg  # (a 0-dim seed stays on the CPU, as the ops take it)
    with mode:
        return torch.empty_strided(arg.size(), arg.stride(), dtype=arg.dtype, device="cuda")
on_cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
wrong = []
for case, (name, make_args, message) in test_cuda_backend.CHECKED.items():
    try:
        getattr(torch.ops.patnet_cuda, name).default.redispatch(
            on_cuda, *[on_fake_gpu(a) for a in make_args()])
        wrong.append(f"{case}: did not raise")
    except RuntimeError as exc:
        if message not in str(exc):
            wrong.append(f"{case}: {str(exc).splitlines()[0][:200]}")
cases = len(test_cuda_backend.CHECKED)
print(f"      {cases - len(wrong)} of the {cases} bad-input cases raised their error"
      + "".join(f"\n      {w}" for w in wrong))
raise SystemExit(1 if missing or not defined or wrong else 0)
PYCODE
)

echo "[3/$STEPS] every Triton kernel compiled for sm_$ARCH (the GPU machines') under triton $TRITON_VERSION"
env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=. \
  "$VPY" -m patnet_kernels.triton.aot --arch "$ARCH" --no-generic | tail -2
if [ "$TESTS" = 1 ]; then
  AOT_TEST=test_triton_aot.py::test_every_kernel_compiles_for_sm90_and_sm80  # (conftest's AOT_CHECK_TEST)
  echo "[4/4] the CPU test suite under torch $TORCH_VERSION and triton $TRITON_VERSION"
  # (not the ahead-of-time compile test: step 3 is that check for this Triton's GPU target;
  # the test's sm_80 pins are CI's Triton's, and under 3.6 sm_80 spills more, unchecked)
  "$VPY" -m pytest -q -ra -m "not slow and not gpu" -p no:cacheprovider \
    -W ignore::DeprecationWarning --deselect "tests/$AOT_TEST" tests
fi
echo "gpu_stack_check: passed"
