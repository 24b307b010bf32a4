"""CPU smoke test of the training-step benchmark (benchmarks/bench_train.py): eager against ours
on Triton (under the interpreter), FasterNet-T0 at 32 x 32, batch 2, one timed step each; the
check that compares ours' logits and gradients with eager's, and that it flags a wrong one; the
command line's defaults and refusals; the table."""
from __future__ import annotations

import contextlib
import io
import json
import time

import pytest
import torch

from benchmarks import bench_train

from conftest import fused_backend_unavailable

TINY = ["--models", "fasternet_t0", "--device", "cpu", "--size", "32", "--batch", "2"]


def _needs_triton():
    reason = fused_backend_unavailable("triton")
    if reason:
        pytest.skip(reason)


def test_runs_checks_and_writes_json(tmp_path):
    _needs_triton()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = bench_train.main(TINY + ["--json", str(tmp_path / "train.json")])
    assert code == 0
    report = json.loads((tmp_path / "train.json").read_text())["models"]["fasternet_t0"]
    assert (report["batch"], report["size"], report["amp"], report["layout"], report["backend"]) \
        == (2, 32, "none", "nchw", "triton")
    eager, ours = report["providers"]["eager"], report["providers"]["ours"]
    assert eager["status"] == ours["status"] == "ok", ours
    for row in (eager, ours):
        assert row["mean_ms"] > 0 and row["images_per_s"] == pytest.approx(
            2 / (row["mean_ms"] * 1e-3))
    assert ours["speedup_vs_eager"] == pytest.approx(eager["mean_ms"] / ours["mean_ms"])
    assert eager["speedup_vs_eager"] == 1.0
    # the check: ours' logits and gradients as close to float64's as eager's (fp32: within
    # 4x eager's error, which the small input's BatchNorms make 1e-3 here)
    checked = ours["check"]
    assert 0 < checked["error"] <= checked["budget"] == pytest.approx(
        bench_train.CHECK_FACTOR * checked["eager_error"])
    assert checked["eager_error"] < 1e-2 and checked["error"] == ours["error_vs_float64"]
    assert eager["error_vs_float64"] == checked["eager_error"]
    assert checked["worst"] == "logits" or checked["worst"].split(".")[0] in (
        "patch_embed", "stages", "avgpool_pre_head", "head")
    assert ours["backends"]["partial_conv3x3"] == "triton"
    text = printed.getvalue()
    assert "FasterNet-T0 training step, batch 2 at 32 x 32, fp32" in text
    assert "ours (triton)" in text and "x eager" in text


def test_check_flags_a_wrong_gradient(monkeypatch):
    """A model whose gradients are not eager's (one weight of ours changed) is caught by the
    check, and its row marked a mismatch, naming the worst tensor (ours here on the reference
    backend, and its steps not run: the check's arithmetic is the backends')."""
    models = bench_train._models

    def wrong(*args, **kwargs):
        built = models(*args, **kwargs)
        with torch.no_grad():
            built["ours"].stages[0].blocks[0].mlp[0].weight.mul_(3.0)
        return built

    monkeypatch.setattr(bench_train, "_models", wrong)
    monkeypatch.setattr(bench_train, "_trainer", lambda *args: (lambda: time.sleep(1e-4)))
    args = bench_train.parse_args(TINY + ["--backend", "torch"])
    report = bench_train.measure("fasternet_t0", args, torch.device("cpu"))
    ours = report["providers"]["ours"]
    assert ours["status"] == "mismatch" and ours["check"]["error"] > 0.1, ours
    assert ours["mean_ms"] > 0  # (timed all the same, as the model benchmark does)
    assert ours["check"]["worst"] in ours["reason"]
    assert "mismatch" in bench_train.format_table(report)


def test_command_line():
    args = bench_train.parse_args(["--device", "cpu"])
    assert (args.models, args.backend, args.batch, args.size, args.amp, args.layout,
            args.warmup, args.runs) == (["patnet_t2", "fasternet_t2"], "triton", 4, 64, "none",
                                        "nchw", 0, 1)
    for bad in (["--batch", "1"], ["--check-batch", "1"], ["--size", "16"], ["--models", "resnet50"], ["--runs", "0"],
                ["--backend", "numpy"], ["--amp", "float64"]):
        with pytest.raises(SystemExit):
            bench_train.parse_args(["--device", "cpu"] + bad)


def test_table_of_a_provider_that_cannot_run():
    report = {"model": "patnet_t2", "batch": 128, "size": 224, "amp": "bfloat16",
              "layout": "channels_last", "backend": "cuda", "device": "NVIDIA H200",
              "runs": 30,
              "providers": {p: {"status": "unavailable", "reason": "no CUDA build\nmore"}
                            for p in bench_train.PROVIDERS}}
    text = bench_train.format_table(report)
    assert text.splitlines()[0] == ("PATNet-T2 training step, batch 128 at 224 x 224, bfloat16 "
                                    "autocast, channels_last, on NVIDIA H200 (mean of 30 steps)")
    assert "eager: unavailable: no CUDA build" in text
    assert "ours (cuda): unavailable: no CUDA build" in text and "more" not in text
