"""Smoke test of the per-op-family benchmarks (benchmarks/bench_*.py and their op_* modules).

Each script runs with --quick on the CPU (Triton under its interpreter, which conftest selects;
the compiling providers, torch.compile and FlexAttention, skipped, as --quick on the CPU says):
the table and the JSON report must hold every provider, shape and mode, with positive times and
GB/s, speed-ups, % copy and TFLOP/s consistent with the times, and the byte (and FLOP) counts of
the documented formulas. The stage shapes of the real networks are checked against SPEC.md
sections 4 and 5 (cheap: read on the meta device). The FlexAttention provider's score_mod is
checked against the reference with eager flex_attention (compiling it on the CPU is too slow).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

import patnet_kernels as pk
from benchmarks import bench_batch_norm_act, bench_channel_attention, bench_partial_conv
from benchmarks import bench_layer_norm_linear, bench_partial_block, bench_pointwise_mlp
from benchmarks import bench_rpe_attention, bench_self_mixer
from benchmarks import bench_spatial_attention, op_cli
from benchmarks.op_cases import run_case
from benchmarks.op_family import MODES
from benchmarks.op_tables import check_targets
from benchmarks.providers import Unavailable
from benchmarks.timer import Timer
from benchmarks.tolerance import MISMATCH

SCRIPTS = {
    "partial_conv": (bench_partial_conv, []),
    # batch 1 too: training PAT_ch needs a batch of 2, so fwd+bwd at batch 1 must read "n/a"
    "channel_attention": (bench_channel_attention, ["--batches", "1,2"]),
    "spatial_attention": (bench_spatial_attention, []),
    "batch_norm_act": (bench_batch_norm_act, []),
    # two shapes (7 x 7 at batch 2, 5 x 9 at batch 1: batches per shape); flex skipped
    "rpe_attention": (bench_rpe_attention, []),
    "pointwise_mlp": (bench_pointwise_mlp, []),  # (fwd only: an inference op)
    "partial_block": (bench_partial_block, []),  # (fwd only: an inference op)
    "layer_norm_linear": (bench_layer_norm_linear, []),  # (fwd only: an inference op)
    "self_mixer": (bench_self_mixer, []),
}
QUICK = ["--quick", "--device", "cpu", "--warmup", "0", "--runs", "2"]
STATUSES = {"ok", "n/a", "unavailable", "skipped"}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_reports_every_case(name, tmp_path, capsys):
    script, extra = SCRIPTS[name]
    family = script.FAMILY
    path = tmp_path / f"{name}.json"
    assert script.main(QUICK + extra + ["--json", str(path)]) == 0
    printed = capsys.readouterr()
    report = json.loads(path.read_text())

    assert report["complete"] and report["benchmark"] == name
    assert report["torch"] and report["git_commit"] and report["device"].startswith("CPU")
    copy_gbps = report["copy_bandwidth"]["gbps"]
    assert copy_gbps > 0
    assert set(report["byte_formulas"]) == set(family.modes)
    if family.flops is not None:
        assert set(report["flop_formulas"]) == set(family.modes)

    shapes = family.shapes(True)
    batches = {s.name: ([1, 2] if extra else family.batches_of(s, True)) for s in shapes}
    expected = {(s.name, b, "fp32", m) for s in shapes for b in batches[s.name]
                for m in family.modes}
    rows = {(r["shape"], r["batch"], r["dtype"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == expected and len(report["rows"]) == len(expected)

    shape_of = {s.name: s for s in shapes}
    for key, row in rows.items():
        assert list(row["providers"]) == family.providers, key
        assert row["bytes"] == family.bytes_moved(shape_of[row["shape"]], row["batch"], 4,
                                                  row["mode"]) > 0
        if family.flops is not None:
            assert row["flops"] == family.flops(shape_of[row["shape"]], row["batch"],
                                                row["mode"]) > 0
        eager = row["providers"]["torch"]
        training_b1 = name == "channel_attention" and row["batch"] == 1 and row["mode"] != "fwd"
        assert eager["status"] == ("n/a" if training_b1 else "ok"), (key, eager)
        for provider in family.compiled_providers:  # skipped in --quick on the CPU
            assert row["providers"][provider]["status"] in ("skipped", "n/a")
        for provider, entry in row["providers"].items():
            assert entry["status"] in STATUSES, (key, provider, entry)
            if entry["status"] != "ok":
                assert entry["reason"] and "ms" not in entry
                continue
            assert 0 < entry["ms_p20"] <= entry["ms"] <= entry["ms_p80"], (key, provider)
            assert close(entry["gbps"], row["bytes"] / (entry["ms"] * 1e-3) / 1e9)
            assert close(entry["pct_copy"], 100 * entry["gbps"] / copy_gbps)
            if family.flops is not None:
                assert close(entry["tflops"], row["flops"] / (entry["ms"] * 1e-3) / 1e12)
            else:
                assert "tflops" not in entry
            for label, base in family.speedups.items():
                base_ms = row["providers"][base].get("ms")  # None: base skipped here
                speedup = entry[f"speedup_vs_{label}"]
                assert (speedup is None) if base_ms is None else close(speedup,
                                                                        base_ms / entry["ms"])
            assert entry["speedup_vs_eager"] is not None
            assert entry["max_rel_error"] <= 1e-3, (key, provider, entry["max_rel_error"])
        if name in ("partial_conv", "pointwise_mlp", "partial_block",
                    "layer_norm_linear", "self_mixer"):  # (Triton kernels: ran)
            assert row["providers"]["triton"]["status"] == "ok", key
            if name == "partial_conv":
                inplace = row["providers"]["triton inplace"]["status"]
                assert inplace == ("ok" if row["mode"] == "fwd" else "n/a"), key
        elif name == "rpe_attention":
            for provider in ("triton", "sdpa"):
                assert row["providers"][provider]["status"] == "ok", (key, provider)
            assert row["providers"]["flex"]["reason"] == "--quick on the CPU"
        else:  # being written: either measured or reported unavailable, never an error
            assert row["providers"]["triton"]["status"] in (("n/a",) if training_b1 else
                                                            ("ok", "unavailable")), key

    table = printed.out
    header = next(line for line in table.splitlines() if line.startswith("shape "))
    columns = ["provider", "time us", "GB/s", "% copy", "status"]
    columns += [f"vs {label}" for label in family.speedups]
    columns += ["TFLOP/s"] if family.flops is not None else []
    for column in columns:
        assert column in header
    assert ("TFLOP/s" in header) == (family.flops is not None)
    for word in family.providers + [s.name for s in shapes] + list(family.modes):
        assert word in table, word
    for row in report["rows"]:
        for entry in row["providers"].values():
            if entry["status"] != "ok":
                assert f"{entry['status']}: {entry['reason'].splitlines()[0]}" in table
    assert "copy bandwidth" in table and str(path) in table
    for provider in family.compiled_providers:
        assert f"note: {provider} is skipped in --quick runs on the CPU" in table
    assert f"[{name} 1/{len(expected)}]" in printed.err  # progress on stderr


def test_unavailable_and_failing_providers_do_not_stop_the_run(tmp_path, capsys):
    """A backend raising BackendUnavailableError reads "unavailable: <reason>"; any other
    exception "error: ..." (the run goes on and exits 1)."""
    family = bench_spatial_attention.FAMILY

    def functional(args, backend):
        if backend == "triton":
            raise pk.BackendUnavailableError("no kernel here (test)")
        return family.functional(args, backend)

    unavailable = dataclasses.replace(family, functional=functional)
    path = tmp_path / "u.json"
    argv = QUICK + ["--shapes", "s1", "--modes", "fwd", "--json", str(path)]
    assert op_cli.run(unavailable, argv) == 0
    assert "unavailable: no kernel here (test)" in capsys.readouterr().out
    entry = json.loads(path.read_text())["rows"][0]["providers"]["triton"]
    assert entry == {"status": "unavailable", "reason": "no kernel here (test)"}

    def broken(args, backend):
        if backend == "triton":
            raise RuntimeError("kernel crashed (test)")
        return family.functional(args, backend)

    failing = dataclasses.replace(family, functional=broken)
    assert op_cli.run(failing, argv) == 1
    assert "error: RuntimeError: kernel crashed (test)" in capsys.readouterr().out
    entry = json.loads(path.read_text())["rows"][0]["providers"]["triton"]
    assert entry["status"] == "error" and json.loads(path.read_text())["complete"]


def test_stage_shapes_are_those_of_the_real_networks():
    """Read off the model code at 224 x 224; must agree with SPEC.md section 5."""
    def table(family):
        return [(s.name, s.channels, s.height, s.split, s.blocks) for s in family.shapes(False)]

    assert table(bench_partial_conv.FAMILY) == [
        ("fasternet_t2.s1", 96, 56, 24, 1), ("fasternet_t2.s2", 192, 28, 48, 2),
        ("fasternet_t2.s3", 384, 14, 96, 8), ("fasternet_t2.s4", 768, 7, 192, 2),
        ("patnet_t2.s4", 512, 7, 128, 4)]
    assert table(bench_channel_attention.FAMILY) == [
        ("patnet_t2.s1", 64, 56, 16, 2), ("patnet_t2.s2", 128, 28, 32, 2),
        ("patnet_t2.s3", 256, 14, 64, 6)]
    assert table(bench_spatial_attention.FAMILY) == [
        ("patnet_t2.s1", 64, 56, 32, 2), ("patnet_t2.s2", 128, 28, 64, 2),
        ("patnet_t2.s3", 256, 14, 128, 6), ("patnet_t2.s4", 512, 7, 256, 4)]
    assert table(bench_pointwise_mlp.FAMILY) == [  # (split: the hidden width, 2C)
        ("patnet_t2.s1", 64, 56, 128, 2), ("patnet_t2.s2", 128, 28, 256, 2),
        ("patnet_t2.s3", 256, 14, 512, 6), ("patnet_t2.s4", 512, 7, 1024, 4),
        ("fasternet_t2.s1", 96, 56, 192, 1), ("fasternet_t2.s2", 192, 28, 384, 2),
        ("fasternet_t2.s3", 384, 14, 768, 8), ("fasternet_t2.s4", 768, 7, 1536, 2),
        ("patnet_t1.s4", 384, 7, 768, 2)]
    assert table(bench_partial_block.FAMILY) == [
        ("fasternet_t2.s1", 96, 56, 24, 1), ("fasternet_t2.s2", 192, 28, 48, 2),
        ("fasternet_t2.s3", 384, 14, 96, 8), ("fasternet_t2.s4", 768, 7, 192, 2),
        ("patnet_t2.s1", 64, 56, 16, 2), ("patnet_t2.s2", 128, 28, 32, 2),
        ("patnet_t2.s3", 256, 14, 64, 6), ("patnet_t1.s1", 48, 56, 12, 1),
        ("patnet_t1.s2", 96, 28, 24, 2), ("patnet_t1.s3", 192, 14, 48, 8)]
    for family in (bench_partial_conv.FAMILY, bench_channel_attention.FAMILY,
                   bench_spatial_attention.FAMILY, bench_pointwise_mlp.FAMILY,
                   bench_partial_block.FAMILY):
        assert all(s.width == s.height for s in family.shapes(False))


def test_rpe_attention_shapes_and_counts():
    """Stage 4 of PATNet-T0, T2, L (heads 4, d = C2 / 4 = 48, 96, 240: SPEC.md section 4) on
    the 7 x 7 map of 224 x 224 (batch 1, 64, 256) and the 25 x 42 map of 800 x 1344 (batch 1,
    8); the FLOP and byte formulas of the README."""
    family = bench_rpe_attention.FAMILY
    shapes = family.shapes(False)
    table = [(s.name, s.channels, s.height, s.width, s.blocks, bench_rpe_attention.dims(s),
              family.batches_of(s, False)) for s in shapes]
    assert table == [
        ("patnet_t0.s4.cls", 192, 7, 7, 2, (4, 49, 48), [1, 64, 256]),
        ("patnet_t2.s4.cls", 384, 7, 7, 4, (4, 49, 96), [1, 64, 256]),
        ("patnet_l.s4.cls", 960, 7, 7, 4, (4, 49, 240), [1, 64, 256]),
        ("patnet_t0.s4.det", 192, 25, 42, 2, (4, 1050, 48), [1, 8]),
        ("patnet_t2.s4.det", 384, 25, 42, 4, (4, 1050, 96), [1, 8]),
        ("patnet_l.s4.det", 960, 25, 42, 4, (4, 1050, 240), [1, 8])]
    t2 = shapes[1]
    assert family.flops(t2, 256, "fwd") == 4 * 256 * 4 * 49 ** 2 * 96
    assert family.flops(t2, 256, "fwd+bwd") == 14 * 256 * 4 * 49 ** 2 * 96
    x = 256 * 4 * 49 * 96
    assert family.bytes_moved(t2, 256, 2, "fwd") == (4 * x + 4 * 81) * 2 + 4 * 49 ** 2
    assert family.bytes_moved(t2, 256, 2, "fwd+bwd") == (11 * x + 3 * 81 * 4) * 2 + 8 * 49 ** 2
    assert family.providers == ["torch", "sdpa", "flex", "triton", "cuda"]


def test_layer_norm_linear_shapes_counts_and_slice(monkeypatch):
    """The PAT_sf blocks of stage 4 of PATNet-T0, T2, L (C = C2 = 3/4 of the block's channels:
    the op's input; split = C1); the byte and FLOP formulas of the README; every provider is
    given the block input and the op gets X2 = x[:, C1:], a view of it, in either layout
    (--layout channels_last lays the block input out channels_last), matching the reference."""
    family = bench_layer_norm_linear.FAMILY
    assert [(s.name, s.channels, s.height, s.width, s.split, s.blocks)
            for s in family.shapes(False)] == [
        ("patnet_t0.s4", 192, 7, 7, 64, 2), ("patnet_t2.s4", 384, 7, 7, 128, 4),
        ("patnet_l.s4", 960, 7, 7, 320, 4)]
    t2 = family.shapes(False)[1]
    assert family.flops(t2, 256, "fwd") == 2 * 256 * 49 * 1152 * 384
    assert family.bytes_moved(t2, 256, 2, "fwd") == (256 * 49 * (384 + 1152) + 1152 * 385) * 2
    assert family.providers == ["torch", "torch.compile", "triton"] and family.modes == ("fwd",)

    seen = []
    op = pk.layer_norm_linear

    def recording(x, *args, **kwargs):
        seen.append((x.shape, x.stride(), x._base is not None))
        return op(x, *args, **kwargs)

    monkeypatch.setattr(pk, "layer_norm_linear", recording)
    shape = family.shapes(True)[0]  # C1 = 16, C2 = 48 on 7 x 7
    c, n = shape.split + shape.channels, shape.height * shape.width
    timer = Timer(torch.device("cpu"), warmup=0, runs=1)
    strides = {"nchw": (c * n, n, shape.width, 1), "channels_last": (c * n, 1, shape.width * c, c)}
    for layout, stride in strides.items():
        seen.clear()
        row = run_case(family, shape, 2, torch.float32, "fwd", ["torch", "triton"], timer,
                       1.0, {}, "default", 0, layout)
        for provider in ("torch", "triton"):
            entry = row["providers"][provider]
            assert entry["status"] == "ok" and entry["max_rel_error"] <= 1e-4, (layout, entry)
        assert seen and set(seen) == {((2, shape.channels, 7, 7), stride, True)}, (layout, seen)


def _rpe_problem(mode, dtype=torch.float32, quick_shape=0, batch=2):
    shape = bench_rpe_attention.FAMILY.shapes(True)[quick_shape]
    gen = torch.Generator().manual_seed(0)
    return shape, bench_rpe_attention.build(shape, batch, dtype, torch.device("cpu"), mode, gen)


@pytest.mark.parametrize("quick_shape", [0, 1])  # 7 x 7 and 5 x 9
def test_rpe_flex_score_mod_matches_the_reference(quick_shape):
    """The table and bucket map captured in score_mod give the reference's output (eager
    flex_attention: the compiled one is the same score_mod, too slow to compile here)."""
    _, problem = _rpe_problem("fwd", quick_shape=quick_shape)
    try:
        flex = bench_rpe_attention.make_flex(problem, compiled=False)
    except Unavailable as e:
        pytest.skip(f"FlexAttention unavailable here: {e.reason}")
    with torch.no_grad():
        out = flex()
        expected = pk.reference.rpe_attention(*problem.args)
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_rpe_flex_without_backward_reads_unavailable():
    """In fwd+bwd on a device where FlexAttention refuses gradients (the CPU, in torch 2.x) the
    provider reads "unavailable: <torch's reason>" instead of failing."""
    _, problem = _rpe_problem("fwd+bwd")
    try:
        bench_rpe_attention.make_flex(problem, compiled=False)
    except Unavailable as e:
        assert e.status == "unavailable" and "FlexAttention" in e.reason
    else:  # (said, not passed silently: the provider then runs, and another test times it)
        pytest.skip("this torch runs FlexAttention's backward on the CPU: no refusal to read")


def test_rpe_low_precision_is_checked_against_the_fp32_reference(tmp_path):
    """With Family.fp32_reference, fp16 cases are compared with the reference in fp32 on the
    upcast inputs: eager's own fp16 error shows (> 0) and the SDPA provider is checked too."""
    family = bench_rpe_attention.FAMILY
    shape, _ = _rpe_problem("fwd")
    timer = Timer(torch.device("cpu"), warmup=0, runs=1)
    for mode in MODES:
        row = run_case(family, shape, 2, torch.float16, mode, ["torch", "sdpa"], timer,
                                1.0, {}, "default", 0)
        assert row["reference"].startswith("reference in fp32"), row
        for provider in ("torch", "sdpa"):
            entry = row["providers"][provider]
            assert entry["status"] == "ok", (mode, provider, entry)
            assert 0 < entry["max_rel_error"] <= MISMATCH[torch.float16]
        assert set(row["providers"]["torch"]) >= {"speedup_vs_eager", "speedup_vs_sdpa",
                                                  "speedup_vs_flex", "tflops"}
        assert row["providers"]["torch"]["speedup_vs_flex"] is None


