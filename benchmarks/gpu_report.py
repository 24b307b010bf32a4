"""The report of ``scripts/gpu_check.sh``: one folder per GPU run, ``SUMMARY.md`` on top.

    python -m benchmarks.gpu_report env     --work DIR --results DIR [--commit SHA]
    python -m benchmarks.gpu_report status  --work DIR --results DIR --phase triton
    python -m benchmarks.gpu_report summary --work DIR --results DIR [--out DIR]

``env`` (the script's first step) writes ``env.txt`` (versions, GPU, driver, packages, commit)
and ``env.json`` into the work folder, and prints ``KEY=value`` lines for the script (the
folder name, whether there is a GPU, pytest-xdist and pytest-timeout, ...). ``status`` prints
one progress line of a running test phase. ``summary`` reads what the phases left and writes
the results folder, always, whatever is missing (see RESULT_FILES):

* from the work folder (``build/gpu_check``): ``phases.tsv`` (one line per phase, written by
  the script: name, kind, exit status, start, seconds, limit, note, the file of its output:
  ``console/*.txt``, whose last lines say why a phase crashed), ``env.json``,
  ``ops/<family>[.compile|.channels_last].json`` (the op benchmarks' JSON, rewritten after
  every case) and
  ``models/*.json`` (the model benchmark's parts);
* from the results folder: ``tests.jsonl`` and ``failures.txt`` (written as the tests run by
  ``benchmarks/gpu_check_plugin.py``), ``build.log`` and ``log.txt`` (written by the script).

It writes ``SUMMARY.md`` (verdict, phase timings, test counts per backend with the failing tests
and the first lines of their errors, the op and model speed tables, versions, commit), joins
the op reports into ``ops.json`` and the model parts into ``models.json``
(``benchmarks/bench_models.py --merge``), and copies the folder to ``--out DIR/<name>/``.
Exit status: 0 everything ran and passed, 1 something failed, 2 nothing failed but something
did not run (a phase cut by its time limit, tests not run).

Tests not run because a phase was cut (or because the CUDA build failed) are counted as "not
run": never as passed.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import env as bench_env  # noqa: E402 - no torch import
from benchmarks import gpu_check_plugin as plugin  # noqa: E402 - no torch import
from benchmarks.report import fmt, read_json  # noqa: E402 - no torch import

REPO = bench_env.REPO
# Everything the results folder holds (the device tool copies back at most 8 files).
RESULT_FILES = ("SUMMARY.md", "env.txt", "log.txt", "build.log", "tests.jsonl", "failures.txt",
                "ops.json", "models.json")
# The op benchmark families, in the order the script runs them; (module, title).
OP_FAMILIES = {
    "partial_conv": ("bench_partial_conv", "PConv, pk.partial_conv3x3"),
    "channel_attention": ("bench_channel_attention", "PAT_ch, pk.channel_attention"),
    "rpe_attention": ("bench_rpe_attention", "PAT_sf's attention, pk.rpe_attention"),
    "self_mixer": ("bench_self_mixer", "PAT_sf's output, pk.self_mixer_output"),
    "spatial_attention": ("bench_spatial_attention", "PAT_sp, pk.spatial_attention"),
    "batch_norm_act": ("bench_batch_norm_act", "the MLP's BatchNorm + activation, "
                       "pk.batch_norm_act"),
    "pointwise_mlp": ("bench_pointwise_mlp", "the block's MLP, pk.pointwise_mlp"),
    "partial_block": ("bench_partial_block", "a FasterNet / PAT_ch block, pk.partial_block"),
    "patch_conv": ("bench_patch_conv", "the stem and the merging layers, pk.patch_conv"),
    "layer_norm_linear": ("bench_layer_norm_linear", "PAT_sf's LayerNorm and qkv projection, "
                          "pk.layer_norm_linear"),
}
TEST_PHASES = {"triton": "Triton", "cuda": "CUDA"}
CUT_RCS = ("124", "137")          # timeout(1): limit reached (SIGINT sent), then killed
INTERRUPTED_RCS = ("130", "143")  # the script was interrupted (SIGINT, SIGTERM)
FAILURE_LINES = 3                 # lines of each failure's message in SUMMARY.md
MAX_FAILURE_GROUPS = 60


# --------------------------------------------------------------------------------------------
# Reading what the phases left
# --------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> List[dict]:
    """The records of a JSON-lines file; a line cut by a kill is skipped."""
    records = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@dataclass
class Phase:
    name: str
    kind: str          # preflight, build, precompile, tests, ops, models, host (the last two
    #                    optional: what they miss is compiled or not measured, nothing fails)
    rc: str            # exit status, or "-" if it did not run
    start: int         # seconds after the script started
    seconds: int
    limit: str
    note: str = ""
    console: str = ""  # the file its output went to (the script's work folder)

    @property
    def cut(self) -> bool:
        return self.rc in CUT_RCS

    @property
    def interrupted(self) -> bool:
        return self.rc in INTERRUPTED_RCS

    @property
    def status(self) -> str:
        """How a build or benchmark phase ended (tests: tests_phase_status)."""
        if self.rc == "-":
            return "not run"
        if self.kind == "precompile" and self.rc == "143":  # (SIGTERM from the script)
            return "stopped when the benchmarks started"
        if self.cut:
            return "cut: time limit"
        if self.interrupted:
            return "interrupted"
        if self.rc == "0":
            return "ok"
        return f"failed (exit {self.rc})" if self.kind == "build" else f"exit {self.rc}"


def read_phases(work: Path) -> List[Phase]:
    phases = []
    try:
        lines = (work / "phases.tsv").read_text().splitlines()
    except OSError:
        return phases
    for line in lines:
        cells = line.split("\t")
        if len(cells) < 6:
            continue
        name, kind, rc, start, seconds, limit = cells[:6]
        note = cells[6] if len(cells) > 6 else ""
        console = cells[7] if len(cells) > 7 else ""
        try:
            phases.append(Phase(name, kind, rc, int(float(start)), int(float(seconds)), limit,
                                note, console))
        except ValueError:
            continue
    return phases


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


@dataclass
class TestRun:
    """One test phase as the plugin recorded it."""

    phase: str
    selected: Optional[List[str]] = None        # None: the run never finished collecting
    outcome: Dict[str, str] = field(default_factory=dict)
    message: Dict[str, str] = field(default_factory=dict)
    when: Dict[str, str] = field(default_factory=dict)
    duration: Dict[str, float] = field(default_factory=dict)
    excluded: Dict[str, List[str]] = field(default_factory=dict)
    started: bool = False
    finish: Optional[dict] = None

    @property
    def not_run(self) -> List[str]:
        if self.selected is None:
            return []
        return [nodeid for nodeid in self.selected if nodeid not in self.outcome]

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.outcome.values() if value == outcome)

    @property
    def failures(self) -> List[str]:
        return [n for n, o in self.outcome.items() if o in ("failed", "error")]

    @property
    def stopped(self) -> str:
        return (self.finish or {}).get("stopped") or ""


_RANK = {"failed": 6, "error": 5, "xpassed": 4, "xfailed": 3, "skipped": 2, "passed": 1}


def _outcome_of(record: dict) -> str:
    when, outcome = record.get("when"), record.get("outcome")
    if outcome == "failed":
        return "failed" if when in ("call", "???") else "error"
    if "xfail" in record:
        return "xfailed" if outcome == "skipped" else "xpassed"
    return outcome or "error"


def test_runs(records: Sequence[dict]) -> Dict[str, TestRun]:
    """Per phase: what was selected, each test's outcome (the worst of its reports), why the
    excluded were left out, and how the run ended."""
    runs: Dict[str, TestRun] = {}
    for record in records:
        phase = record.get("phase", "")
        run = runs.setdefault(phase, TestRun(phase))
        event = record.get("event")
        if event == "start":
            run.started = True
        elif event == "collected":
            run.selected = list(record.get("ids", []))
        elif event == "excluded":
            run.excluded = dict(record.get("reasons", {}))
        elif event == "finish":
            run.finish = record
        elif event == "report":
            nodeid = record.get("nodeid", "")
            outcome = _outcome_of(record)
            if _RANK.get(outcome, 0) >= _RANK.get(run.outcome.get(nodeid, ""), 0):
                run.outcome[nodeid] = outcome
                if record.get("message"):
                    run.message[nodeid] = record["message"]
                run.when[nodeid] = record.get("when", "")
            if record.get("when") == "call":
                run.duration[nodeid] = float(record.get("duration") or 0.0)
    return runs


def _strip_params(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def failure_groups(run: TestRun) -> List[Tuple[str, List[str], str, str]]:
    """The failed tests grouped by test function and first line of the error:
    (function node id, parameter ids, outcome, message)."""
    groups: Dict[tuple, List[str]] = {}
    for nodeid in run.failures:
        message = run.message.get(nodeid, "")
        first = message.splitlines()[0] if message else ""
        key = (_strip_params(nodeid), run.outcome[nodeid], first)
        groups.setdefault(key, []).append(nodeid)
    out = []
    for (function, outcome, _), nodeids in groups.items():
        params = [n[len(function):].strip("[]") for n in nodeids if n != function]
        out.append((function, params, outcome, run.message.get(nodeids[0], "")))
    return out


def tests_phase_status(phase: Phase, run: Optional[TestRun], work: Path) -> str:
    """How a test phase ended, in words."""
    if phase.rc == "-" or phase.note.startswith("not run"):
        return phase.note or "not run"
    stopped = run.stopped if run else ""
    if "time limit" in stopped:
        return "cut: time limit (tests not started were not run)"
    if stopped.startswith("stopping after"):
        return f"stopped by --maxfail ({stopped})"
    if phase.cut:
        return "cut: killed at its time limit"
    if phase.interrupted:
        return "interrupted"
    tail = console_tail(work, phase, 2)
    if run is None or not run.started:
        return f"failed to start (exit {phase.rc}): {tail or 'see log.txt'}"
    if run.finish is None:
        return f"died (exit {phase.rc}, no end record): {tail or 'see log.txt'}"
    status = run.finish.get("exitstatus")
    if status in (0, 1) and stopped:
        return f"stopped: {stopped}"
    if status in (0, 1) and run.not_run:
        return f"ended with {len(run.not_run)} tests not run (see log.txt)"
    if status in (0, 1):
        return "completed"
    if status == 2:
        return f"interrupted{': ' + stopped if stopped else ''}"
    if status == 5:
        return "no tests selected"
    return f"pytest exit {status} (see log.txt)"


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

def op_reports(work: Path) -> Dict[str, dict]:
    """ops/<family>.json, ops/<family>.compile.json and ops/<family>.channels_last.json that
    exist, keyed by file stem."""
    reports = {}
    for family in OP_FAMILIES:
        for suffix in ("", ".compile", ".channels_last"):
            report = read_json(work / "ops" / f"{family}{suffix}.json")
            if report is not None:
                reports[family + suffix] = report
    return reports


def rates_line(rates: dict) -> str:
    """The machine rates report (``benchmarks/machine_rates.py``) in one sentence."""
    matmul = rates.get("matmul", {})
    parts = [f"copy {rates['copy']['gbps']:,.0f} GB/s" if "copy" in rates else None] + [
        f"{name} matmul {row['tflops']:,.0f} TFLOP/s" for name, row in matmul.items()] + [
        f"L2 read {rates['l2_read']['gbps']:,.0f} GB/s" if "l2_read" in rates else None]
    return ("Measured (benchmarks/machine_rates.py): " + ", ".join(p for p in parts if p)
            + ". The traffic model's roofline takes them: python -m benchmarks.traffic --rates "
            "ops.json.")


def planned_cases(report: dict) -> int:
    """How many cases the run was asked for (its settings)."""
    settings = report.get("settings", {})
    per_shape = settings.get("batches_per_shape", {})
    batches = sum(len(b) for b in per_shape.values()) if per_shape else len(report.get("rows", []))
    return batches * len(settings.get("dtypes", [])) * len(settings.get("modes", []))


def bench_problems(rows: Sequence[dict]) -> List[str]:
    """Each errored or mismatched provider, one line per provider, status and reason:
    'provider: status at N cases (first case): reason'."""
    groups: Dict[tuple, List[str]] = {}
    for row in rows:
        case = " ".join(str(row[k]) for k in ("shape", "model", "dtype", "precision", "mode",
                                              "layout") if row.get(k))
        for provider, entry in row.get("providers", {}).items():
            if entry.get("status") in ("error", "mismatch"):
                reason = (entry.get("reason") or "").strip().splitlines()
                key = (provider, entry["status"], reason[0][:300] if reason else "")
                groups.setdefault(key, []).append(case)
    out = []
    for (provider, status, reason), cases in groups.items():
        where = cases[0] if len(cases) == 1 else f"{len(cases)} cases ({cases[0]}, ...)"
        out.append(f"{provider}: {status} at {where}: {reason}")
    return out


def _cell(entry: Optional[dict], fmt) -> str:
    if entry is None:
        return ""
    if entry.get("ms") is not None:
        text = fmt(entry["ms"] * 1e3, ",.1f")
        if entry.get("speedup_vs_eager") is not None and entry.get("speedup_vs_eager") != 1.0:
            text += f" ({fmt(entry['speedup_vs_eager'], '.2f', 'x')})"
        if entry.get("status") == "mismatch":
            text += " MISMATCH"
        return text
    status = entry.get("status", "")
    return {"unavailable": "unavail.", "n/a": "n/a"}.get(status, status)


def op_table(report: dict) -> List[str]:
    """Markdown: one line per case, each provider's median time in µs and its speed-up vs
    eager; then the geometric means and the issue's targets (op_tables' own lines)."""
    from benchmarks import op_tables  # imports torch: only where there are op reports

    rows = report.get("rows", [])
    providers = report.get("settings", {}).get("providers", [])
    providers = [p for p in providers if any(p in r.get("providers", {}) for r in rows)]
    if not rows:
        return ["(no case measured)"]
    lines = ["| shape | B | dtype | mode | " + " | ".join(providers) + " |",
             "|---|---:|---|---|" + "---:|" * len(providers)]
    for row in rows:
        cells = [row["shape"], str(row["batch"]), row["dtype"], row["mode"]]
        cells += [_cell(row["providers"].get(p), fmt) for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    labels = [key[len("speedup_vs_"):] for key in report.get("speedups", {})]
    extra = op_tables.summary_lines(rows, providers, labels,
                                    report.get("flop_formulas") is not None)
    family = OP_FAMILIES.get(report.get("benchmark", ""))
    if family is not None:
        try:
            module = __import__(f"benchmarks.{family[0]}", fromlist=["FAMILY"])
            extra += op_tables.check_targets(module.FAMILY, rows, report.get("device"))
        except Exception as exc:  # noqa: BLE001 - the table matters more than the targets
            extra.append(f"  (targets not evaluated: {type(exc).__name__}: {exc})")
    if extra:
        lines += ["", "```"] + extra + ["```"]
    return lines


def model_reports(work: Path) -> Tuple[Optional[dict], List[dict]]:
    """The merged model report (models/models.json, made here with bench_models --merge from
    the parts), and the parts."""
    parts_paths = [p for p in (work / "models" / "fp32.json", work / "models" / "amp.json")
                   if p.is_file()]
    parts = [r for r in (read_json(p) for p in parts_paths) if r is not None]
    merged = None
    if parts:
        try:
            from benchmarks.model_report import merge
            with contextlib.redirect_stdout(io.StringIO()):
                merge([str(p) for p in parts_paths], str(work / "models" / "models"))
            merged = read_json(work / "models" / "models.json")
        except Exception as exc:  # noqa: BLE001 - keep the parts
            merged = None
            for part in parts:
                part.setdefault("merge_error", f"{type(exc).__name__}: {exc}")
    return merged, parts


# --------------------------------------------------------------------------------------------
# SUMMARY.md
# --------------------------------------------------------------------------------------------

def console_tail(work: Path, phase: Phase, lines: int = 3) -> str:
    """The last non-empty lines of a phase's output (e.g. the exception that ended it)."""
    if not phase.console:
        return ""
    try:
        text = (work / phase.console).read_text(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(line[:200] for line in tail)


def build_excerpt(path: Path) -> List[str]:
    """The compiler's error lines (at most 20) and the last 15 lines of build.log."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ["(no build.log)"]
    errors = [line[:300] for line in text if re.search(r"\berror\b", line, re.I)][:20]
    out = []
    if errors:
        out += ["error lines:", *errors, "", "last lines:"]
    return out + [line[:300] for line in text[-15:]]


def _env_line(env: dict) -> str:
    parts = [f"GPU {env.get('gpu_name') or 'none'}"]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    parts.append(f"torch {env.get('torch', '?')}")
    parts.append(f"CUDA {env.get('torch_cuda') or 'none (CPU build)'}")
    parts.append(f"nvcc {env.get('nvcc') or 'not found'}")
    parts.append(f"Triton {env.get('triton') or 'not installed'}")
    parts.append(f"Python {env.get('python', '?')}")
    parts.append(f"{env.get('cpus', '?')} CPUs")
    return ", ".join(parts)


def gpu_machine_pins() -> Dict[str, str]:
    """GPU_MACHINE_TORCH, GPU_MACHINE_TRITON and GPU_MACHINE_ARCH of
    patnet_kernels/triton/aot.py: the GPU machines' versions and target that CI (``aot
    --gpu-triton``) and scripts/gpu_stack_check.sh check against, read without importing the
    package (no torch import here)."""
    tree = ast.parse((bench_env.REPO / "patnet_kernels" / "triton" / "aot.py").read_text())
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name) and target.id.startswith("GPU_MACHINE_")}


def pins_mismatch(env: dict) -> Optional[str]:
    """On a GPU machine whose torch or Triton is not the pinned one, what to update."""
    if not env.get("cuda_available"):
        return None
    pins = gpu_machine_pins()
    differ = [f"{name} {have} (pinned {pins[pin]})" for name, have, pin in (
        ("torch", (env.get("torch") or "").split("+")[0], "GPU_MACHINE_TORCH"),
        ("Triton", env.get("triton") or "", "GPU_MACHINE_TRITON")) if have and have != pins[pin]]
    if not differ:
        return None
    return (f"this machine's {' and '.join(differ)} "
            f"{'differ' if len(differ) > 1 else 'differs'} from what CI and "
            f"scripts/gpu_stack_check.sh check this project against: set GPU_MACHINE_TORCH / "
            f"GPU_MACHINE_TRITON in patnet_kernels/triton/aot.py to this machine's and rerun "
            f"scripts/gpu_stack_check.sh")


@dataclass
class Verdict:
    failed: List[str] = field(default_factory=list)
    incomplete: List[str] = field(default_factory=list)

    @property
    def code(self) -> int:
        return 1 if self.failed else 2 if self.incomplete else 0

    @property
    def text(self) -> str:
        if self.failed:
            head = "FAILED: " + "; ".join(self.failed)
        elif self.incomplete:
            head = "INCOMPLETE (nothing failed, but not everything ran)"
        else:
            return "PASSED: every phase ran to its end and nothing failed"
        if self.incomplete:
            head += ". Not run: " + "; ".join(self.incomplete)
        return head


def summarize(work: Path, results: Path, final: bool = True) -> Tuple[str, Verdict]:
    """SUMMARY.md's text and the verdict; also writes ops.json and models.json."""
    env = read_json(work / "env.json") or {}
    phases = read_phases(work)
    runs = test_runs(read_jsonl(results / "tests.jsonl"))
    verdict = Verdict()
    out: List[str] = []
    date = env.get("date") or datetime.date.today().isoformat()
    title = f"# GPU check: {env.get('gpu_name') or 'no GPU'}, {date}, commit {env.get('commit', '?')}"
    out += [title, ""]

    # ---------------------------------------------------------------- verdict inputs
    if not env:
        verdict.failed.append("the preflight (env) step failed: see log.txt")
    elif not env.get("cuda_available") and not env.get("allow_cpu"):
        verdict.failed.append("no CUDA GPU is visible to this PyTorch")
    build = next((p for p in phases if p.kind == "build"), None)
    if build is not None and build.rc not in ("0", "-"):
        verdict.failed.append("the CUDA extension did not build" + (
            " (time limit)" if build.cut else " (interrupted)" if build.interrupted else ""))
    for phase in [p for p in phases if p.kind == "tests"]:
        run = runs.get(phase.name.split()[0])
        if run is not None:
            if run.failures:
                verdict.failed.append(f"{len(run.failures)} {phase.name} failed")
            if run.not_run:
                verdict.incomplete.append(f"{len(run.not_run)} {phase.name}")
            elif run.selected is None and phase.rc != "-":
                verdict.incomplete.append(f"{phase.name} (the run ended before it had "
                                          "collected them)")
        else:
            verdict.incomplete.append(f"{phase.name} ({phase.note or 'no record of them'})")
    for phase in phases:
        if phase.kind in ("rates", "ops", "models") and phase.rc == "-":
            verdict.incomplete.append(f"{phase.name} ({phase.note})")
        elif phase.kind in ("rates", "ops", "models") and (phase.cut or phase.interrupted):
            verdict.incomplete.append(f"{phase.name} ({phase.status})")
    if final and not phases:
        verdict.failed.append("no phase ran (see log.txt)")

    ops = op_reports(work)
    rates = read_json(work / "ops" / "machine_rates.json")
    merged_models, model_parts = model_reports(work)
    host = read_json(work / "models" / "host_time.json")
    bench_errors: List[str] = []
    for name, report in ops.items():
        bench_errors += [f"ops {name}: {p}" for p in bench_problems(report.get("rows", []))]
    for part in model_parts:
        bench_errors += [f"models: {p}" for p in bench_problems(part.get("rows", []))]
    for name, report in ((host or {}).get("models") or {}).items():
        bench_errors += [f"host time {name}, {provider}: {row.get('reason', '')[:200]}"
                         for provider, row in report.get("providers", {}).items()
                         if row.get("status") == "error"]
    for phase in phases:
        if (phase.kind not in ("rates", "ops", "models", "host") or phase.rc in ("0", "-")
                or phase.cut or phase.interrupted):
            continue
        stem = phase.name.split(" ", 1)[1].replace(" ", ".") if phase.kind == "ops" else ""
        has_json = (stem in ops if phase.kind == "ops" else host is not None
                    if phase.kind == "host" else rates is not None if phase.kind == "rates"
                    else bool(model_parts))
        if phase.rc == "1" and has_json:
            continue  # a provider errored or mismatched: listed from its JSON
        tail = console_tail(work, phase)
        bench_errors.append(f"{phase.name}: exited {phase.rc}"
                            + (f", ending: {tail}" if tail else " (see log.txt)"))
    if bench_errors:
        verdict.failed.append(f"benchmark errors or mismatches ({len(bench_errors)} kinds)")

    if final:
        out += [f"**{verdict.text}.**", ""]
    else:
        verdict.incomplete.append("the phases not reached yet")
        out += [f"**SO FAR (the run goes on): "
                f"{'; '.join(verdict.failed) if verdict.failed else 'nothing failed yet'}.**", ""]
    out += [_env_line(env), ""]
    drift = pins_mismatch(env)
    if drift:
        out += [f"Versions: {drift}.", ""]
    if env.get("command"):
        out += [f"Command: `{env['command']}`", ""]

    # ---------------------------------------------------------------- phases
    out += ["## Phases", "", "| phase | status | seconds | limit s | note |",
            "|---|---|---:|---:|---|"]
    for phase in sorted(phases, key=lambda p: p.start):
        status = (tests_phase_status(phase, runs.get(phase.name.split()[0]), work)
                  if phase.kind == "tests" else phase.status)
        note = "" if phase.note == status else phase.note
        out.append(f"| {phase.name} | {status} | {phase.seconds} | {phase.limit} | {note} |")
    if not final:
        out += ["", "_(written while the run goes on: later phases not reached yet)_"]
    out.append("")

    # ---------------------------------------------------------------- tests
    out += ["## Tests", "",
            "`-m \"not slow\"`; Triton = the tests `-k cuda` does not select, CUDA = those it "
            "does. *not run*: selected but never started (cut, or the CUDA build failed): "
            "unverified, not passed.", "",
            "| backend | selected | passed | failed | errors | skipped | xfailed | xpassed | "
            "not run | left out |", "|---|" + "---:|" * 9]
    for key, label in TEST_PHASES.items():
        run = runs.get(key)
        if run is None:
            out.append(f"| {label} | - | | | | | | | | |")
            continue
        selected = len(run.selected) if run.selected is not None else "?"
        excluded = sum(len(v) for v in run.excluded.values())
        out.append(f"| {label} | {selected} | " + " | ".join(
            str(run.count(o)) for o in OUTCOMES) + f" | {len(run.not_run)} | {excluded} |")
    out.append("")
    for key, label in TEST_PHASES.items():
        run = runs.get(key)
        if run is None:
            continue
        if run.not_run and run.selected:
            by_tier = [0] * len(plugin.TIERS)
            for nodeid in run.not_run:
                by_tier[plugin.tier_of(nodeid)] += 1
            out.append(f"- {label}, not run by kind (run order): " + ", ".join(
                f"{name} {n}" for name, n in zip(plugin.TIERS, by_tier) if n))
        running = (run.finish or {}).get("running") or []
        if running:
            out.append(f"- {label}, running when the run was stopped (not run): "
                       + ", ".join(f"`{n}`" for n in running[:10])
                       + (f" and {len(running) - 10} more" if len(running) > 10 else ""))
        for reason, nodeids in run.excluded.items():
            out.append(f"- {label}, left out ({len(nodeids)}): {reason}")
        slow = sorted(((n, d) for n, d in run.duration.items() if d >= 1.0),
                      key=lambda kv: -kv[1])[:5]
        if slow:
            out.append(f"- {label}, slowest: " + ", ".join(f"`{n}` {d:.0f} s" for n, d in slow))
    out.append("")
    groups = [(label, g) for key, label in TEST_PHASES.items() if key in runs
              for g in failure_groups(runs[key])]
    if groups:
        total = sum(len(runs[k].failures) for k in runs)
        out += [f"### Failures ({total}; full reports in failures.txt)", ""]
        for label, (function, params, outcome, message) in groups[:MAX_FAILURE_GROUPS]:
            shown = ", ".join(params[:6]) + (f", +{len(params) - 6}" if len(params) > 6 else "")
            head = f"- {label}: `{function}`" + (f" [{shown}]" if params else "")
            if outcome == "error":
                head += " (error outside the test: setup or teardown)"
            out.append(head)
            for line in message.splitlines()[:FAILURE_LINES]:
                out.append(f"  > {line[:300]}")
        if len(groups) > MAX_FAILURE_GROUPS:
            out.append(f"- ... and {len(groups) - MAX_FAILURE_GROUPS} more groups: see "
                       "failures.txt")
        out.append("")

    # ---------------------------------------------------------------- build
    if build is not None:
        out += ["## CUDA build", ""]
        if build.rc == "0":
            out += [f"Built in {build.seconds} s ({build.note})." if build.note
                    else f"Built in {build.seconds} s.", ""]
        elif build.rc == "-":
            out += [f"Not attempted: {build.note}.", ""]
        else:
            out += [f"**Failed** (exit {build.rc}{', time limit' if build.cut else ''}, "
                    f"{build.seconds} s): nothing of the CUDA backend ran (its tests are counted "
                    "not run; the benchmarks ran without it). build.log:", "", "```"]
            out += build_excerpt(results / "build.log") + ["```", ""]

    # ---------------------------------------------------------------- op benchmarks
    if ops:
        out += ["## Op benchmarks", "",
                "Median µs per call (on a GPU triton.testing.do_bench, L2 flushed), in "
                "brackets the speed-up vs eager (the `torch` provider, same pass). `fwd`: eval forward under "
                "no_grad; `fwd+bwd`: training forward and backward. Full rows (GB/s, % of copy "
                "bandwidth, errors, compile times) in ops.json.", ""]
        for name, report in ops.items():
            family = OP_FAMILIES.get(report.get("benchmark", ""), ("", name))[1]
            done, planned = len(report.get("rows", [])), planned_cases(report)
            state = "complete" if report.get("complete") else "**cut**: the cases after these did not run"
            which = ("torch.compile comparison, " if name.endswith(".compile") else
                     "channels_last, " if name.endswith(".channels_last") else "")
            out += [f"### {family} ({which}{done} of {planned} cases, {state})", ""]
            try:
                out += op_table(report)
            except Exception as exc:  # noqa: BLE001 - never lose the summary over a table
                out.append(f"(table not made: {type(exc).__name__}: {exc}; see ops.json)")
            out.append("")
        copy = next((r.get("copy_bandwidth", {}).get("gbps") for r in ops.values()
                     if r.get("copy_bandwidth")), None)
        if copy:
            out += [f"Copy bandwidth measured (the ceiling of a memory-bound op): "
                    f"{copy:,.0f} GB/s.", ""]
    if rates is not None:
        out += ["## Machine rates", "", rates_line(rates), ""]
    if bench_errors:
        out += ["### Benchmark errors and mismatches", ""]
        out += [f"- {line}" for line in bench_errors[:40]]
        if len(bench_errors) > 40:
            out.append(f"- ... and {len(bench_errors) - 40} more (ops.json, models.json)")
        out.append("")

    # ---------------------------------------------------------------- models
    if merged_models is not None or model_parts:
        out += ["## Models", ""]
        try:
            from benchmarks.model_report import format_table
            for report in ([merged_models] if merged_models is not None else model_parts):
                out += ["```", format_table(report), "```", ""]
                if not report.get("complete", True) or any(
                        not p.get("complete", True) for p in report.get("parts", [])):
                    out += ["(cut: some modes did not finish)", ""]
        except Exception as exc:  # noqa: BLE001
            out += [f"(table not made: {type(exc).__name__}: {exc}; see models.json)", ""]
    if host is not None:
        out += ["### Host time per forward", "",
                "Host milliseconds to issue one eval forward's kernels (no synchronisation "
                "inside the timing; `benchmarks/host_time.py`): where they exceed the "
                "forward's GPU time above, the model is host-bound.", ""]
        try:
            from benchmarks.host_time import format_table as host_table
            for report in (host.get("models") or {}).values():
                out += ["```", host_table(report), "```", ""]
        except Exception as exc:  # noqa: BLE001
            out += [f"(table not made: {type(exc).__name__}: {exc}; see models.json)", ""]

    # ---------------------------------------------------------------- files
    out += ["## Files", "",
            "SUMMARY.md (this), env.txt (versions, GPU, packages), log.txt (progress and every "
            "phase's output), build.log, tests.jsonl (each test's outcome as it came), "
            "failures.txt (each failure's full report), ops.json (the op benchmarks' reports), "
            "models.json (the model benchmark's report). Made by `scripts/gpu_check.sh`; "
            "`benchmarks/README.md` says how to read them.", ""]

    # the joined raw reports
    if ops:
        write_compact(results / "ops.json", {"reports": ops, **(
            {"machine_rates": rates} if rates is not None else {})})
    models = (dict(merged_models) if merged_models is not None
              else {"parts": model_parts} if model_parts else {})
    if host is not None:
        models["host_time"] = host
    if models:
        write_compact(results / "models.json", models)
    return "\n".join(out).rstrip() + "\n", verdict


