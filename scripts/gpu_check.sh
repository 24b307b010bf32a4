#!/usr/bin/env bash
# One command for a GPU machine (H100/H200): build, test, benchmark, report, inside a time budget.
#
#   bash scripts/gpu_check.sh [options]
#
# Run from a fresh copy of the repository (nothing is installed or downloaded; pytest-xdist and
# pytest-timeout are used where installed). Phases, each with its own deadline inside --budget
# (default 450 s, so the whole run ends inside 8 minutes); a phase that fails or is cut is
# reported and the next one runs:
#
#   1. preflight    versions, GPU, driver, packages -> env.txt; the results folder's name
#   2. CUDA build   JIT build of patnet_kernels' CUDA extension in the background
#                   (_cuda_ext.load(); output -> build.log) while the Triton tests run;
#      precompile   beside it, the benchmarks' Triton kernels (PATNet-T2 and FasterNet-T2 at
#                   batch 256: AMP inference, training ops; fp16 and bf16, both layouts)
#                   compiled into Triton's cache by 2 processes (benchmarks/precompile.py),
#                   stopped when the benchmarks start (with --no-tests: a phase of its own, on
#                   every CPU), so that they time rather than compile
#   3. Triton tests pytest -m "not slow" -k "not cuda", pytest-xdist, highest-value tests first
#                   (benchmarks/gpu_check_plugin.py: the order, what is left out and why),
#                   --timeout per test, --maxfail; every outcome and failure written as it
#                   arrives (tests.jsonl, failures.txt), so a cut run keeps them
#   4. CUDA tests   the same with -k cuda, once the build has succeeded; otherwise only
#                   collected, and counted as not run
#   5. op benches   benchmarks/machine_rates.py (copy, matmul and L2 rates: the roofline's),
#                   then benchmarks/bench_{partial_conv,channel_attention,rpe_attention,
#                   self_mixer,spatial_attention,batch_norm_act,pointwise_mlp,partial_block,
#                   patch_conv,layer_norm_linear}.py at batch 256, fp16 and bf16, fwd and
#                   fwd+bwd (the last four: fwd, inference ops): eager vs
#                   the fused backends, then (time permitting) torch.compile / FlexAttention on
#                   one shape per op; their JSON is rewritten after every case
#   6. models       benchmarks/bench_models.py: PATNet-T2 and FasterNet-T2, eager vs ours,
#                   fp32 NCHW (ours: backend auto) and AMP fp16 channels_last (ours: backend
#                   triton, every fused kernel, the MLP and block ones too; and ours as one
#                   CUDA graph), images/s at batch 256; then, with the time they leave, benchmarks/host_time.py: host ms to
#                   issue one forward at batch 256 (AMP fp16 channels_last, as the AMP run)
#   7. summary      benchmarks/gpu_report.py writes SUMMARY.md (also during the run)
#
# It writes ONE folder, benchmarks/results/<gpu>-<date>/ (e.g. h200-2026-12-05), of 8 files:
# SUMMARY.md, env.txt, log.txt, build.log, tests.jsonl, failures.txt, ops.json, models.json;
# scratch files go to build/gpu_check/. Exit status: 0 everything ran and passed, 1 something
# failed (a test, the build, a benchmark, no GPU), 2 nothing failed but something did not run.
#
# Options:
#   --budget SECONDS  wall time of the whole run (default 450)
#   --quick           a short run: --budget 240, benchmarks in fp16 only
#   --out DIR         also copy the results folder to DIR/<name>/ (default: $OUT when set),
#                     during the run too, so a run killed from outside still leaves a report
#   --results DIR     the results folder (default benchmarks/results/<gpu>-<date>)
#   --commit SHA      the commit to report where there is no git (a copy without .git)
#   --work DIR        scratch folder (default build/gpu_check; its earlier files removed)
#   --workers N       pytest-xdist workers (default: CPUs - 4 while the build runs, CPUs - 2)
#   --test-timeout S  time limit of one test (pytest-timeout; default 120)
#   --maxfail N       stop a test phase after N failures (default 50)
#   --tests "PATHS"   what pytest collects (default: tests)
#   --pytest-args "A" extra pytest arguments (word-split), e.g. "-x"
#   --no-tests        skip phases 3-4      --no-bench   skip phases 5-6
#   --allow-cpu       run without a GPU (how tests/test_gpu_check.py checks the script)
#   --dry-run         print the phases, their time limits and commands; run nothing
#   -h, --help        this text
# Relative paths given to --out, --results and --work are taken from where it is called; --tests
# from the repository root.
#
# On the lent GPU machine (its $OUT comes back):  bash scripts/gpu_check.sh --commit <sha>
set -uo pipefail   # not -e: a phase that fails is recorded, and the next one runs
CALLER_PWD=$(pwd)
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

