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
# one worker per CPU this process may use, and at most one per 4 GiB of memory (a margin: the
# authors'-vectors model tests and the Inductor-compiled copy peaked at 0.7 GiB in one process)
WORKERS=$("$PY" -c 'import os
memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
print(max(1, min(len(os.sched_getaffinity(0)), int(memory // 4))))')
if [ "$WORKERS" -lt 2 ]; then
  echo "[test] one CPU (or under 8 GiB of memory) for the tests: running on one process"
elif "$PY" -c "import xdist" >/dev/null 2>&1; then
  # worksteal: an idle worker takes tests queued on another (the long model tests cluster)
  PARALLEL=(-n "$WORKERS" --dist worksteal)
else
  echo "[test] pytest-xdist is not installed (no package index?): running on one process," \
       "1.7-1.9x slower on 2 CPUs"
fi
exec "$PY" -m pytest -q -ra -m "not slow and not gpu" "${PARALLEL[@]}" "$@" tests
