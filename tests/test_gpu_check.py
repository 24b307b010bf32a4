"""scripts/gpu_check.sh, its pytest plugin and its report, checked on the CPU.

What needs a GPU (the build, the real test suite, the benchmarks) cannot run here; what decides
whether a GPU run comes back useful can: the arguments and the plan of the script (--help, a bad
option, --dry-run), the plugin's order, exclusions and records (a run cut by its deadline), the
report written from recorded outputs (tests/data/gpu_check/: a run cut by its time limits with
failures, a crashed worker, an errored and a cut benchmark; a failed CUDA build), and one whole
run of the script on a small fake suite (tests/data/gpu_check/suite/) with --allow-cpu, where the
CUDA build fails as it must with a CPU PyTorch.
"""
from __future__ import annotations

import ast
import json
import os
import importlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check_plugin as plugin
from benchmarks import gpu_report

from conftest import REPO

DATA = REPO / "tests" / "data" / "gpu_check"
SCRIPT = REPO / "scripts" / "gpu_check.sh"
SUITE = DATA / "suite" / "fake_cases.py"
FAKE = "tests/data/gpu_check/suite/fake_cases.py::"
BASH = shutil.which("bash")


def _case(tmp_path: Path, name: str) -> Path:
    """A copy of a recorded run (the report writes into it)."""
    return Path(shutil.copytree(DATA / name, tmp_path / name))