BUDGET=450; QUICK=0; OUT_DIR=${OUT:-}; RESULTS=""; COMMIT=""; WORKERS=""; TEST_TIMEOUT=120
MAXFAIL=50; TEST_PATHS="tests"; PYTEST_EXTRA=""; RUN_TESTS=1; RUN_BENCH=1; ALLOW_CPU=0; DRY=0
WORK="$REPO/build/gpu_check"
ARGS_TEXT="$*"
need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then echo "gpu_check.sh: $1 needs a value" >&2; exit 2; fi; }
need_int() { case "$2" in ''|*[!0-9]*) echo "gpu_check.sh: $1 needs a whole number, got '$2'" >&2; exit 2;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --budget) need_value "$@"; need_int "$1" "$2"; BUDGET=$2; shift ;;
    --quick) QUICK=1 ;;
    --out) need_value "$@"; OUT_DIR=$2; shift ;;
    --results) need_value "$@"; RESULTS=$2; shift ;;
    --commit) need_value "$@"; COMMIT=$2; shift ;;
    --work) need_value "$@"; WORK=$2; shift ;;
    --workers) need_value "$@"; need_int "$1" "$2"; WORKERS=$2; shift ;;
    --test-timeout) need_value "$@"; need_int "$1" "$2"; TEST_TIMEOUT=$2; shift ;;
    --maxfail) need_value "$@"; need_int "$1" "$2"; MAXFAIL=$2; shift ;;
    --tests) need_value "$@"; TEST_PATHS=$2; shift ;;
    --pytest-args) need_value "$@"; PYTEST_EXTRA=$2; shift ;;
    --no-tests) RUN_TESTS=0 ;;
    --no-bench) RUN_BENCH=0 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ] && [[ " $ARGS_TEXT " != *" --budget "* ]]; then BUDGET=240; fi
