"""The pytest plugin of ``scripts/gpu_check.sh``: loaded with ``-p benchmarks.gpu_check_plugin``.

On a GPU machine it

* leaves out the tests that check nothing there (``EXCLUDED``: the CPU machines' build, AOT and
  emulation checks, the benchmark smoke runs; and, where the authors' reference vectors are not
  at hand, the tests that read them, which would fail for that reason alone);
* runs the rest highest value first (``TIERS``): build, bindings and input checks, then op
  parity, then whole models, then torch.compile, then the rest; with pytest-xdist the workers
  take tests in that order, so a run cut by its time limit has run the valuable ones;
* writes, on the process that reports (the xdist controller, or pytest itself without xdist),
  every test's outcome as one JSON line in ``$GPU_CHECK_LOG`` the moment it arrives, and the
  whole report of every failure (traceback, captured output) in ``$GPU_CHECK_FAILURES``, so
  that a run killed at any point keeps what it saw; plus which tests were selected (so that
  those never run are counted as "not run", never as passed), which were left out and why, and
  how the run ended (``benchmarks/gpu_report.py`` reads it all);
* stops starting tests once ``$GPU_CHECK_DEADLINE`` (Unix time) has passed: each process stops
  after the test it is running, and the tests left are "not run".

``$GPU_CHECK_PHASE`` names the run in the records ("triton", "cuda"). Nothing here imports
torch: the plugin is loaded before tests/conftest.py chooses the Triton interpreter on a CPU.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]

# Node-id prefixes never run on the GPU machine, and why.
EXCLUDED: Tuple[Tuple[str, str], ...] = (
    ("tests/test_triton_aot.py",
     "CPU machines' ahead-of-time compile check; here every kernel compiles and runs for real"),
    ("tests/test_cuda_build.py",
     "CPU machines' build-decision, nvcc-check and CPU-emulation tests; here the JIT build of "
     "the extension is the build check"),
    ("tests/test_ddp.py::test_ddp_matches_single_process_emulation",
     "two gloo ranks on the CPU under the Triton interpreter (a CPU check)"),
    ("tests/test_ddp.py::test_ddp_broadcasts_bucket_buffer",
     "two gloo ranks on the CPU under the Triton interpreter (a CPU check)"),
    ("tests/test_main_job.py", "benchmark smoke run; the benchmark phases time for real"),
    ("tests/test_op_benchmarks.py", "benchmark smoke runs; the benchmark phases time for real"),
    ("tests/test_model_benchmarks.py",
     "benchmark smoke runs; the benchmark phases time for real"),
    ("tests/test_kernel_benchmarks.py",
     "pytest-benchmark timings; the op benchmark phase times the ops"),
    ("tests/test_gpu_check.py", "tests of gpu_check.sh itself (CPU)"),
    ("tests/test_triton_backend.py::test_only_grid_axis_0_grows_with_the_batch",
     "launch grids, the same on every machine (kernels not run): a CPU check"),
    ("tests/test_traffic.py", "the CPU traffic model's tests (its models run on CPU tensors)"),
)
# The tests that read the authors' reference vectors (tests/conftest.py's
# authors_reference_dir); without the vectors they fail for that reason alone.
NEEDS_AUTHORS_DATA: Tuple[str, ...] = (
    "tests/test_authors_reference.py",
    "tests/test_fused_models.py::test_fused_model_reproduces_authors_vectors",
    "tests/test_fused_rpe_attention.py::test_authors_bucket_maps",
    "tests/test_reference_ops.py::test_rpe_buckets_match_authors_maps",
)
NO_AUTHORS_DATA = ("the authors' reference vectors are not here (../shared/testdata/"
                   "authors_reference, or set PATNET_AUTHORS_REFERENCE)")

# Run order, most valuable first. A test's tier is the first rule that takes it (see tier_of).
TIERS: Tuple[str, ...] = ("build, bindings and input checks", "op parity", "models",
                          "torch.compile", "rest")
BUILD_FILES = ("tests/test_cuda_backend.py", "tests/test_triton_backend.py",
               "tests/test_functional_errors.py")
OP_FILES = ("tests/test_fused_partial_conv.py", "tests/test_fused_channel_attention.py",
            "tests/test_fused_rpe_attention.py", "tests/test_fused_self_mixer.py",
            "tests/test_fused_spatial_attention.py", "tests/test_fused_batch_norm_act.py",
            "tests/test_cuda_vs_triton.py")
MODEL_FILES = ("tests/test_fused_models.py", "tests/test_fused_amp.py", "tests/test_inference.py",
               "tests/test_sync_batchnorm.py", "tests/test_authors_reference.py",
               "tests/test_ddp.py")
COMPILE_WORDS = ("compile", "opcheck")
INPUT_CHECK_WORDS = ("bad_input", "refuse")


def tier_of(nodeid: str) -> int:
    """Index in TIERS of a test: compile tests (the name says compile or opcheck) wherever they
    are; build, bindings and input checks; op parity; models; the rest."""
    path, _, name = nodeid.partition("::")
    name = name.lower()
    if any(word in name for word in COMPILE_WORDS):
        return 3
    if path in BUILD_FILES or any(word in name for word in INPUT_CHECK_WORDS):
        return 0
    if path in OP_FILES:
        return 1
    if path in MODEL_FILES:
        return 2
    return 4


def authors_data_present() -> bool:
    """Whether tests/conftest.py's authors_reference_dir() finds the vectors."""
    path = Path(os.environ.get("PATNET_AUTHORS_REFERENCE",
                               REPO.parent / "shared" / "testdata" / "authors_reference"))
    return (path / "index.json").is_file()


