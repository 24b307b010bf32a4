#!/usr/bin/env bash
# Installs what the main job needs, then runs it (arguments go to benchmarks/main_job.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
exec "$PY" benchmarks/main_job.py "$@"