absolute() { case "$1" in /*|"") echo "$1" ;; *) echo "$CALLER_PWD/$1" ;; esac; }
OUT_DIR=$(absolute "$OUT_DIR"); RESULTS=$(absolute "$RESULTS"); WORK=$(absolute "$WORK")
if [ "$BUDGET" -lt 60 ]; then echo "gpu_check.sh: --budget must be at least 60 s" >&2; exit 2; fi

# ------------------------------------------------------------------------------ the plan
# Each phase ends at a fixed share of the budget (a phase that ends early leaves its time to
# the next); the last REPORT_S seconds are kept for the summary.
REPORT_S=12
END_TRITON=$(( BUDGET * 42 / 100 ))
END_CUDA=$(( BUDGET * 64 / 100 ))
END_OPS=$(( BUDGET * 86 / 100 ))
END_MODELS=$(( BUDGET - REPORT_S ))
BUILD_LIMIT=$(( BUDGET * 60 / 100 ))
MIN_PHASE=15          # a phase with less time than this left is not started
GRACE=15              # after a phase's SIGINT, seconds until SIGKILL
NCPU=$(nproc 2>/dev/null || echo 4)
if [ -n "$WORKERS" ]; then W_TRITON=$WORKERS; W_CUDA=$WORKERS; else
  W_TRITON=$(( NCPU > 6 ? NCPU - 4 : 2 )); W_CUDA=$(( NCPU > 4 ? NCPU - 2 : 2 )); fi
DTYPES="float16,bfloat16"; [ "$QUICK" = 1 ] && DTYPES="float16"
TIMEOUT=$(command -v timeout || true)

# The Triton interpreter and the CUDA emulation are for CPU machines; here the real kernels run
# (on a CPU, --allow-cpu, tests/conftest.py sets both again for the tests). What was set is
# recorded in env.txt.
export GPU_CHECK_TRITON_INTERPRET=${TRITON_INTERPRET:-} GPU_CHECK_PATNET_CUDA_EMULATE=${PATNET_CUDA_EMULATE:-}
unset TRITON_INTERPRET PATNET_CUDA_EMULATE
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

log() {
  local line; line=$(printf '[gpu_check %4ds] %s' "$SECONDS" "$*")
  echo "$line"
  if [ "$DRY" = 0 ] && [ -n "$RESULTS" ] && [ -d "$RESULTS" ]; then echo "$line" >> "$RESULTS/log.txt"; fi
}
quote() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }
# phase_row NAME KIND RC START SECONDS LIMIT NOTE [CONSOLE]: one line of phases.tsv
phase_row() { [ "$DRY" = 1 ] || printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "${8:-}" >> "$WORK/phases.tsv"; }
left_until() { if [ "$DRY" = 1 ]; then echo "$1"; else echo $(( $1 - SECONDS )); fi; }  # dry run: the deadline

CHILD=""; BUILD_PID=""; PRECOMPILE_PID=""; INTERRUPTED=0
# shellcheck disable=SC2317  # (called by the trap)
on_signal() {
  INTERRUPTED=1
  log "interrupted: stopping the running phase, then writing the summary"
  [ -n "$CHILD" ] && kill -INT "$CHILD" 2>/dev/null
  [ -n "$BUILD_PID" ] && [ -f "$WORK/build.pid" ] && kill -TERM "$(cat "$WORK/build.pid")" 2>/dev/null
  [ -n "$PRECOMPILE_PID" ] && kill -TERM -- "-$PRECOMPILE_PID" 2>/dev/null
}
trap on_signal INT TERM

# log_console HEADING CONSOLE CMD...: a phase's command and output, appended to log.txt
log_console() {
  local heading=$1 console=$2; shift 2
  { echo; echo "===================== $heading ====================="
    echo "\$ $(quote "$@")"
    local size; size=$(wc -c < "$console")
    if [ "$size" -le 3000000 ]; then cat "$console"; else  # keep log.txt small enough to commit
      head -c 1000000 "$console"; echo; echo "... ($(( size - 3000000 )) bytes left out; failures.txt has every failure) ..."
      tail -c 2000000 "$console"; fi; } >> "$RESULTS/log.txt"
}

# run_limited NAME KIND LIMIT CONSOLE WATCH CMD...: CMD with SIGINT at LIMIT seconds (SIGKILL
# GRACE s later), its output to CONSOLE and then to log.txt; records the phase in phases.tsv.
# WATCH is a test phase's name (progress from tests.jsonl) or "-" (the console's last "[" line).
run_limited() {
  local name=$1 kind=$2 limit=$3 console=$4 watch=$5; shift 5
  local start=$SECONDS rc=0 last=$SECONDS
  if [ "$DRY" = 1 ]; then printf '    %-30s by %4ss: %s\n' "$name" "$limit" "$(quote "$@")"; return 0; fi
  if [ "$INTERRUPTED" = 1 ]; then phase_row "$name" "$kind" - "$start" 0 "$limit" "not run: interrupted"; return 0; fi
  if [ "$limit" -lt "$MIN_PHASE" ]; then
    [ "$limit" -lt 0 ] && limit=0
    phase_row "$name" "$kind" - "$start" 0 "$limit" "not run: no time left in the budget"
    log "$name: not run (${limit}s left)"; return 0
  fi
  log "$name: start, limit ${limit}s"
  if [ -n "$TIMEOUT" ]; then
    "$TIMEOUT" -s INT -k "$GRACE" "$limit" "$@" > "$console" 2>&1 &
  else
    "$@" > "$console" 2>&1 &
  fi
  CHILD=$!
  while kill -0 "$CHILD" 2>/dev/null; do
    sleep 1
    if [ $(( SECONDS - last )) -ge 30 ]; then
      last=$SECONDS
      if [ "$watch" != "-" ]; then
        log "  $("$PY" -m benchmarks.gpu_report status --work "$WORK" --results "$RESULTS" --phase "$watch" 2>/dev/null)"
      else
        log "  $(grep -a '^\[' "$console" 2>/dev/null | tail -n 1 | cut -c1-150)"
      fi
    fi
  done
  wait "$CHILD"; rc=$?
  CHILD=""
  [ "$INTERRUPTED" = 1 ] && [ "$rc" = 0 ] && rc=130
  phase_row "$name" "$kind" "$rc" "$start" $(( SECONDS - start )) "$limit" "${NOTE:-}" "${console#"$WORK"/}"
  log_console "$name: exit $rc after $(( SECONDS - start )) s (limit ${limit} s)" "$console" "$@"
  case "$rc" in
    0) log "$name: done in $(( SECONDS - start ))s" ;;
    124|137) log "$name: cut at its time limit after $(( SECONDS - start ))s" ;;
    *) log "$name: exit $rc after $(( SECONDS - start ))s" ;;
  esac
  return 0
}

summary() {  # summary [--partial]: SUMMARY.md and the copy to --out
  [ "$DRY" = 1 ] && return 0
  local out=(); [ -n "$OUT_DIR" ] && out=(--out "$OUT_DIR")
  "$PY" -m benchmarks.gpu_report summary --work "$WORK" --results "$RESULTS" ${out[@]+"${out[@]}"} "$@" \
    >> "$RESULTS/log.txt" 2>&1
  SUMMARY_RC=$?
}

# ------------------------------------------------------------------------------ 1. preflight
if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: budget ${BUDGET}s, ${NCPU} CPUs; nothing is run"
  RESULTS=${RESULTS:-benchmarks/results/<gpu>-<date>}; GPU_SLUG="<gpu>"; CUDA_OK=1; CUDA_TORCH=1
  XDIST=3.8.0; TIMEOUT_PLUGIN=2.5.0; AUTHORS_DATA=1   # as on the GPU machines
  echo "  results: $RESULTS${OUT_DIR:+ (copied to $OUT_DIR/<name>/)}; scratch: build/gpu_check"
  echo "  1. preflight: $PY -m benchmarks.gpu_report env --work build/gpu_check --results $RESULTS"
else
  # (only what this script writes there is removed: --work may name any folder)
  rm -rf "$WORK/console" "$WORK/ops" "$WORK/models" "$WORK/env" "$WORK/phases.tsv" "$WORK/env.json" \
    "$WORK/env.vars" "$WORK/build.rc" "$WORK/build.pid" "$WORK/SUMMARY.md"
  mkdir -p "$WORK/console" "$WORK/ops" "$WORK/models" || exit 1
  WORK=$(cd "$WORK" && pwd)
  echo "[gpu_check    0s] preflight (budget ${BUDGET}s)"
  ENV_ARGS=(--command "scripts/gpu_check.sh $ARGS_TEXT")
  [ -n "$COMMIT" ] && ENV_ARGS+=(--commit "$COMMIT")
  [ "$ALLOW_CPU" = 1 ] && ENV_ARGS+=(--allow-cpu)
  "$PY" -m benchmarks.gpu_report env --work "$WORK" --results "$WORK/env" "${ENV_ARGS[@]}" \
    > "$WORK/env.vars" 2> "$WORK/console/preflight.txt"
  PRE_RC=$?
  GPU_SLUG=unknown; DATE=$(date +%Y-%m-%d); CUDA_OK=0; CUDA_TORCH=0; XDIST=""; TIMEOUT_PLUGIN=""
  NVCC=0; AUTHORS_DATA=0
  while IFS='=' read -r key value; do
    case "$key" in
      GPU_SLUG|DATE|CUDA_OK|CUDA_TORCH|XDIST|TIMEOUT_PLUGIN|NVCC|AUTHORS_DATA) printf -v "$key" '%s' "$value" ;;
    esac
  done < "$WORK/env.vars"
  RESULTS=${RESULTS:-benchmarks/results/${GPU_SLUG}-${DATE}}
  mkdir -p "$RESULTS" || { echo "gpu_check.sh: cannot create $RESULTS" >&2; exit 1; }
  RESULTS=$(cd "$RESULTS" && pwd)
  for f in SUMMARY.md env.txt log.txt build.log tests.jsonl failures.txt ops.json models.json; do
    rm -f "$RESULTS/$f"; done
  [ -f "$WORK/env/env.txt" ] && mv "$WORK/env/env.txt" "$RESULTS/env.txt"
  log "preflight: exit $PRE_RC; results in $RESULTS"
  { echo "===================== preflight: exit $PRE_RC ====================="; cat "$WORK/console/preflight.txt"; } >> "$RESULTS/log.txt"
  phase_row preflight preflight "$PRE_RC" 0 "$SECONDS" - "$( [ "$PRE_RC" = 0 ] || echo 'see log.txt')"
  [ -f "$RESULTS/env.txt" ] && sed -n '1,4p' "$RESULTS/env.txt" | while IFS= read -r line; do log "  $line"; done
  [ "$CUDA_TORCH" = 1 ] || log "  this PyTorch is a CPU build: the CUDA extension cannot be built"
  [ "$NVCC" = 1 ] || log "  no nvcc found (CUDA_HOME, PATH): the CUDA build will fail, saying so"
  [ "$AUTHORS_DATA" = 1 ] || log "  the authors' reference vectors are missing: the tests that read them are left out"
  if [ "$CUDA_OK" != 1 ] && [ "$ALLOW_CPU" != 1 ]; then
    log "no CUDA GPU visible to PyTorch (see env.txt): nothing to check"
    summary; exit 1
  fi
  summary --partial   # from now on a run killed from outside still leaves a SUMMARY.md
fi
export GPU_CHECK_LOG="$RESULTS/tests.jsonl" GPU_CHECK_FAILURES="$RESULTS/failures.txt"
export TORCHINDUCTOR_COMPILE_THREADS=1   # N test workers x a compile pool each would swamp the CPUs

# ------------------------------------------------------------------------------ pytest command
pytest_cmd() {  # pytest_cmd PHASE WORKERS -k EXPR: the test command of one phase
  local phase=$1 workers=$2; shift 2
  PYTEST=("$PY" -m pytest -p benchmarks.gpu_check_plugin -m "not slow" "$@" -q -rfE --no-header)
  if [ -n "$XDIST" ] && [ "$workers" -gt 1 ]; then
    PYTEST+=(-n "$workers")
    local major minor; IFS=. read -r major minor _ <<< "$XDIST"
    # small chunks keep the run order (pytest-xdist >= 3.3)
    if [ "${major:-0}" -gt 3 ] 2>/dev/null || { [ "${major:-0}" = 3 ] && [ "${minor:-0}" -ge 3 ] 2>/dev/null; }; then
      PYTEST+=(--maxschedchunk 4); fi
  fi
  if [ -n "$TIMEOUT_PLUGIN" ]; then PYTEST+=(--timeout "$TEST_TIMEOUT"); fi
  PYTEST+=(--maxfail "$MAXFAIL")
  local words=()
  read -r -a words <<< "$PYTEST_EXTRA $TEST_PATHS"   # split on blanks, no globbing
  PYTEST+=("${words[@]}")
}
test_phase() {  # test_phase PHASE END WORKERS -k EXPR
  local phase=$1 end=$2 workers=$3; shift 3
  local limit; limit=$(left_until "$end")
  pytest_cmd "$phase" "$workers" "$@"
  # the plugin stops starting tests 20 s before the phase's SIGINT, so that running ones end
  GPU_CHECK_PHASE=$phase GPU_CHECK_DEADLINE=$(( $(date +%s) + limit - 20 )) NOTE="" \
    run_limited "$phase tests" tests "$limit" "$WORK/console/$phase-tests.txt" "$phase" "${PYTEST[@]}"
}

# ------------------------------------------------------------------------------ 2. CUDA build
BUILD_STATE=skipped
BUILD_PY='import time, traceback
t = time.time()
try:
    from patnet_kernels import _cuda_ext
    print("patnet_kernels._cuda_ext.load():", _cuda_ext.load(), flush=True)
except BaseException:
    traceback.print_exc()
    print(f"BUILD FAILED after {time.time() - t:.0f} s", flush=True)
    raise SystemExit(1)
print(f"BUILD OK in {time.time() - t:.0f} s", flush=True)'
start_build() {
  if [ "$DRY" = 1 ]; then
    printf '  2. CUDA build, in the background, limit %ss: %s -c <_cuda_ext.load()> > build.log\n' "$BUILD_LIMIT" "$PY"
    BUILD_STATE=ok; return
  fi
  log "CUDA build: start in the background (limit ${BUILD_LIMIT}s)"
  BUILD_START=$SECONDS
  {
    echo "# $(date -Is) JIT build of the CUDA extension: patnet_kernels._cuda_ext.load()"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "CUDA_HOME=${CUDA_HOME:-} ninja=$(command -v ninja || echo missing)"
  } > "$RESULTS/build.log" 2>&1
  local limiter=(); [ -n "$TIMEOUT" ] && limiter=("$TIMEOUT" -k 10 "$BUILD_LIMIT")
  # (the build's own PID, for on_signal; the subshell records its exit status)
  ( ${limiter[@]+"${limiter[@]}"} "$PY" -c "$BUILD_PY" >> "$RESULTS/build.log" 2>&1 &
    echo $! > "$WORK/build.pid"; wait $!; echo $? > "$WORK/build.rc" ) &
  BUILD_PID=$!
  BUILD_STATE=running
}
finish_build() {  # wait for the build; BUILD_STATE=ok|failed
  [ "$DRY" = 1 ] && return
  [ "$BUILD_STATE" = running ] || return
  log "CUDA build: waiting for it to finish"
  wait "$BUILD_PID"; BUILD_PID=""
  local rc; rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
  local how; how=$(grep -a '^patnet_kernels._cuda_ext.load():' "$RESULTS/build.log" | cut -d: -f2- | cut -c1-200)
  phase_row "cuda build" build "$rc" "$BUILD_START" $(( SECONDS - BUILD_START )) "$BUILD_LIMIT" "${how# }"
  if [ "$rc" = 0 ]; then BUILD_STATE=ok; log "CUDA build: ok ($(tail -n 1 "$RESULTS/build.log"))"
  else BUILD_STATE=failed; log "CUDA build: FAILED (exit $rc; see build.log)"; fi
}

# ------------------------------------------------------------------------------ 2. precompile
PRECOMPILE_PRECISIONS=fp16,bf16; [ "$QUICK" = 1 ] && PRECOMPILE_PRECISIONS=fp16
# shellcheck disable=SC2054  # (commas inside arguments)
PRECOMPILE=("$PY" -m benchmarks.precompile --models patnet_t2,fasternet_t2 --batch 256
            --kinds inference,training --precisions "$PRECOMPILE_PRECISIONS"
            --layouts channels_last,nchw)
SETSID=$(command -v setsid || true)
start_precompile() {  # in the background (its own process group), 2 compile processes
  if [ "$DRY" = 1 ]; then
    printf '  2. precompile, in the background until the benchmarks start: %s\n' \
      "$(quote "${PRECOMPILE[@]}" --jobs 2)"
    return
  fi
  log "precompile: start in the background"
  PRECOMPILE_START=$SECONDS
  ${SETSID:+"$SETSID"} "${PRECOMPILE[@]}" --jobs 2 > "$WORK/console/precompile.txt" 2>&1 &
  PRECOMPILE_PID=$!
}
stop_precompile() {  # when the benchmarks start: stop it if it still runs, and record it
  [ "$DRY" = 1 ] && return
  [ -n "$PRECOMPILE_PID" ] || return
  local note="" rc
  if kill -0 "$PRECOMPILE_PID" 2>/dev/null; then  # (exit 143: the report says "stopped")
    note="stopped when the benchmarks started: "
    kill -TERM -- "-$PRECOMPILE_PID" 2>/dev/null || kill -TERM "$PRECOMPILE_PID" 2>/dev/null
  fi
  wait "$PRECOMPILE_PID"; rc=$?
  PRECOMPILE_PID=""
  local last; last=$(grep -a -e '^precompiled' -e '^  \[' "$WORK/console/precompile.txt" | tail -n 1 \
    | sed 's/^ *//' | cut -c1-150)
  phase_row "precompile" precompile "$rc" "$PRECOMPILE_START" $(( SECONDS - PRECOMPILE_START )) - \
    "$last" "console/precompile.txt"
  log_console "precompile: exit $rc after $(( SECONDS - PRECOMPILE_START )) s" \
    "$WORK/console/precompile.txt" "${PRECOMPILE[@]}" --jobs 2
  log "precompile: ${note:-done: }$last"
}