def test_channels_last_cases_lay_out_every_activation(monkeypatch):
    """--layout channels_last: the activation and a residual of its shape (the MLP op's), each
    a leaf where it was one, and the output's gradient in fwd+bwd, as a channels_last network
    has them; the weights as they are."""
    from benchmarks import op_cases
    from benchmarks.op_inputs import channels_last

    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    shape = bench_pointwise_mlp.shapes(True)[0]
    problem = bench_pointwise_mlp.build(shape, 2, torch.float32, cpu, "fwd", gen)
    moved = channels_last(problem)
    x, w1, _, _, _, residual, _ = moved.args[:7]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert residual.is_contiguous(memory_format=torch.channels_last)
    assert w1 is problem.args[1] and torch.equal(residual, problem.args[5])
    shape = bench_partial_conv.shapes(True)[0]
    problem = bench_partial_conv.FAMILY.build(shape, 2, torch.float32, cpu, "fwd+bwd", gen)
    moved = channels_last(problem)
    assert moved.leaves[0] is moved.args[0] and moved.args[0].requires_grad
    layouts = []
    outputs = op_cases.op_parity.outputs

    def recorded(mode, impl, leaves, grad_out):
        layouts.append(grad_out.is_contiguous(memory_format=torch.channels_last))
        return outputs(mode, impl, leaves, grad_out)

    monkeypatch.setattr(op_cases.op_parity, "outputs", recorded)
    row = run_case(bench_partial_conv.FAMILY, shape, 2, torch.float32, "fwd+bwd", ["torch"],
                   Timer(cpu, warmup=0, runs=1), 1.0, {}, "default", 0, "channels_last")
    assert row["providers"]["torch"]["status"] == "ok" and layouts == [True]


