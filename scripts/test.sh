#!/usr/bin/env bash
# Installs what the tests need, then runs them. CPU machines skip the GPU tests (marker "gpu")
# and the slow cases (marker "slow"), with one pytest-xdist worker per CPU (tests/conftest.py
# gives each worker its share of threads); on a GPU machine run: bash scripts/test.sh --gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
if [ "${1:-}" = "--gpu" ]; then
  shift
  exec "$PY" -m pytest -q -ra "$@" tests
fi
PARALLEL=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  # worksteal: an idle worker takes tests queued on the other (the long model tests cluster)
  PARALLEL=(-n auto --dist worksteal)
else
  echo "[test] pytest-xdist is not installed (no package index?): running on one process," \
       "1.7-1.9x slower on 2 CPUs"
fi
exec "$PY" -m pytest -q -ra -m "not slow and not gpu" "${PARALLEL[@]}" "$@" tests