[ "$RUN_TESTS" = 1 ] || [ "$RUN_BENCH" = 1 ] && start_build
[ "$RUN_TESTS" = 1 ] && [ "$RUN_BENCH" = 1 ] && start_precompile
if [ "$RUN_TESTS" = 1 ]; then
  # ---------------------------------------------------------------------------- 3. Triton tests
  [ "$DRY" = 1 ] && echo "  3. Triton tests, until ${END_TRITON}s:"
  test_phase triton "$END_TRITON" "$W_TRITON" -k "not cuda"
  summary --partial
  # ---------------------------------------------------------------------------- 4. CUDA tests
  finish_build
  [ "$DRY" = 1 ] && echo "  4. CUDA tests (once the build succeeded; else only collected, as not run), until ${END_CUDA}s:"
  if [ "$BUILD_STATE" = ok ]; then
    test_phase cuda "$END_CUDA" "$W_CUDA" -k cuda
  else
    pytest_cmd cuda 1 -k cuda --collect-only
    GPU_CHECK_PHASE=cuda NOTE="not run: the CUDA build failed (build.log); collected only" \
      run_limited "cuda tests" tests "$(left_until "$END_CUDA")" "$WORK/console/cuda-tests.txt" - "${PYTEST[@]}"
  fi
  summary --partial