def _env(**extra) -> dict:
    """The environment of a child process: this Python, no CPU-only switches of the test run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PATNET_CUDA_EMULATE", "OUT") and
           not k.startswith("GPU_CHECK_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), **extra)
    return env


def _script(*args, timeout=60, **env) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- the plugin
def test_tests_run_in_order_of_value():
    ids = ["tests/test_reference_ops.py::test_partial_conv3x3_inplace[a]",
           "tests/test_fused_compile.py::test_compiled_model_one_graph_no_recompile[triton-x]",
           "tests/test_fused_models.py::test_model_matches_reference_model[cuda-patnet_t0-eval]",
           "tests/test_fused_partial_conv.py::test_compile_fullgraph_matches_eager[cuda]",
           "tests/test_fused_channel_attention.py::test_opcheck[triton-eval]",
           "tests/test_fused_partial_conv.py::test_matches_float64_reference[triton-a]",
           "tests/test_fused_rpe_attention.py::test_bad_input_is_refused_before_any_kernel[cuda-x]",
           "tests/test_cuda_backend.py::test_op_refuses_bad_input[rpe-table_dims]"]
    tiers = [plugin.TIERS[plugin.tier_of(n)] for n in ids]
    assert tiers == ["rest", "torch.compile", "models", "torch.compile", "torch.compile",
                     "op parity", "build, bindings and input checks",
                     "build, bindings and input checks"]
    ordered = sorted(ids, key=plugin.tier_of)
    assert ordered[:2] == ids[6:8] and ordered[-1] == ids[0]


def test_exclusions():
    assert "ahead-of-time" in plugin.exclusion("tests/test_triton_aot.py::test_every_kernel")
    assert plugin.exclusion("tests/test_ddp.py::test_ddp_matches_single_process_emulation")
    assert plugin.exclusion("tests/test_ddp.py::test_sync_batchnorm_two_gpus") is None
    reading = "tests/test_fused_models.py::test_fused_model_reproduces_authors_vectors[cuda-a]"
    assert plugin.exclusion(reading, authors_data=True) is None
    assert plugin.exclusion(reading, authors_data=False) == plugin.NO_AUTHORS_DATA


def test_long_failure_reports_are_shortened():
    text = "".join(f"line {i}\n" for i in range(5000))
    short = plugin._shorten(text, plugin.FAILURE_CHARS)
    assert len(short) < plugin.FAILURE_CHARS + 60 and "characters left out" in short
    assert short.startswith("line 0\n") and short.endswith("line 4999\n")
    assert plugin._shorten("short", 100) == "short"


def _functions(tree: ast.Module):
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        a.arg for a in getattr(node, "args", ast.arguments([], [], None, [], [], None, [])).args}


def test_the_plugin_lists_name_real_tests():
    """Every left-out prefix names a test file (and test) that exists, and every test that
    reads the authors' vectors (calls conftest's authors_reference_dir, itself or through a
    helper or fixture) is in NEEDS_AUTHORS_DATA: without the vectors on the GPU machine those
    tests would fail for that reason alone, and stop a run at --maxfail."""
    modules = {p.relative_to(REPO).as_posix(): ast.parse(p.read_text())
               for p in sorted((REPO / "tests").glob("test_*.py"))}
    for prefix, _ in plugin.EXCLUDED + tuple((p, "") for p in plugin.NEEDS_AUTHORS_DATA):
        path, _, function = prefix.partition("::")
        assert path in modules or path == "tests/test_kernel_benchmarks.py", prefix
        if function:
            assert function in {f.name for f in _functions(modules[path])}, prefix
    readers = {f.name for tree in modules.values() for f in _functions(tree)
               if not f.name.startswith("test_") and "authors_reference_dir" in _names(f)}
    for path, tree in modules.items():
        for f in _functions(tree):
            if f.name.startswith("test_") and ({"authors_reference_dir"} | readers) & _names(f):
                nodeid = f"{path}::{f.name}"
                assert nodeid.startswith(plugin.NEEDS_AUTHORS_DATA), (
                    f"{nodeid} reads the authors' vectors: add it to "
                    "benchmarks/gpu_check_plugin.py's NEEDS_AUTHORS_DATA")


def test_plugin_records_a_run_cut_by_its_deadline(tmp_path):
    """The deadline has passed: the first test runs, the others are not started; the records
    say which were selected, so the report counts them as not run."""
    log, failures = tmp_path / "tests.jsonl", tmp_path / "failures.txt"
    env = _env(GPU_CHECK_LOG=str(log), GPU_CHECK_FAILURES=str(failures), GPU_CHECK_PHASE="triton",
               GPU_CHECK_DEADLINE=str(time.time() - 1))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_check_plugin", "-p",
         "no:cacheprovider", "-m", "not slow", "-k", "not cuda", "-q", "--confcutdir",
         str(SUITE.parent), str(SUITE)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # interrupted
    run = gpu_report.test_runs(gpu_report.read_jsonl(log))["triton"]
    assert len(run.selected) == 8 and run.outcome == {FAKE + "test_passes": "passed"}
    assert len(run.not_run) == 7 and FAKE + "test_fails" in run.not_run
    assert "time limit" in run.stopped and run.finish["exitstatus"] == 2
    assert not failures.exists()


# --------------------------------------------------------------------------- the report
def test_every_op_family_the_script_runs_reaches_the_report():
    """Each family `run_family` benchmarks has its entry in OP_FAMILIES: the report joins only
    those into ops.json, which `update_auto_rule` reads (a family missing there would never
    reach backend="auto")."""
    families = re.findall(r"^\s*run_family (\w+) ", SCRIPT.read_text(), re.M)
    assert "batch_norm_act" in families
    assert set(families) == set(gpu_report.OP_FAMILIES), (families, list(gpu_report.OP_FAMILIES))


def test_report_shows_the_host_time(tmp_path):
    """The model phase's host time: a table per model in SUMMARY.md, its JSON in models.json;
    an error of a provider is a benchmark error."""
    from benchmarks import host_time

    case = _case(tmp_path, "cut_run")
    with (case / "work" / "phases.tsv").open() as phases:
        recorded = phases.read()
    with (case / "work" / "phases.tsv").open("a") as phases:  # skipped: no time was left
        phases.write("models host time\thost\t-\t438\t0\t12\tnot run: no time left in the "
                     "budget\n")
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    assert "models host time" not in verdict.text and "### Host time" not in text
    assert "| models host time | not run | 0 | 12 | not run: no time left in the budget |" in text
    (case / "work" / "phases.tsv").write_text(recorded)
    row = {"status": "ok", "kernels": 51, "ms": 2.5, "ms_p20": 2.4, "ms_p80": 2.7,
           "us_per_kernel": 49.0}
    report = {"model": "patnet_t2", "batch": 256, "size": 224, "repeat": 20, "train": False,
              "device": "NVIDIA H200", "kernels_run": True,
              "providers": {"eager": dict(row, kernels=220, ms=1.9), "triton": row}}
    (case / "work" / "models" / "host_time.json").write_text(
        json.dumps({"models": {"patnet_t2": report}}))
    with (case / "work" / "phases.tsv").open("a") as phases:
        phases.write("models host time\thost\t0\t438\t5\t12\t\n")
    text, _ = gpu_report.summarize(case / "work", case / "results")
    assert "### Host time per forward" in text
    assert host_time.format_table(report) in text
    models = json.loads((case / "results" / "models.json").read_text())
    assert models["host_time"]["models"]["patnet_t2"]["providers"]["triton"]["ms"] == 2.5
    report["providers"]["triton"] = {"status": "error", "reason": "RuntimeError: boom"}
    (case / "work" / "models" / "host_time.json").write_text(
        json.dumps({"models": {"patnet_t2": report}}))
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    assert "host time patnet_t2, triton: RuntimeError: boom" in text
    assert "benchmark errors" in verdict.text


def test_report_shows_the_machine_rates(tmp_path):
    """The machine rates (benchmarks/machine_rates.py, first in the benchmark phase): a line in
    SUMMARY.md, the report in ops.json, which the traffic model's --rates reads; a rates step
    that failed without its JSON is a benchmark error."""
    from benchmarks import traffic

    case = _case(tmp_path, "cut_run")
    with (case / "work" / "phases.tsv").open("a") as phases:
        phases.write("machine rates\trates\t1\t288\t9\t25\t\n")
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    assert "machine rates: exited 1" in text and "## Machine rates" not in text
    rates = {"benchmark": "machine_rates", "copy": {"gbps": 4244.2},
             "matmul": {"float16": {"tflops": 790.4}, "bfloat16": {"tflops": 781.0}},
             "l2_read": {"gbps": 10512.0}}
    (case / "work" / "ops" / "machine_rates.json").write_text(json.dumps(rates))
    text, _ = gpu_report.summarize(case / "work", case / "results")
    assert ("Measured (benchmarks/machine_rates.py): copy 4,244 GB/s, float16 matmul 790 "
            "TFLOP/s, bfloat16 matmul 781 TFLOP/s, L2 read 10,512 GB/s.") in text
    assert "machine rates: exited 1" not in text  # (its JSON is there: it ran)
    ops = case / "results" / "ops.json"
    assert json.loads(ops.read_text())["machine_rates"] == rates
    args = traffic.parse_args(["--models", "patnet_t2", "--rates", str(ops)])
    assert (args.copy_gbps, args.matmul_tflops, args.l2_gbps) == (4244.2, 790.4, 10512.0)


def test_report_of_the_precompile(tmp_path):
    """The background precompile's row: stopped by the script when the benchmarks start (how
    far it got in the note), or done; neither fails nor leaves the run incomplete."""
    case = _case(tmp_path, "cut_run")
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    with (case / "work" / "phases.tsv").open("a") as phases:
        phases.write("precompile\tprecompile\t143\t3\t284\t-\t[ 97] _pointwise_mlp_kernel"
                     "     4.2 s\tconsole/precompile.txt\n")
    stopped, after = gpu_report.summarize(case / "work", case / "results")
    assert ("| precompile | stopped when the benchmarks started | 284 | - | [ 97] "
            "_pointwise_mlp_kernel     4.2 s |") in stopped
    assert after.text == verdict.text and after.code == verdict.code


def test_report_of_a_run_cut_by_its_time_limits(tmp_path):
    case = _case(tmp_path, "cut_run")
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    assert verdict.code == 1
    assert "2 triton tests failed" in verdict.text and "1 cuda tests failed" in verdict.text
    assert "Not run: 2 triton tests" in verdict.text
    assert "models amp channels_last (cut: time limit)" in verdict.text
    # counts per backend, the cut test phase, the test running when it was cut
    assert "| Triton | 8 | 2 | 1 | 1 | 1 | 1 | 0 | 2 | 3 |" in text
    assert "| CUDA | 2 | 1 | 1 | 0 | 0 | 0 | 0 | 0 | 0 |" in text
    assert "| triton tests | cut: killed at its time limit | 183 | 183 |" in text
    assert "running when the run was stopped (not run): `" + FAKE + "test_sleeps_on_request`" in text
    # the failures with the first lines of their errors, a crashed worker among them
    assert "  > AssertionError: arithmetic is broken\n  > assert 2 == 3" in text
    assert "(error outside the test: setup or teardown)" in text
    assert "worker 'gw1' crashed while running" in text
    assert "left out (2): CPU machines' ahead-of-time compile check" in text
    # the op tables: µs and speed-up vs eager; a cut report says so; targets and geomeans
    assert "### PConv, pk.partial_conv3x3 (3 of 5 cases, **cut**" in text
    assert "| fasternet_t2.s1 | 256 | fp16 | fwd | 622.9 | 196.8 (3.17x) | 272.6 (2.28x) |" in text
    assert "191.3 (1.62x) MISMATCH" in text
    assert "(torch.compile comparison, 1 of 1 cases, complete)" in text
    assert "fused PAT_ch >= 1.3x torch.compile of the reference at stages 1-3" in text
    assert "cuda: error at 3 cases (fasternet_t2.s1" in text
    assert ("ops channel_attention: exited 1, ending: Traceback (most recent call last): | "
            'File "x", line 1 | ImportError: cannot import name foo') in text
    assert "| ops spatial_attention | not run | 0 | 10 | not run: no time left in the budget |" in text
    # the models: one table of both parts, the cut one flagged
    assert re.search(r"PATNet-T2 +amp-fp16 +channels_last +27,000 +22,300 +0\.83x", text)
    assert "(cut: some modes did not finish)" in text
    assert "NVIDIA H200, driver 580.159.04, torch 2.11.0+cu130" in text
    assert "Versions:" not in text  # (the pinned torch and Triton)
    # the raw reports joined
    ops = json.loads((case / "results" / "ops.json").read_text())["reports"]
    assert set(ops) == {"partial_conv", "rpe_attention", "channel_attention.compile"}
    models = json.loads((case / "results" / "models.json").read_text())
    assert len(models["rows"]) == 3 and len(models["parts"]) == 2


def test_report_says_when_the_gpu_machines_versions_changed():
    """A GPU machine whose torch or Triton is not what CI checks against (aot.py's
    GPU_MACHINE_TORCH / GPU_MACHINE_TRITON) is told to update them; a CPU run is not."""
    from patnet_kernels.triton import aot

    pins = gpu_report.gpu_machine_pins()
    assert pins == {"GPU_MACHINE_TORCH": aot.GPU_MACHINE_TORCH,
                    "GPU_MACHINE_TRITON": aot.GPU_MACHINE_TRITON,
                    "GPU_MACHINE_ARCH": aot.GPU_MACHINE_ARCH}
    same = {"cuda_available": True, "torch": aot.GPU_MACHINE_TORCH + "+cu130",
            "triton": aot.GPU_MACHINE_TRITON}
    assert gpu_report.pins_mismatch(same) is None
    newer = gpu_report.pins_mismatch(dict(same, triton="9.9.0"))
    assert newer.startswith(f"this machine's Triton 9.9.0 (pinned {aot.GPU_MACHINE_TRITON}) "
                            "differs from what CI") and "GPU_MACHINE_TRITON" in newer
    both = gpu_report.pins_mismatch(dict(same, torch="9.9.0+cu130", triton="9.9.0"))
    assert "torch 9.9.0 (pinned" in both and " differ from" in both
    assert gpu_report.pins_mismatch(dict(same, cuda_available=False, torch="9.9.0")) is None


def test_the_joined_op_reports_feed_the_auto_rule(tmp_path):
    """ops.json joins the op reports; benchmarks/update_auto_rule.py reads each of them."""
    from benchmarks import update_auto_rule

    case = _case(tmp_path, "cut_run")
    gpu_report.summarize(case / "work", case / "results")
    points = update_auto_rule.collect([case / "results"])
    assert {p["op"] for p in points} == {"partial_conv3x3", "channel_attention",
                                         "rpe_attention"}
    assert all(p["gpu"] == "NVIDIA H200" and "torch" in p["ms"] for p in points)
    assert any(p["source"].endswith("ops.json:channel_attention.compile#patnet_t2.s1")
               for p in points)


def test_report_of_a_failed_build(tmp_path):
    case = _case(tmp_path, "build_failed")
    text, verdict = gpu_report.summarize(case / "work", case / "results")
    assert verdict.code == 1 and "the CUDA extension did not build" in verdict.text
    assert "Not run: 2 cuda tests" in verdict.text
    assert "| CUDA | 2 | 0 | 0 | 0 | 0 | 0 | 0 | 2 | 0 |" in text
    assert "**Failed** (exit 1, 41 s): nothing of the CUDA backend ran" in text
    assert "error: no matching function for call to ‘c10::cuda::CUDAGuard::CUDAGuard" in text
    assert "| cuda tests | not run: the CUDA build failed (build.log); collected only |" in text


def test_log_lines_cut_by_a_kill_are_skipped():
    records = gpu_report.read_jsonl(DATA / "cut_run" / "results" / "tests.jsonl")
    assert records and all("event" in r for r in records)
    assert not any("test_cut_mid_li" in json.dumps(r) for r in records)


def test_summary_command_writes_and_copies_the_folder(tmp_path, capsys):
    case = _case(tmp_path, "cut_run")
    out = tmp_path / "out"
    code = gpu_report.main(["summary", "--work", str(case / "work"), "--results",
                            str(case / "results"), "--out", str(out)])
    assert code == 1 and "summary: FAILED" in capsys.readouterr().out
    copied = sorted(p.name for p in (out / "results").iterdir())
    assert copied == sorted(p.name for p in (case / "results").iterdir()
                            if p.name in gpu_report.RESULT_FILES)
    assert len(gpu_report.RESULT_FILES) <= 8 and "SUMMARY.md" in copied


def test_summary_of_nothing_still_says_so(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "env.json").write_text('{"cuda_available": true}')
    args = ["summary", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    assert gpu_report.main(args + ["--partial"]) == 2  # while the run goes on
    text = (tmp_path / "results" / "SUMMARY.md").read_text()
    assert "**SO FAR (the run goes on): nothing failed yet.**" in text
    assert gpu_report.main(args) == 1
    text = (tmp_path / "results" / "SUMMARY.md").read_text()
    assert "FAILED" in text and "no phase ran" in text
    (tmp_path / "work" / "env.json").unlink()  # the preflight itself failed
    assert gpu_report.main(args) == 1
    assert "the preflight (env) step failed" in (tmp_path / "results" / "SUMMARY.md").read_text()


def test_status_line(tmp_path, capsys):
    case = _case(tmp_path, "cut_run")
    gpu_report.main(["status", "--work", str(case / "work"), "--results", str(case / "results"),
                     "--phase", "triton"])
    assert capsys.readouterr().out.strip() == (
        "Triton tests: 6 done (2 passed, 1 failed, 1 error, 1 skipped, 1 xfailed); 2 to go")


def test_env_facts(tmp_path, capsys):
    code = gpu_report.main(["env", "--work", str(tmp_path), "--results", str(tmp_path / "r"),
                            "--commit", "abc1234", "--allow-cpu"])
    facts = dict(line.split("=", 1) for line in capsys.readouterr().out.split())
    assert code == 0 and facts["CUDA_OK"] == ("1" if facts["GPU_SLUG"] != "cpu" else "0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", facts["DATE"])
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] and env["packages"]["torch"] and "easydict" in env["packages"]
    assert env["commit"] != "unknown"
    assert "packages:" in (tmp_path / "r" / "env.txt").read_text()


def test_the_script_and_the_report_agree_on_the_files():
    """The script clears and copies the same eight files as the report writer."""
    text = SCRIPT.read_text()
    lists = re.findall(r"for f in ((?:[\w.]+ ){7}[\w.]+); do", text)
    assert lists and all(tuple(found.split()) == gpu_report.RESULT_FILES for found in lists)


# --------------------------------------------------------------------------- the script
pytestmark_bash = pytest.mark.skipif(BASH is None, reason="needs bash")


@pytestmark_bash
def test_help():
    proc = _script("--help")
    assert proc.returncode == 0
    for option in ("--budget", "--quick", "--out DIR", "--results DIR", "--commit", "--dry-run",
                   "benchmarks/results/<gpu>-<date>", "SUMMARY.md"):
        assert option in proc.stdout, option


@pytestmark_bash
@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--budget", "ten"], "--budget needs a whole number"),
    (["--budget", "30"], "--budget must be at least 60"),
    (["--out"], "--out needs a value"),
])
def test_bad_arguments_are_refused(args, message):
    proc = _script(*args)
    assert proc.returncode == 2 and message in proc.stderr


@pytestmark_bash
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    results = tmp_path / "results"
    proc = _script("--dry-run", "--results", str(results))
    out = proc.stdout
    assert proc.returncode == 0 and not results.exists() and "nothing is run" in out
    for text in ("1. preflight", "2. CUDA build, in the background",
                 "2. precompile, in the background until the benchmarks start",
                 "3. Triton tests, until 189s",
                 "4. CUDA tests", "5. op benchmarks", "6. model benchmark, until 438s",
                 "7. summary"):
        assert text in out, text
    assert re.search(r"-m not\\ slow -k not\\ cuda .*--timeout 120 --maxfail 50 tests", out)
    assert re.search(r"cuda tests .*-k cuda ", out)
    for family in ("partial_conv", "channel_attention", "rpe_attention", "spatial_attention"):
        assert f"benchmarks.bench_{family} --json" in out and f"ops {family} compile" in out
    assert "--batches 256 --dtypes float16\\,bfloat16 --modes fwd\\,fwd+bwd" in out
    assert "--shapes cls --providers torch\\,sdpa\\,triton\\,cuda" in out
    assert "--precisions fp32 --layouts nchw" in out
    assert "--precisions amp --amp-dtype float16 --layouts channels_last" in out
    assert "benchmarks.host_time --models patnet_t2\\,fasternet_t2" in out
    assert "benchmarks.bench_batch_norm_act --json" in out
    # the precompile's command parses (its models, kinds, precisions and layouts exist)
    from benchmarks import precompile
    line = next(line for line in out.splitlines() if "2. precompile" in line)
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[1:3] == ["-m", "benchmarks.precompile"], argv
    args = precompile.parse_args(argv[3:])
    assert args.kinds == ["inference", "training"] and args.batch == [256] and args.jobs == 2
    quick = _script("--dry-run", "--quick", "--no-tests").stdout
    assert "budget 240s" in quick and "bfloat16" not in quick and "3. Triton" not in quick
    # without the tests it is a phase of its own, before the benchmarks, on every CPU
    assert re.search(r"    precompile +by +48s: .*benchmarks\.precompile .*--precisions fp16 "
                     r"--layouts channels_last\\,nchw --jobs \d+", quick), quick


def _dry_run_commands(*args) -> dict:
    """Phase name -> (deadline in s, argv) of the commands --dry-run prints."""
    proc = _script("--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    commands = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"^    (\S.*?)\s+by\s+(-?\d+)s: (.+)$", line)
        if match:
            commands[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3)))
    return commands


@pytestmark_bash
def test_the_planned_benchmark_commands_are_valid():
    """Each benchmark command of the plan parses with its script's own parser, and names
    providers, shapes, dtypes, modes, models, precisions and layouts the script has; the
    deadlines follow the phases and leave the summary its time."""
    import patnet
    from benchmarks import bench_models
    from benchmarks.op_cli import parse_args
    from benchmarks.op_family import MODES
    from benchmarks.report import split_list
    from benchmarks.tolerance import DTYPES

    commands = _dry_run_commands()
    assert [name for name in commands][:2] == ["triton tests", "cuda tests"]
    deadlines = [deadline for deadline, _ in commands.values()]
    assert deadlines[:2] == [189, 288] and max(deadlines) == 450 - 12
    for name, (_, argv) in commands.items():
        if argv[1:3] == ["-m", "pytest"]:
            continue
        assert argv[0] == sys.executable and argv[1] == "-m", name
        module = importlib.import_module(argv[2])
        if argv[2] == "benchmarks.host_time":
            from benchmarks import host_time
            args = host_time.parse_args(argv[3:])  # (exits on a bad option or name)
            assert args.json is not None and args.json.name == "host_time.json", name
            continue
        if argv[2] == "benchmarks.machine_rates":
            args = module.parse_args(argv[3:])
            assert args.json.endswith("/ops/machine_rates.json") and not args.quick, name
            continue
        if argv[2] == "benchmarks.bench_models":
            args = bench_models.parse_args(argv[3:])
            bench_models._choose(args.models, patnet.list_models(), "models")
            bench_models._choose(args.providers, bench_models.PROVIDERS, "providers")
            bench_models._choose(args.precisions, bench_models.PRECISIONS, "precisions")
            bench_models._choose(args.layouts, list(bench_models.LAYOUTS), "layouts")
            continue
        family = module.FAMILY
        args = parse_args(family, argv[3:])
        assert set(split_list(args.providers)) <= set(family.providers), name
        assert all(d in DTYPES for d in split_list(args.dtypes)), name
        assert set(split_list(args.modes)) <= set(MODES), name
        if args.shapes:
            names = [shape.name for shape in family.shapes(False)]
            for wanted in split_list(args.shapes):
                assert any(wanted in n for n in names), (name, wanted, names)


@pytestmark_bash
def test_gpu_stack_check_script_parses_and_reads_the_pins():
    """scripts/gpu_stack_check.sh (the GPU machines' torch and Triton on a CPU machine; it
    installs 5 GB, so it is not run here) is valid bash and takes its versions from the pins."""
    script = REPO / "scripts" / "gpu_stack_check.sh"
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "gpu_machine_pins()" in text and '"triton==$TRITON_VERSION"' in text
    assert '--arch "$ARCH"' in text and '"torch==$TORCH_VERSION"' in text


@pytestmark_bash
@pytest.mark.skipif(torch.version.cuda is not None, reason="the run's CUDA build must fail, as "
                    "on a CPU PyTorch (a CUDA build of torch with a toolkit JIT-builds it here)")
def test_a_whole_run_on_the_cpu(tmp_path):
    """The script end to end on the fake suite: the background build fails (a CPU PyTorch), the
    Triton part runs and records its failures with tracebacks, the CUDA part is counted as not
    run, SUMMARY.md says so, the folder is copied to --out, and the exit status is 1."""
    results, out = tmp_path / "results" / "cpu-run", tmp_path / "out"
    proc = _script("--allow-cpu", "--no-bench", "--budget", "300", "--tests", str(SUITE),
                   "--pytest-args", f"--confcutdir {SUITE.parent} -p no:cacheprovider",
                   "--results", str(results), "--work", str(tmp_path / "work"),
                   "--out", str(out), "--workers", "1", timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "CUDA build: FAILED" in log and "summary" in log
    summary = (results / "SUMMARY.md").read_text()
    assert "FAILED: the CUDA extension did not build; 2 triton tests failed" in summary
    assert "| Triton | 8 | 4 | 1 | 1 | 1 | 1 | 0 | 0 | 0 |" in summary
    assert "| CUDA | 2 | 0 | 0 | 0 | 0 | 0 | 0 | 2 | 0 |" in summary
    assert "this PyTorch is a CPU build" in summary  # the build's error, from build.log
    failures = (results / "failures.txt").read_text()
    assert ">       assert value == 3, \"arithmetic is broken\"" in failures  # the traceback
    assert "ERROR at setup " + FAKE + "test_setup_error" in failures
    phases = {r["phase"] for r in gpu_report.read_jsonl(results / "tests.jsonl")}
    assert phases == {"triton", "cuda"}
    files = sorted(p.name for p in results.iterdir())
    assert set(files) <= set(gpu_report.RESULT_FILES) and "log.txt" in files
    assert sorted(p.name for p in (out / "cpu-run").iterdir()) == files
    assert "===================== triton tests: exit 1" in (results / "log.txt").read_text()