def write_compact(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def copy_results(results: Path, out: Path) -> Path:
    """Copy RESULT_FILES of ``results`` to ``out/<results folder name>/``."""
    target = out / results.name
    target.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (results / name).is_file():
            shutil.copyfile(results / name, target / name)
    return target


# --------------------------------------------------------------------------------------------
# env: versions, and the facts the script needs
# --------------------------------------------------------------------------------------------

PACKAGES = ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
            "pytest-benchmark", "matplotlib", "ninja", "setuptools", "easydict")
ENV_VARS = ("CUDA_HOME", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
            "PATNET_CUDA_BUILD_DIR", "PATNET_AUTHORS_REFERENCE", "GPU_CHECK_TRITON_INTERPRET",
            "GPU_CHECK_PATNET_CUDA_EMULATE")


def _run(cmd: Sequence[str], timeout: float = 30) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({cmd[0]}: {type(exc).__name__}: {exc})"


def collect_env(commit: Optional[str] = None) -> dict:
    """Versions and machine facts; each probe that fails says so instead of raising."""
    import importlib.metadata

    env: dict = {"date": datetime.date.today().isoformat(),
                 "time": datetime.datetime.now().isoformat(timespec="seconds"),
                 "python": platform.python_version(), "cpus": os.cpu_count(),
                 "authors_data": plugin.authors_data_present(), "errors": []}
    env["cpu"] = bench_env.cpu_name()
    env["commit"] = bench_env.git_commit()
    if commit and env.get("commit", "unknown") == "unknown":
        env["commit"] = f"{commit} (given; no git here)"
    env.setdefault("commit", "unknown")
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    env["packages"] = packages
    env["triton"] = packages.get("triton")
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            env["gpu_count"] = torch.cuda.device_count()
            env["gpu_name"] = torch.cuda.get_device_name(0)
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            free, total = torch.cuda.mem_get_info(0)
            env["gpu_memory_gib"] = round(total / 2**30, 1)
    except Exception as exc:  # noqa: BLE001
        env["errors"].append(f"torch: {type(exc).__name__}: {exc}")
        env.setdefault("cuda_available", False)
    smi = shutil.which("nvidia-smi")
    if smi:
        query = _run([smi, "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"])
        env["nvidia_smi"] = query
        fields = [f.strip() for f in query.splitlines()[0].split(",")] if query else []
        if len(fields) >= 2:
            env["driver"] = fields[1]
    try:
        from patnet_kernels._build import find_cuda_home
        cuda_home = find_cuda_home()
    except Exception as exc:  # noqa: BLE001
        env["errors"].append(f"patnet_kernels._build: {type(exc).__name__}: {exc}")
        cuda_home = None
    env["cuda_home"] = cuda_home
    nvcc = (Path(cuda_home) / "bin" / "nvcc") if cuda_home else None
    nvcc = str(nvcc) if nvcc and nvcc.is_file() else shutil.which("nvcc")
    if nvcc:
        version = _run([nvcc, "--version"])
        match = re.search(r"V(\d+\.\d+\.\d+)", version)
        env["nvcc"] = match.group(1) if match else version.splitlines()[-1:]
    env["ninja"] = shutil.which("ninja")
    # The host compiler and linker build bindings.cpp: their versions matter to how its C++
    # exceptions unwind (the first GPU run's crashes on bad input, see csrc/README.md).
    for tool, command in (("cxx", os.environ.get("CXX", "c++")), ("ld", "ld")):
        path = shutil.which(command)
        env[tool] = (_run([path, "--version"]).splitlines() or ["?"])[0] if path else None
    env["slug"] = re.sub(r"^nvidia-", "", bench_env.slug(env.get("gpu_name") or "cpu"))
    try:
        mem = Path("/proc/meminfo").read_text().split()
        env["memory_gib"] = round(int(mem[mem.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    env["vars"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return env


def env_text(env: dict) -> str:
    lines = [f"date: {env.get('time')}", f"commit: {env.get('commit')}",
             f"command: {env.get('command', '')}", _env_line(env),
             f"GPU: {env.get('gpu_name')} x {env.get('gpu_count', 0)}, compute capability "
             f"{env.get('capability')}, {env.get('gpu_memory_gib')} GiB",
             f"CPU: {env.get('cpu')}, {env.get('cpus')} cores, {env.get('memory_gib')} GiB",
             f"CUDA_HOME: {env.get('cuda_home')}; ninja: {env.get('ninja')}",
             f"host compiler: {env.get('cxx')}; linker: {env.get('ld')}",
             f"authors' reference vectors: {'present' if env.get('authors_data') else 'missing'}",
             "", "nvidia-smi: " + str(env.get("nvidia_smi", "(not found)")), "", "packages:"]
    lines += [f"  {name:<18} {version or '-'}" for name, version in env["packages"].items()]
    lines += ["", "environment:"] + [f"  {k}={v}" for k, v in env.get("vars", {}).items()]
    if env.get("errors"):
        lines += ["", "probe errors:"] + [f"  {e}" for e in env["errors"]]
    return "\n".join(lines) + "\n"


def _shell_value(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.:+/@-]", "_", str(value if value is not None else ""))


def main_env(args) -> int:
    env = collect_env(args.commit)
    env["command"] = args.command or ""
    env["allow_cpu"] = bool(args.allow_cpu)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / "env.txt").write_text(env_text(env))
    facts = {
        "GPU_SLUG": env["slug"], "DATE": env["date"],
        "CUDA_OK": int(bool(env.get("cuda_available"))),
        "CUDA_TORCH": int(bool(env.get("torch_cuda"))),
        "XDIST": env["packages"].get("pytest-xdist") or "",
        "TIMEOUT_PLUGIN": env["packages"].get("pytest-timeout") or "",
        "NVCC": int(bool(env.get("nvcc"))), "AUTHORS_DATA": int(bool(env.get("authors_data"))),
    }
    for key, value in facts.items():
        print(f"{key}={_shell_value(value)}")
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main_status(args) -> int:
    runs = test_runs(read_jsonl(Path(args.results) / "tests.jsonl"))
    run = runs.get(args.phase)
    if run is None:
        print(f"{args.phase} tests: starting")
        return 0
    done = len(run.outcome)
    counts = ", ".join(f"{run.count(o)} {o}" for o in OUTCOMES if run.count(o))
    left = (f"; {len(run.not_run)} to go" if run.selected is not None else "; collecting")
    print(f"{TEST_PHASES.get(args.phase, args.phase)} tests: {done} done"
          f"{' (' + counts + ')' if counts else ''}{left}")
    return 0


def main_summary(args) -> int:
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text, verdict = summarize(work, results, final=not args.partial)
    (results / "SUMMARY.md").write_text(text)
    print(f"summary{' so far' if args.partial else ''}: {verdict.text}")
    if args.out:
        target = copy_results(results, Path(args.out))
        print(f"summary: copied to {target}")
    return verdict.code


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report",
                                     description="The report of scripts/gpu_check.sh.")
    sub = parser.add_subparsers(dest="command_name", required=True)
    for name in ("env", "status", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="the script's work folder")
        p.add_argument("--results", default=None, help="the results folder")
        if name == "env":
            p.add_argument("--commit", default=None, help="commit to report without git")
            p.add_argument("--command", default=None, help="the command line, for the report")
            p.add_argument("--allow-cpu", action="store_true")
        if name == "status":
            p.add_argument("--phase", required=True)
        if name == "summary":
            p.add_argument("--out", default=None, help="also copy the folder to OUT/<name>/")
            p.add_argument("--partial", action="store_true",
                           help="the run goes on: later phases are not missing, just not yet")
    args = parser.parse_args(argv)
    if args.command_name in ("status", "summary") and not args.results:
        parser.error("--results is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return {"env": main_env, "status": main_status, "summary": main_summary}[
        args.command_name](args)


if __name__ == "__main__":
    sys.exit(main())
