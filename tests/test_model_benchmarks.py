"""CPU smoke test of the whole-model benchmark (benchmarks/bench_models.py).

Two small models at 64 x 64, batch 1, one thread, 1 warm-up + 2 timed calls, every provider
(``compile`` with torch.compile's ``eager`` backend: Dynamo traces the model, nothing is
compiled to code, which would take minutes on the CPU): the JSON, CSV and PNG must be written
with one row per model and provider, numbers consistent with each other, and the table printed.
A provider that fails is recorded, not fatal; --merge joins split runs.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (scripts/install.sh test "
                                         "installs it): the benchmark's plot cannot be checked")

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks import bench_models  # noqa: E402

MODELS = ["fasternet_t0", "patnet_t0"]
TINY = ["--device", "cpu", "--size", "64", "--warmup", "1", "--runs", "2"]


def _run(argv):
    """(exit code, printed text) of bench_models.main(argv)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = bench_models.main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("models") / "smoke"
    code, printed = _run(["--models", ",".join(MODELS), "--compile-backend", "eager",
                          "--out", str(prefix)] + TINY)
    return code, printed, prefix


def test_smoke_run_writes_json_csv_and_plot(smoke):
    code, printed, prefix = smoke
    assert code == 0, printed
    report = json.loads(Path(f"{prefix}.json").read_text())
    assert report["complete"] and report["device"].startswith("CPU")
    assert report["device_type"] == "cpu" and report["torch"] and report["git_commit"]
    assert "triton" in report and "cuda" in report
    settings = report["settings"]
    assert settings["models"] == MODELS and settings["providers"] == ["eager", "compile", "ours"]
    assert (settings["batch"], settings["image_size"], settings["threads"]) == (1, 64, 1)
    assert (settings["warmup"], settings["runs"]) == (1, 2)
    assert settings["precisions"] == ["fp32"] and settings["layouts"] == ["nchw"]
    assert settings["ours"] == "patnet.optimize_for_inference(model, backend='auto')"
    assert [(r["model"], r["precision"], r["layout"]) for r in report["rows"]] == \
        [(m, "fp32", "nchw") for m in MODELS]
    for row in report["rows"]:
        assert row["batch"] == 1 and row["image_size"] == 64
        entries = row["providers"]
        assert list(entries) == ["eager", "compile", "ours"]
        for provider, e in entries.items():
            assert e["status"] == "ok", (row["model"], provider, e)
            assert 0 < e["min_ms"] <= e["median_ms"] and e["min_ms"] <= e["mean_ms"]
            assert math.isclose(e["images_per_s"], 1e3 / e["mean_ms"])
            assert math.isclose(e["speedup_vs_eager"], entries["eager"]["mean_ms"] / e["mean_ms"])
            assert math.isclose(e["speedup_vs_compile"],
                                entries["compile"]["mean_ms"] / e["mean_ms"])
            assert e["max_rel_error"] <= 1e-4 and e["first_call_s"] > 0
        assert entries["eager"]["max_rel_error"] == 0
        assert entries["ours"]["backends"] and "backends" not in entries["eager"]
        assert entries["compile"]["compile_s"] == entries["compile"]["first_call_s"]
        assert "compile_s" not in entries["ours"]

    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["provider"]) for r in rows] == \
        [(m, p) for m in MODELS for p in ("eager", "compile", "ours")]
    for r in rows:
        assert r["device"] == report["device"] and r["git_commit"] == report["git_commit"]
        assert r["status"] == "ok" and float(r["mean_ms"]) > 0 and float(r["images_per_s"]) > 0
        assert (r["batch"], r["precision"], r["layout"], r["threads"]) == ("1", "fp32", "nchw",
                                                                             "1")
        assert (r["warmup"], r["runs"]) == ("1", "2")
        assert bool(r["backends"]) == (r["provider"] == "ours")
    png = Path(f"{prefix}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)

    assert "[1/2] FasterNet-T0 fp32 nchw" in printed and "[2/2] PATNet-T0 fp32 nchw" in printed
    header = next(line for line in printed.splitlines() if line.startswith("model "))
    for column in ("eager ms", "compile ms", "ours ms", "ours vs eager", "ours vs compile",
                   "ours err", "compile s"):
        assert column in header
    assert "FasterNet-T0  fp32" in printed and "PATNet-T0     fp32" in printed
    assert f"{prefix}.json" in printed and str(png) in printed
    assert "ours on PATNet-T0: backends " in printed


def test_failing_provider_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """An exception reads "error: ..." (exit 1, the other providers measured); a backend that
    cannot run reads "unavailable: <reason>" (exit 0); where eager fails, the others read
    "skipped"."""
    def broken(model, backend, **options):
        raise RuntimeError("kernel crashed (test)")

    monkeypatch.setattr(patnet, "optimize_for_inference", broken)
    prefix = tmp_path / "broken"
    code, printed = _run(["--models", "fasternet_t0", "--providers", "eager,ours",
                          "--out", str(prefix)] + TINY)
    assert code == 1
    report = json.loads(Path(f"{prefix}.json").read_text())
    entries = report["rows"][0]["providers"]
    assert entries["eager"]["status"] == "ok"
    assert entries["ours"]["status"] == "error"
    assert entries["ours"]["reason"] == "RuntimeError: kernel crashed (test)"
    assert "ours: error: RuntimeError: kernel crashed (test)" in printed
    assert report["complete"] and Path(f"{prefix}.png").is_file()

    def unavailable(model, backend, **options):
        raise pk.BackendUnavailableError("no kernel here (test)")

    monkeypatch.setattr(patnet, "optimize_for_inference", unavailable)
    code, printed = _run(["--models", "fasternet_t0", "--providers", "eager,ours",
                          "--out", str(prefix)] + TINY)
    assert code == 0
    entry = json.loads(Path(f"{prefix}.json").read_text())["rows"][0]["providers"]["ours"]
    assert entry == {"status": "unavailable", "reason": "no kernel here (test)"}
    assert "ours: unavailable: no kernel here (test)" in printed

    # where eager fails (images below the models' 32 x 32 minimum), nothing can be checked
    code, printed = _run(["--models", "fasternet_t0", "--providers", "eager,ours",
                          "--out", str(prefix)] + TINY + ["--size", "16"])
    assert code == 1
    entries = json.loads(Path(f"{prefix}.json").read_text())["rows"][0]["providers"]
    assert entries["eager"]["status"] == "error"
    assert entries["ours"] == {"status": "skipped",
                               "reason": "the eager reference failed in this mode"}


def test_merge_joins_split_runs(smoke, tmp_path):
    _, _, first = smoke
    second = tmp_path / "second"
    code, _ = _run(["--models", "patnet_t0", "--providers", "eager,ours", "--layouts",
                    "channels_last", "--out", str(second)] + TINY)
    assert code == 0
    merged = tmp_path / "merged"
    code, printed = _run(["--merge", f"{first}.json", f"{second}.json", "--out", str(merged)])
    assert code == 0
    report = json.loads(Path(f"{merged}.json").read_text())
    assert [(r["model"], r["layout"]) for r in report["rows"]] == \
        [("fasternet_t0", "nchw"), ("patnet_t0", "nchw"), ("patnet_t0", "channels_last")]
    assert report["settings"]["providers"] == ["eager", "compile", "ours"]
    assert report["settings"]["models"] == MODELS
    assert report["settings"]["layouts"] == ["nchw", "channels_last"]
    assert [p["file"] for p in report["parts"]] == [f"{first}.json", f"{second}.json"]
    with open(f"{merged}.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3 + 3 + 2
    assert Path(f"{merged}.png").is_file() and "channels_last" in printed


def test_local_results_are_ignored_by_git():
    """CPU runs write benchmarks/results/models.cpu.local.{json,csv,png}, which git ignores."""
    prefix = bench_models._default_prefix("cpu", "CPU whatever")
    assert prefix.name == "models.cpu.local"
    assert bench_models._default_prefix("cuda", "NVIDIA H100 80GB HBM3").name == \
        "models.nvidia-h100-80gb-hbm3"
    ignored = (bench_models.REPO / ".gitignore").read_text().split()
    for ext in ("json", "csv", "png"):
        assert f"/benchmarks/results/*.local.{ext}" in ignored


def test_ours_backend_is_the_inference_models(tmp_path):
    """``--ours-backend NAME`` builds "ours" as optimize_for_inference(model, NAME) (here
    "torch", fast on the CPU; gpu_check.sh asks for "triton"): the settings and its backend
    plan say so."""
    prefix = tmp_path / "named"
    code, printed = _run(["--models", "fasternet_t0", "--providers", "eager,ours",
                          "--ours-backend", "torch", "--out", str(prefix)] + TINY)
    assert code == 0, printed
    report = json.loads(Path(f"{prefix}.json").read_text())
    assert report["settings"]["ours"] == \
        "patnet.optimize_for_inference(model, backend='torch')"
    ours = report["rows"][0]["providers"]["ours"]
    assert ours["status"] == "ok" and set(ours["backends"].values()) == {"torch"}


def test_compile_max_autotune_is_a_gpu_provider(tmp_path):
    """``compile-max`` (torch.compile mode="max-autotune") runs when asked for; on the CPU it
    reads "skipped" with the reason, and the run goes on."""
    prefix = tmp_path / "max"
    code, printed = _run(["--models", "fasternet_t0", "--providers", "eager,compile-max",
                          "--out", str(prefix)] + TINY)
    assert code == 0, printed
    report = json.loads(Path(f"{prefix}.json").read_text())
    assert report["settings"]["providers"] == ["eager", "compile-max"]
    entry = report["rows"][0]["providers"]["compile-max"]
    assert entry["status"] == "skipped" and "max-autotune tunes GPU kernels" in entry["reason"]


def test_gpu_rows_are_set_against_the_traffic_models_roofline(tmp_path):
    """On a GPU, each mixed-precision row at the roofline's batch and size is printed beside
    the committed traffic model's lower bound in its layout (eager's and ours, the Triton
    path's, and the floor's); other rows, and a report without that model or layout, add
    nothing."""
    from benchmarks import model_report

    def row(precision="amp", batch=256, size=224, model="patnet_t2"):
        return {"model": model, "model_name": "PATNet-T2", "precision": precision,
                "layout": "channels_last", "batch": batch, "image_size": size,
                "providers": {"eager": {"mean_ms": 6.0}, "ours": {"mean_ms": 2.0}}}

    roofline = tmp_path / "roofline.json"
    roofline.write_text(json.dumps({"models": {"patnet_t2": {
        "size": 224, "roofline": {"rates": {"batch": 256}, "floor": {"ms": 0.5}},
        "providers": {"eager": {"roofline": {"ms": 3.0}},
                      "triton": {"roofline": {"ms": 1.0}}}}}}))
    paths = {"channels_last": roofline, "nchw": tmp_path / "missing.json"}
    lines = model_report.roofline_lines({"rows": [row()]}, paths)
    assert lines[-1] == ("  PATNet-T2 amp channels_last: eager 6.00 ms = 2.0x its 3.000; "
                         "ours 2.00 ms = 2.0x its 1.000; floor 0.500 ms")
    for other in (row("fp32"), row(batch=64), row(size=128), row(model="patnet_s")):
        assert model_report.roofline_lines({"rows": [other]}, paths) == []
    nchw = dict(row(), layout="nchw")  # (its layout's report is missing)
    assert model_report.roofline_lines({"rows": [nchw]}, paths) == []
    for layout in ("channels_last", "nchw"):  # (the committed reports, one per layout)
        committed = model_report.roofline_lines({"rows": [dict(row(), layout=layout)]})
        assert committed and f"PATNet-T2 amp {layout}: eager 6.00 ms" in committed[-1]


def test_gpu_report_evaluates_the_issues_model_targets():
    """The whole-model targets of issues 13 and 14 (AMP channels_last rows at batch 256, 224 x
    224): ours is the fastest of our providers measured, a failed or missing one is "not
    measured", PATNet-T2 is set against FasterNet-T2's ours; off an H100 / H200 they are for
    information only; a report without such rows adds nothing."""
    from benchmarks import model_report

    def row(model, layout="channels_last", **speeds):
        return {"model": model, "precision": "amp", "layout": layout, "batch": 256,
                "image_size": 224, "providers": {
                    p.replace("_", "-"): {"status": "ok", "images_per_s": v}
                    for p, v in speeds.items()}}

    patnet = row("patnet_t2", eager=30000, ours=60000, ours_graph=80000)
    patnet["providers"]["compile-max"] = {"status": "error", "images_per_s": None}
    report = {"device": "NVIDIA H200", "rows": [patnet, row("fasternet_t2", eager=36000,
                                                               ours=50000, compile_max=40000)]}
    lines = model_report.target_lines(report)
    assert "information only" not in lines[1]
    assert lines[2] == ("  issue 13: PATNet-T2 ours >= 1.5x eager: met: 2.67x "
                        "(ours-graph 80,000 img/s, eager 30,000)")
    assert lines[4] == "  issue 14: PATNet-T2 ours >= 1.5x compile-max: not measured"
    assert lines[5].startswith("  issue 14: FasterNet-T2 ours >= 2.5x eager: NOT met: 1.39x")
    assert lines[6].startswith("  issue 14: FasterNet-T2 ours >= 1.5x compile-max: NOT met: "
                               "1.25x")
    assert lines[7].startswith("  issue 14: PATNet-T2 ours >= 1.25x FasterNet-T2 ours: met: "
                               "1.60x")
    assert len(lines) == 8
    a100 = dict(report, device="NVIDIA A100-SXM4-80GB")
    assert "information only on NVIDIA A100" in model_report.target_lines(a100)[1]
    assert model_report.target_lines({"device": "NVIDIA H200", "rows": [
        row("patnet_t2", layout="nchw", eager=1.0, ours=2.0)]}) == []
