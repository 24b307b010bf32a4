"""Smoke test of the per-op-family benchmarks (benchmarks/bench_*.py, benchmarks/op_bench.py).

Each script runs with --quick on the CPU (Triton under its interpreter, which conftest selects;
torch.compile skipped, as --quick on the CPU says): the table and the JSON report must hold
every provider, shape and mode, with positive times and GB/s, speed-ups and % copy consistent
with the times, and the byte counts of the documented formulas. The stage shapes of the real
networks are checked against SPEC.md section 5 (cheap: read on the meta device).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

import patnet_kernels as pk
from benchmarks import bench_channel_attention, bench_partial_conv, bench_spatial_attention
from benchmarks import op_bench

SCRIPTS = {
    "partial_conv": (bench_partial_conv, []),
    # batch 1 too: training PAT_ch needs a batch of 2, so fwd+bwd at batch 1 must read "n/a"
    "channel_attention": (bench_channel_attention, ["--batches", "1,2"]),
    "spatial_attention": (bench_spatial_attention, []),
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
    assert set(report["byte_formulas"]) == set(op_bench.MODES)

    batches = [1, 2] if extra else [2]
    shapes = family.shapes(True)
    expected = {(s.name, b, "fp32", m) for s in shapes for b in batches for m in op_bench.MODES}
    rows = {(r["shape"], r["batch"], r["dtype"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == expected and len(report["rows"]) == len(expected)

    shape_of = {s.name: s for s in shapes}
    for key, row in rows.items():
        assert list(row["providers"]) == family.providers, key
        assert row["bytes"] == family.bytes_moved(shape_of[row["shape"]], row["batch"], 4,
                                                  row["mode"]) > 0
        eager = row["providers"]["torch"]
        training_b1 = name == "channel_attention" and row["batch"] == 1 and row["mode"] != "fwd"
        assert eager["status"] == ("n/a" if training_b1 else "ok"), (key, eager)
        assert row["providers"]["torch.compile"]["status"] in ("skipped", "n/a")
        for provider, entry in row["providers"].items():
            assert entry["status"] in STATUSES, (key, provider, entry)
            if entry["status"] != "ok":
                assert entry["reason"] and "ms" not in entry
                continue
            assert 0 < entry["ms_p20"] <= entry["ms"] <= entry["ms_p80"], (key, provider)
            assert close(entry["gbps"], row["bytes"] / (entry["ms"] * 1e-3) / 1e9)
            assert close(entry["pct_copy"], 100 * entry["gbps"] / copy_gbps)
            assert close(entry["speedup_vs_eager"], eager["ms"] / entry["ms"])
            assert entry["speedup_vs_compile"] is None  # compile skipped here
            assert entry["max_rel_error"] <= 1e-3, (key, provider, entry["max_rel_error"])
        if name == "partial_conv":  # its Triton kernels exist: they must have run
            assert row["providers"]["triton"]["status"] == "ok", key
            inplace = row["providers"]["triton inplace"]["status"]
            assert inplace == ("ok" if row["mode"] == "fwd" else "n/a"), key
        else:  # being written: either measured or reported unavailable, never an error
            assert row["providers"]["triton"]["status"] in (("n/a",) if training_b1 else
                                                            ("ok", "unavailable")), key

    table = printed.out
    header = next(line for line in table.splitlines() if line.startswith("shape "))
    for column in ("provider", "time us", "GB/s", "% copy", "vs eager", "vs compile", "status"):
        assert column in header
    for word in family.providers + [s.name for s in shapes] + list(op_bench.MODES):
        assert word in table, word
    for row in report["rows"]:
        for entry in row["providers"].values():
            if entry["status"] != "ok":
                assert f"{entry['status']}: {entry['reason'].splitlines()[0]}" in table
    assert "copy bandwidth" in table and str(path) in table
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
    assert op_bench.run(unavailable, argv) == 0
    assert "unavailable: no kernel here (test)" in capsys.readouterr().out
    entry = json.loads(path.read_text())["rows"][0]["providers"]["triton"]
    assert entry == {"status": "unavailable", "reason": "no kernel here (test)"}

    def broken(args, backend):
        if backend == "triton":
            raise RuntimeError("kernel crashed (test)")
        return family.functional(args, backend)

    failing = dataclasses.replace(family, functional=broken)
    assert op_bench.run(failing, argv) == 1
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
    for family in (bench_partial_conv.FAMILY, bench_channel_attention.FAMILY,
                   bench_spatial_attention.FAMILY):
        assert all(s.width == s.height for s in family.shapes(False))
