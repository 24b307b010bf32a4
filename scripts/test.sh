#!/usr/bin/env bash
# Installs what the tests need, then runs them. CPU machines skip the GPU tests (marker "gpu")
# and the slow cases (marker "slow"); on a GPU machine run: bash scripts/test.sh --gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
if [ "${1:-}" = "--gpu" ]; then
  shift
  exec "$PY" -m pytest -q -ra "$@" tests
fi
exec "$PY" -m pytest -q -ra -m "not slow and not gpu" "$@" tests