def exclusion(nodeid: str, authors_data: bool = True) -> Optional[str]:
    """Why ``nodeid`` is left out on the GPU machine, or None if it runs."""
    for prefix, reason in EXCLUDED:
        if nodeid.startswith(prefix):
            return reason
    if not authors_data and nodeid.startswith(NEEDS_AUTHORS_DATA):
        return NO_AUTHORS_DATA
    return None


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

MESSAGE_LINES = 8
MESSAGE_CHARS = 1200
_XDIST_HEADER = re.compile(r"^\[gw\d+\] \w+ -- Python ")  # xdist's "[gw1] linux -- Python 3.12"


def short_message(report) -> str:
    """The first lines of why a test failed or was skipped (what pytest's short summary shows:
    the exception line of the crash, else the report's text)."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = getattr(crash, "message", None) or report.longreprtext or str(longrepr)
    lines = [line for line in text.strip().splitlines()
             if not _XDIST_HEADER.match(line)][:MESSAGE_LINES]
    return "\n".join(lines)[:MESSAGE_CHARS]


def _append(path: Optional[str], text: str) -> None:
    """Append ``text`` in one write (O_APPEND), so a kill loses at most the line being written
    and two processes appending do not interleave within a line."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _record(event: str, **fields) -> None:
    line = {"event": event, "phase": os.environ.get("GPU_CHECK_PHASE", ""),
            "time": round(time.time(), 3)}
    line.update(fields)
    _append(os.environ.get("GPU_CHECK_LOG"), json.dumps(line) + "\n")


def _worker_id(report) -> str:
    node = getattr(report, "node", None)
    gateway = getattr(node, "gateway", None)
    return getattr(gateway, "id", "") or os.environ.get("PYTEST_XDIST_WORKER", "")


FAILURE_CHARS = 20_000              # one failure's report in failures.txt: head and tail kept
FAILURES_FILE_CHARS = 4_000_000     # past this, failures.txt gets each failure's message only


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 5
    return (text[:head] + f"\n... ({len(text) - limit} characters left out) ...\n"
            + text[-(limit - head):])


def _failure_text(report, worker: str, full: bool = True) -> str:
    bar = "=" * 100
    what = "FAILED" if report.when in ("call", "???") else f"ERROR at {report.when}"
    head = (f"{bar}\n{what} {report.nodeid}  (phase {os.environ.get('GPU_CHECK_PHASE', '')}"
            f"{', worker ' + worker if worker else ''}, {report.duration:.2f} s, "
            f"{time.strftime('%H:%M:%S')})\n{'-' * 100}\n")
    if not full:
        return head + short_message(report) + "\n(the whole report: see log.txt)\n"
    body = report.longreprtext or str(report.longrepr)
    for title, content in getattr(report, "sections", []):
        if content.strip():
            body += f"\n{'-' * 20} {title} {'-' * 20}\n{content[-4000:]}"
    return head + _shorten(body.rstrip(), FAILURE_CHARS) + "\n"


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------