def test_providers_are_not_timed_unchecked(monkeypatch):
    """Where the eager reference fails (and no fp32 reference is taken), the other providers
    are skipped, not reported ok with nothing checked."""
    from benchmarks import op_cases

    make_impl = op_cases.make_impl

    def failing_eager(family, provider, *args):
        if provider == "torch":
            def fail():
                raise RuntimeError("eager failed")
            return fail
        return make_impl(family, provider, *args)

    monkeypatch.setattr(op_cases, "make_impl", failing_eager)
    shape = bench_partial_conv.shapes(True)[0]
    row = run_case(bench_partial_conv.FAMILY, shape, 2, torch.float32, "fwd",
                   ["torch", "triton"], Timer(torch.device("cpu"), warmup=0, runs=1), 1.0, {},
                   "default", 0)
    assert row["providers"]["torch"]["status"] == "error", row
    assert row["providers"]["triton"]["status"] == "skipped", row
    assert "eager reference failed" in row["providers"]["triton"]["reason"]


def test_targets_filter_rows_and_show_each_dtype():
    """Target.where keeps only its rows (N = 49 for the attention); with several dtypes the
    worst row of each is shown too; a mismatching kernel's row counts for nothing."""
    family = bench_rpe_attention.FAMILY

    def row(dtype, h, w, flex_x, eager_x, status="ok"):
        return {"mode": "fwd+bwd", "batch": 256, "dtype": dtype, "height": h, "width": w,
                "shape": f"s{h}", "providers": {"triton": {"speedup_vs_flex": flex_x,
                                                           "speedup_vs_sdpa": flex_x,
                                                           "speedup_vs_eager": eager_x,
                                                           "status": status}}}
    rows = [row("fp16", 7, 7, 2.0, 4.0), row("fp32", 7, 7, 1.2, 3.5),
            row("fp16", 25, 42, 0.1, 0.1),  # not N = 49: ignored
            row("bf16", 7, 7, 9.0, 9.0, status="mismatch")]  # wrong output: ignored
    lines = check_targets(family, rows, "NVIDIA H100 80GB HBM3")
    assert "SDPA" in lines[0] and "FlexAttention" in lines[1]
    assert "NOT met: worst 1.20x (s7 fp32, 2 rows" in lines[1]
    assert "worst per dtype: fp16 2.00x, fp32 1.20x" in lines[1]
    assert "met: worst 3.50x" in lines[2] and "NOT" not in lines[2]
    assert len(lines) == 3  # on an H100: no "for information only" line
    assert len(check_targets(family, rows, "NVIDIA H200")) == 3  # nor on an H200
    # a fused op's targets (issue 13) cover its stage 1-3 shapes only
    conv = bench_partial_conv.FAMILY
    stage = [{"mode": "fwd", "batch": 256, "dtype": "fp16", "stage": s, "shape": f"s{s}",
              "providers": {"triton": {"pct_copy": pct, "speedup_vs_compile": 2.0,
                                       "status": "ok"}}} for s, pct in ((1, 80.0), (4, 5.0))]
    lines = check_targets(conv, stage, "NVIDIA H100")
    assert "met: worst 80.00% (s1 fp16, 1 rows" in lines[0] and "NOT" not in lines[0]