else
  [ "$DRY" = 1 ] && echo "  3-4. tests: skipped (--no-tests)"
  phase_row "tests" tests - "$SECONDS" 0 - "not run: --no-tests"
fi

# ------------------------------------------------------------------------------ 5. op benchmarks
if [ "$RUN_BENCH" = 1 ]; then
  stop_precompile
  if [ "$RUN_TESTS" = 0 ]; then  # (nothing ran beside it: every CPU, before the benchmarks)
    NOTE="" run_limited "precompile" precompile "$(left_until $(( BUDGET * 20 / 100 )))" \
      "$WORK/console/precompile.txt" - "${PRECOMPILE[@]}" --jobs "$NCPU"
  fi
  [ "$DRY" = 1 ] && echo "  5. op benchmarks, until ${END_OPS}s (each family its share; torch.compile on one shape per op with the time left):"
  finish_build
  # Without a working build the cuda providers are left out, and the CUDA toolkit is hidden from
  # the benchmarks (CUDA_HOME unset, nvcc off PATH) so that backend="auto" ("ours" in the model
  # benchmark) does not retry the failed build in every process: it then runs Triton.
  CUDA_P=",cuda"; BENCH_ENV=()
  if [ "$BUILD_STATE" != ok ]; then
    CUDA_P=""
    NO_NVCC_PATH=$(printf '%s\n' "$PATH" | tr ':' '\n' | while IFS= read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)
    BENCH_ENV=(env -u CUDA_HOME -u CUDA_PATH PATH="${NO_NVCC_PATH%:}")
    [ "$DRY" = 1 ] || log "benchmarks: the CUDA build failed, so no cuda provider, and the CUDA toolkit hidden from them"
  fi
  # first the machine's rates (copy, fp16 / bf16 matmul, L2 read; seconds): the traffic
  # model's roofline takes them (python -m benchmarks.traffic --rates .../machine_rates.json)
  RATES_START=$SECONDS; [ "$DRY" = 1 ] && RATES_START=$(( RUN_TESTS == 1 ? END_CUDA : 0 ))
  NOTE="" run_limited "machine rates" rates "$(left_until $(( RATES_START + 25 )))" \
    "$WORK/console/machine-rates.txt" - ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} \
    "$PY" -m benchmarks.machine_rates --json "$WORK/ops/machine_rates.json"
  OPS_START=$SECONDS; [ "$DRY" = 1 ] && OPS_START=$(( RATES_START + 25 ))
  OPS_SPAN=$(( END_OPS - OPS_START ))
  # shellcheck disable=SC2054  # (commas inside arguments)
  OPS_COMMON=(--batches 256 --dtypes "$DTYPES" --modes fwd,fwd+bwd --warmup-ms 10 --rep-ms 40)
  # each family gets a share of 85% of the phase (cumulative deadlines); then torch.compile
  run_family() {  # run_family FAMILY END_SECONDS ARGS...
    local family=$1 end=$2; shift 2
    NOTE="" run_limited "ops $family" ops "$(left_until "$end")" "$WORK/console/ops-$family.txt" - \
      ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m "benchmarks.bench_$family" --json "$WORK/ops/$family.json" "${OPS_COMMON[@]}" "$@"
  }
  FUSED_SPAN=$(( OPS_SPAN * 85 / 100 ))
  run_family partial_conv $(( OPS_START + FUSED_SPAN * 24 / 100 )) \
    --providers "torch,triton${CUDA_P},triton inplace${CUDA_P:+,cuda inplace}"
  run_family channel_attention $(( OPS_START + FUSED_SPAN * 44 / 100 )) --providers "torch,triton${CUDA_P}"
  run_family rpe_attention $(( OPS_START + FUSED_SPAN * 61 / 100 )) --shapes cls --providers "torch,sdpa,triton${CUDA_P}"
  run_family self_mixer $(( OPS_START + FUSED_SPAN * 66 / 100 )) --providers "torch,triton${CUDA_P}"
  run_family spatial_attention $(( OPS_START + FUSED_SPAN * 73 / 100 )) --providers torch,triton
  run_family batch_norm_act $(( OPS_START + FUSED_SPAN * 79 / 100 )) --providers torch,triton
  # the inference-only ops (fwd only): the block's MLP, the whole FasterNet / PAT_ch block, the
  # stem and merging layers, PAT_sf's LayerNorm + qkv projection
  run_family pointwise_mlp $(( OPS_START + FUSED_SPAN * 88 / 100 )) --modes fwd --providers torch,triton
  run_family partial_block $(( OPS_START + FUSED_SPAN * 95 / 100 )) --modes fwd --providers torch,triton
  run_family patch_conv $(( OPS_START + FUSED_SPAN * 98 / 100 )) --modes fwd --providers torch,triton
  run_family layer_norm_linear $(( OPS_START + FUSED_SPAN )) --modes fwd --providers torch,triton
  # torch.compile (FlexAttention for the attention) on one shape per op, fp16, with what is left
  compile_family() {  # compile_family FAMILY SHAPE PROVIDERS [ARGS...]
    local family=$1 shape=$2 providers=$3; shift 3
    NOTE="" run_limited "ops $family compile" ops "$(left_until "$END_OPS")" "$WORK/console/ops-$family-compile.txt" - \
      ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m "benchmarks.bench_$family" --json "$WORK/ops/$family.compile.json" --batches 256 \
      --dtypes float16 --modes fwd,fwd+bwd --warmup-ms 10 --rep-ms 40 --shapes "$shape" --providers "$providers" "$@"
  }
  compile_family channel_attention patnet_t2.s1 "torch,torch.compile,triton${CUDA_P}"
  compile_family partial_conv fasternet_t2.s1 "torch,torch.compile,triton${CUDA_P}"
  compile_family rpe_attention patnet_t2.s4.cls "torch,flex,triton${CUDA_P}"
  compile_family spatial_attention patnet_t2.s1 "torch,torch.compile,triton"
  compile_family partial_block patnet_t2.s1 "torch,torch.compile,triton" --modes fwd
  # channels_last (the layout of AMP inference) for the ops that have one, fp16, with what is
  # left: without it backend="auto" runs the reference on every channels_last call
  channels_last_family() {  # channels_last_family FAMILY PROVIDERS
    local family=$1 providers=$2
    NOTE="" run_limited "ops $family channels_last" ops "$(left_until "$END_OPS")" "$WORK/console/ops-$family-channels_last.txt" - \
      ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m "benchmarks.bench_$family" --json "$WORK/ops/$family.channels_last.json" --batches 256 \
      --dtypes float16 --modes fwd --warmup-ms 10 --rep-ms 40 --layout channels_last --providers "$providers"
  }
  channels_last_family partial_conv "torch,triton${CUDA_P}"
  channels_last_family channel_attention "torch,triton${CUDA_P}"
  channels_last_family partial_block "torch,triton"
  channels_last_family pointwise_mlp "torch,triton"
  channels_last_family patch_conv "torch,triton"
  channels_last_family layer_norm_linear "torch,triton"
  channels_last_family self_mixer "torch,triton${CUDA_P}"
  summary --partial
  # ---------------------------------------------------------------------------- 6. models
  [ "$DRY" = 1 ] && echo "  6. model benchmark, until ${END_MODELS}s:"
  MODELS_START=$SECONDS; [ "$DRY" = 1 ] && MODELS_START=$END_OPS
  MODELS_MID=$(( MODELS_START + (END_MODELS - MODELS_START) * 42 / 100 ))
  MODELS_AMP=$(( MODELS_START + (END_MODELS - MODELS_START) * 80 / 100 ))
  # shellcheck disable=SC2054
  MODEL_ARGS=(--models patnet_t2,fasternet_t2 --providers eager,ours --warmup 10 --runs 50)
  NOTE="" run_limited "models fp32 nchw" models "$(left_until "$MODELS_MID")" "$WORK/console/models-fp32.txt" - \
    ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m benchmarks.bench_models "${MODEL_ARGS[@]}" --precisions fp32 --layouts nchw --out "$WORK/models/fp32"
  NOTE="" run_limited "models amp channels_last" models "$(left_until "$MODELS_AMP")" "$WORK/console/models-amp.txt" - \
    ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m benchmarks.bench_models "${MODEL_ARGS[@]}" --precisions amp --amp-dtype float16 \
    --layouts channels_last --ours-backend triton --providers eager,ours,ours-graph --out "$WORK/models/amp"
  # the host's share: milliseconds to issue one forward's kernels (is the model host-bound?),
  # with the time the model benchmark leaves (kind "host": not run is no incomplete run)
  NOTE="" run_limited "models host time" host "$(left_until "$END_MODELS")" "$WORK/console/models-host.txt" - \
    ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "$PY" -m benchmarks.host_time --models patnet_t2,fasternet_t2 --providers eager,triton \
    --batch 256 --size 224 --amp float16 --layout channels_last --repeat 20 --json "$WORK/models/host_time.json"