def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _is_reporter(config) -> bool:
    """The process whose reports count: the xdist controller, or pytest without xdist."""
    return not _is_worker(config)


class _State:
    session = None
    collected = False
    running: Dict[str, float] = {}
    deadline: Optional[float] = None


def pytest_configure(config) -> None:
    value = os.environ.get("GPU_CHECK_DEADLINE", "").strip()
    _State.deadline = float(value) if value else None
    _State.running = {}
    _State.collected = False


def pytest_sessionstart(session) -> None:
    _State.session = session
    config = session.config
    if _is_reporter(config):
        xdist = config.pluginmanager.hasplugin("dsession")
        _record("start", pid=os.getpid(), xdist=xdist,
                workers=config.getoption("numprocesses", None) if xdist else None,
                deadline=_State.deadline, args=list(config.invocation_params.args))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items: List) -> None:
    """Leave out EXCLUDED (after -k and -m have chosen) and order the rest by TIERS."""
    authors = authors_data_present()
    keep, left_out, reasons = [], [], {}
    for item in items:
        why = exclusion(item.nodeid, authors)
        if why is None:
            keep.append(item)
        else:
            left_out.append(item)
            reasons.setdefault(why, []).append(item.nodeid)
    keep.sort(key=lambda item: tier_of(item.nodeid))  # stable: file order within a tier
    if left_out:
        config.hook.pytest_deselected(items=left_out)
    items[:] = keep
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker in (None, "gw0"):  # one process says it
        _record("excluded", reasons=reasons)


def _record_collected(ids: Iterable[str]) -> None:
    if _State.collected:
        return
    _State.collected = True
    ids = list(ids)
    counts = [0] * len(TIERS)
    for nodeid in ids:
        counts[tier_of(nodeid)] += 1
    _record("collected", ids=ids, tiers=dict(zip(TIERS, counts)))


def pytest_collection_finish(session) -> None:
    if _is_reporter(session.config):  # (without xdist; the controller does not collect)
        _record_collected(item.nodeid for item in session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    _record_collected(ids)


def pytest_runtest_logstart(nodeid, location) -> None:
    _State.running[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location) -> None:
    _State.running.pop(nodeid, None)
    session = _State.session
    if session is None or _State.deadline is None or time.time() < _State.deadline:
        return
    if session.config.pluginmanager.hasplugin("dsession"):
        return  # the xdist controller: its workers stop themselves
    if not session.shouldstop:  # this process runs tests: it stops after this one
        session.shouldstop = ("gpu_check: the phase's time limit was reached; the tests not "
                              "started are not run")


def pytest_runtest_logreport(report) -> None:
    session = _State.session
    if session is None or not _is_reporter(session.config):
        return
    interesting = report.when == "call" or report.failed or report.skipped
    if not interesting:
        return
    worker = _worker_id(report)
    fields = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": round(report.duration, 3)}
    if worker:
        fields["worker"] = worker
    if hasattr(report, "wasxfail"):
        fields["xfail"] = str(report.wasxfail)
    if report.failed or report.skipped:
        fields["message"] = short_message(report)
    _record("report", **fields)
    path = os.environ.get("GPU_CHECK_FAILURES")
    if report.failed and path:
        try:
            full = os.path.getsize(path) < FAILURES_FILE_CHARS
        except OSError:
            full = True
        _append(path, _failure_text(report, worker, full))
    if report.when == "???":  # xdist: the worker crashed while running it
        _State.running.pop(report.nodeid, None)


@pytest.hookimpl(tryfirst=True)  # before xdist tears its workers down (which may be killed)
def pytest_sessionfinish(session, exitstatus) -> None:
    if not _is_reporter(session.config):
        return
    dsession = session.config.pluginmanager.getplugin("dsession")
    stop = (getattr(dsession, "shouldstop", None) or session.shouldstop
            or getattr(dsession, "_summary_report", None) or None)  # e.g. too many crashes
    _record("finish", exitstatus=int(exitstatus), stopped=str(stop) if stop else None,
            running=sorted(_State.running))