def test_pointwise_mlp_sweep_budget(tmp_path, capsys):
    """Past --budget no configuration is timed: each is recorded as skipped, the report still
    written, exit status 2; bad options are refused."""
    from benchmarks import sweep_common, sweep_pointwise_mlp as sweep

    path = tmp_path / "sweep.json"
    assert sweep.main(["--quick", "--shapes", "patnet_t2.s1", "--budget", "1e-9", "--json",
                       str(path)]) == 2
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2 and all(r["status"] == "skipped" for r in rows)
    assert "2 of 2 configurations not timed: out of time" in capsys.readouterr().out
    # the parallel compile past its deadline: its workers stopped, every configuration left
    config = rows[0]["config"]
    job = ("mlp", True, "patnet_t2.s1", 2, "float16", "channels_last", [config])
    assert sweep_common.precompile(sweep._compile_job, [job, job], 1, time.monotonic()) == \
        dict(compiled=0, failed=0, left=2)
    assert "configurations left to compile as they are timed" in capsys.readouterr().out
    for bad in (["--budget", "0"], ["--compile-workers", "-1"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(bad)


def test_pointwise_mlp_sweep_checks_every_output(monkeypatch):
    """A PAT_ch block's case runs the kernel as the model's blocks do, taking its output's X2
    statistics in the epilogue (each configuration its own chunks); before a configuration's
    check every output is NaN, so one that writes nothing fails rather than passing on the
    previous configuration's values."""
    from benchmarks import sweep_pointwise_mlp as sweep
    from patnet_kernels.triton import pointwise_mlp as kernels

    shape = next(s for s in bench_partial_block.shapes(True) if s.model == "patnet_t2")
    case = sweep.Case("block", shape, 2, torch.float16, torch.device("cpu"),
                      torch.Generator().manual_seed(0), "channels_last")
    launch, seen = kernels.pointwise_mlp, []

    def recorded(*args, statistics=None, **kwargs):
        seen.append(statistics)
        return launch(*args, statistics=statistics, **kwargs)

    monkeypatch.setattr(kernels, "pointwise_mlp", recorded)
    case.clear_outputs()
    error = (case.call(case.shipped).float() - case.exact).abs().max() / case.exact.abs().max()
    assert error < 1e-2 and seen[0] is not None and case.statistics_written(case.shipped)
    monkeypatch.setattr(kernels, "pointwise_mlp", lambda *args, **kwargs: args[7])  # (y)
    case.clear_outputs()
    assert case.call(case.shipped).isnan().all() and not case.statistics_written(case.shipped)


@pytest.mark.parametrize("op", ["mlp", "block"])
def test_pointwise_mlp_sweep_smoke_run(op, tmp_path, capsys):
    """The MLP kernel's tuning sweep (a GPU tool) runs on the CPU with --quick, as the MLP op
    (channels_last, the default) and as a whole block (NCHW) runs the kernel: every shape with
    the shipped configuration and one other, checked and timed, in its table and JSON."""
    from benchmarks import bench_partial_block, sweep_pointwise_mlp as sweep

    path = tmp_path / "sweep.json"
    # (the MLP's run first compiles its configurations in two spawned processes)
    extra = ["--compile-workers", "2"] if op == "mlp" else ["--layout", "nchw"]
    assert sweep.main(["--quick", "--op", op, "--json", str(path)] + extra) == 0
    report = json.loads(path.read_text())
    assert report["layout"] == ("channels_last" if op == "mlp" else "nchw")
    rows = report["rows"]
    family = bench_partial_block.FAMILY if op == "block" else bench_pointwise_mlp.FAMILY
    shapes = {s.name for s in family.shapes(True)}
    assert {r["shape"] for r in rows} == shapes and len(rows) == 2 * len(shapes)
    assert all(r["status"] == "ok" and r["max_rel_error"] < 1e-2 for r in rows)
    assert sum(r["shipped"] for r in rows) == len(shapes)
    out = capsys.readouterr().out
    assert "% of best" in out and "  * P" in out and str(path) in out
    assert ("compiled 2 configurations (0 failed)" in out) == (op == "mlp")
    # each row's weight reads (traffic's rule) over its time: positive, and in the table
    assert all(r["weight_gbps"] > 0 and r["tflops"] > 0 for r in rows)
    assert "GB/s of weights" in out and "TFLOP/s" in out
    # the GPU grids: no output block wider than the output needs
    assert len(sweep.grid("small", 128)) == 8 and len(sweep.grid("full", 128)) == 144
    assert len(sweep.grid("small", 48)) == 8 and {c.block_n for c in sweep.grid("small", 48)} == {64}
    # (from 256 output channels also in two passes, 256-pixel tiles among them; past 256 with
    # a second accumulator)
    assert len(sweep.grid("small", 256)) == 26 and len(sweep.grid("full", 256)) == 372
    assert len(sweep.grid("small", 768)) == 34 and len(sweep.grid("full", 768)) == 444
    assert {(c.block_n2, c.two_pass) for c in sweep.grid("full", 768)} == {
        (0, False), (0, True), (128, False)}
    assert {(c.block_n2, c.two_pass) for c in sweep.grid("full", 256)} == {(0, False), (0, True)}
    assert all(c.two_pass and c.block_n == 64 for c in sweep.grid("full", 256)
               if c.block_p == 256)
    assert len(sweep.grid("full", 768, spatial=True)) == 216
    assert all(c.block_n <= 64 for c in sweep.grid("full", 40))


def test_machine_rates_smoke_run(tmp_path, capsys):
    """The GPU check's first benchmark (the roofline's rates) runs on the CPU with --quick
    (tiny sizes, figures meaningless) and refuses to run without it there."""
    from benchmarks import machine_rates

    if torch.cuda.is_available():
        pytest.skip("a CPU check")
    assert machine_rates.main([]) == 2
    path = tmp_path / "rates.json"
    assert machine_rates.main(["--quick", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["benchmark"] == "machine_rates" and report["quick"]
    assert report["copy"]["gbps"] > 0 and report["l2_read"]["gbps"] > 0
    assert set(report["matmul"]) == {"float16", "bfloat16"}
    assert all(row["tflops"] > 0 and row["flops"] == 2 * row["n"] ** 3
               for row in report["matmul"].values())
    out = capsys.readouterr().out
    assert "L2 read" in out and str(path) in out


def test_reports_are_replaced_whole(tmp_path):
    """A report is written beside its path and renamed over it: a reader (or a run killed
    mid-write) sees the previous report or the new one, never a truncated file."""
    from benchmarks.report import read_json, write_json

    path = tmp_path / "sub" / "report.json"
    write_json(path, {"rows": [1]})
    write_json(path, {"rows": [1, 2]})
    assert read_json(path) == {"rows": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_rpe_attention_sweep_smoke_run(tmp_path, capsys):
    """The attention kernels' tuning sweep (a GPU tool) runs on the CPU with --quick: per
    shape the forward's and the dK/dV kernel's shipped configuration and one other (a key
    block of 32, which runs the dQ kernel too), each checked against the reference (output and
    every gradient) and timed, in its table and JSON; its compile job reports a configuration
    that does not launch; past --budget nothing is timed; bad options are refused."""
    from benchmarks import sweep_rpe_attention as sweep

    path = tmp_path / "sweep.json"
    assert sweep.main(["--quick", "--shapes", "s4.cls", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["benchmark"] == "sweep_rpe_attention"
    rows = report["rows"]
    assert [(r["kernel"], r["shipped"]) for r in rows] == [
        ("fwd", True), ("fwd", False), ("kv", True), ("kv", False)]
    assert all(r["status"] == "ok" and r["max_rel_error"] < 1e-2 for r in rows)
    assert rows[3]["config"]["block_n"] == 32 and rows[0]["tokens"] == 49
    out = capsys.readouterr().out
    assert "% of best" in out and "  * M" in out and str(path) in out
    errors = sweep._compile_job(True, "patnet_t0.s4.cls", 2, "float16", "fwd",
                                [(64, 64, 4, 2), (48, 64, 4, 2)])
    assert errors[0] is None and errors[1]  # (48 rows: not a power of two)
    assert sweep.main(["--quick", "--shapes", "s4.cls", "--kernels", "fwd", "--budget",
                       "1e-9", "--json", str(path)]) == 2
    assert all(r["status"] == "skipped" for r in json.loads(path.read_text())["rows"])
    assert len(sweep.grid("kv", torch.float16)) == 24 and len(sweep.grid("fwd", torch.float32)) == 12
    for bad in (["--kernels", "dq"], ["--dtypes", "half"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(bad)
    with pytest.raises(SystemExit, match="matches none of"):  # (and names the shapes)
        sweep.main(["--quick", "--shapes", "no_such_shape"])