else
  [ "$DRY" = 1 ] && echo "  5-6. benchmarks: skipped (--no-bench)"
  phase_row "benchmarks" ops - "$SECONDS" 0 - "not run: --no-bench"
fi

# ------------------------------------------------------------------------------ 7. summary
if [ "$DRY" = 1 ]; then
  echo "  7. summary: $PY -m benchmarks.gpu_report summary --work build/gpu_check --results $RESULTS${OUT_DIR:+ --out $OUT_DIR}"
  exit 0
fi
if [ "$BUILD_STATE" = running ]; then finish_build; fi
log "summary"
summary
case "${SUMMARY_RC:-}" in
  0|1|2) log "$(grep -m1 '^\*\*' "$RESULTS/SUMMARY.md" | tr -d '*' | cut -c1-400)" ;;
  *)  # the report writer itself failed: a SUMMARY.md that says so, with its error
    { echo "# GPU check: the report writer (benchmarks/gpu_report.py) failed"; echo
      echo "Its error, and the end of log.txt:"; echo; echo '```'; tail -n 60 "$RESULTS/log.txt"; echo '```'
      if [ -f "$RESULTS/SUMMARY.md" ]; then echo; echo "The last summary it wrote, during the run:"; echo; cat "$RESULTS/SUMMARY.md"; fi
    } > "$WORK/SUMMARY.md" && mv "$WORK/SUMMARY.md" "$RESULTS/SUMMARY.md"
    if [ -n "$OUT_DIR" ]; then
      mkdir -p "$OUT_DIR/$(basename "$RESULTS")"
      for f in SUMMARY.md env.txt log.txt build.log tests.jsonl failures.txt ops.json models.json; do
        [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT_DIR/$(basename "$RESULTS")/"; done
    fi
    log "the report writer failed (exit ${SUMMARY_RC:-?}): see SUMMARY.md"
    SUMMARY_RC=1 ;;
esac
log "results: $RESULTS ($(find "$RESULTS" -maxdepth 1 -type f | wc -l) files, $(du -sh "$RESULTS" | cut -f1))${OUT_DIR:+, copied to $OUT_DIR/$(basename "$RESULTS")/}"
[ "$INTERRUPTED" = 1 ] && exit 130
exit "${SUMMARY_RC:-1}"
