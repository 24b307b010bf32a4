#!/usr/bin/env bash
# Installs what patnet-kernels needs on a fresh machine. An installed torch (CUDA or CPU) is kept;
# where none is installed, the CPU wheel torch==2.13.0 is taken (an unpinned "torch" would pull
# several GB of CUDA packages). Then the package itself, editable, without build isolation (so
# that pip never builds against a torch of its own choosing). Usage: bash scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[install] no PyTorch here: installing the CPU wheel torch==2.13.0"
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
if [ "${1:-}" = "test" ] && ! "$PY" -c "import pytest, numpy" >/dev/null 2>&1; then
  echo "[install] installing pytest and numpy"
  "$PY" -m pip install --quiet --disable-pip-version-check "pytest>=7" numpy
fi
# pytest-xdist: scripts/test.sh runs the tests on every CPU (not fatal: one process without it).
if [ "${1:-}" = "test" ] && ! "$PY" -c "import xdist" >/dev/null 2>&1; then
  echo "[install] installing pytest-xdist"
  "$PY" -m pip install --quiet --disable-pip-version-check pytest-xdist \
    || echo "[install] WARNING: could not install pytest-xdist: the tests run on one process"
fi
# matplotlib: the plot of benchmarks/bench_models.py; pytest-benchmark: the kernel benchmarks
# (tests/test_kernel_benchmarks.py).
if [ "${1:-}" = "test" ] && ! "$PY" -c "import matplotlib, pytest_benchmark" >/dev/null 2>&1; then
  echo "[install] installing matplotlib and pytest-benchmark"
  # (not fatal: a machine without a package index, such as the GPU machines, runs without
  # them; the benchmark then writes no plot and the kernel benchmarks skip, saying why)
  "$PY" -m pip install --quiet --disable-pip-version-check matplotlib pytest-benchmark \
    || echo "[install] WARNING: could not install matplotlib/pytest-benchmark: no plots," \
            "and tests/test_kernel_benchmarks.py will be skipped"
fi
# Triton: an installed one is kept (GPU machines bring theirs with their torch); otherwise the
# tests need it to run the kernels under its interpreter. triton itself pulls no torch.
if [ "${1:-}" = "test" ] && ! "$PY" -c "import triton" >/dev/null 2>&1; then
  echo "[install] installing triton==3.9.0 (its interpreter runs the kernels' CPU tests)"
  "$PY" -m pip install --quiet --disable-pip-version-check triton==3.9.0
fi
# ninja: the JIT build of the CUDA backend (and of its CPU emulation, which the tests build with
# the system's g++) needs it.
if [ "${1:-}" = "test" ] && ! command -v ninja >/dev/null 2>&1; then
  echo "[install] installing ninja (the tests JIT-build the CUDA kernels' CPU emulation)"
  "$PY" -m pip install --quiet --disable-pip-version-check ninja
fi
# An editable install without build isolation needs setuptools >= 70.1 (bdist_wheel built in).
if ! "$PY" -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" >/dev/null 2>&1; then
  echo "[install] upgrading setuptools (the editable install needs >= 70.1)"
  "$PY" -m pip install --quiet --disable-pip-version-check "setuptools>=70.1"
fi
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c "import patnet, patnet_kernels; print('[install] patnet-kernels', patnet_kernels.__version__, 'ready')"
