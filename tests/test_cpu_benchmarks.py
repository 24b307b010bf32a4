"""The CPU benchmark scripts: benchmarks/cpu_allocator.py (each provider timed alone in a fresh
process, under glibc's default malloc thresholds and under fixed ones, with its page faults
counted) and benchmarks/compiled_cpu.py (the compiled models with each Inductor wrapper)."""
import json
import os
import platform

import pytest

from benchmarks import cpu_allocator

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                 reason="glibc's malloc settings")


@needs_glibc
def test_child_environment_sets_or_clears_the_thresholds(monkeypatch):
    """The defaults' processes get no MALLOC_ variable, even one the caller had; the fixed
    setting's get exactly FIXED_THRESHOLDS; both can import the repository."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    defaults, fixed = (cpu_allocator.child_env(s) for s in cpu_allocator.SETTINGS)
    assert not [k for k in defaults if k.startswith("MALLOC_")]
    assert {k: v for k, v in fixed.items() if k.startswith("MALLOC_")} \
        == cpu_allocator.FIXED_THRESHOLDS == {"MALLOC_MMAP_THRESHOLD_": "33554432",
                                              "MALLOC_TRIM_THRESHOLD_": "268435456"}
    assert str(cpu_allocator.env.REPO) in defaults["PYTHONPATH"].split(os.pathsep)


@needs_glibc
def test_script_times_each_setting_in_its_own_process(tmp_path, capsys):
    """One round of FasterNet-T0's copy at 64 x 64: a row per setting with a time and a fault
    count, measured by processes that saw the setting's variables; a table and a JSON."""
    out = tmp_path / "allocator.json"
    assert cpu_allocator.main(["--models", "fasternet_t0", "--providers", "ours", "--rounds",
                               "1", "--warmup", "1", "--runs", "2", "--size", "64",
                               "--json", str(out)]) == 0
    assert "defaults / fixed" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["fixed_thresholds"] == cpu_allocator.FIXED_THRESHOLDS
    (model,) = report["reports"]
    assert model["model"] == "fasternet_t0" and set(model["rows"]) == {"ours"}
    for setting, want_env in zip(cpu_allocator.SETTINGS, ({}, cpu_allocator.FIXED_THRESHOLDS)):
        row = model["rows"]["ours"][setting]
        (measured,) = row["rounds"]
        assert measured["malloc_env"] == want_env
        assert row["ms"] == measured["ms"] > 0 and row["faults_per_forward"] >= 0


@needs_glibc
def test_unknown_provider_is_refused():
    with pytest.raises(SystemExit):
        cpu_allocator.main(["--providers", "compiled"])


def test_compiled_cpu_script_builds_each_wrapper_and_reads_its_report():
    """benchmarks/compiled_cpu.py (not run here: four compiles per model): the reference and the
    copy each wrapped with Inductor's Python and C++ wrappers, and the gains its table prints."""
    from benchmarks import compiled_cpu
    from patnet.wrappers import FrozenCompiledModel

    models = compiled_cpu.variants("patnet_t0")
    assert set(models) == {"eager", *compiled_cpu.VARIANTS}
    wrappers = {k: m.cpp_wrapper for k, m in models.items() if isinstance(m, FrozenCompiledModel)}
    assert wrappers == {"reference, frozen": False, "reference, frozen, C++": True,
                        "ours, frozen": False, "ours, frozen, C++": True}
    assert models["reference, frozen"].model is models["eager"]
    assert models["ours, frozen"].model is models["ours, frozen, C++"].model is models["ours"]
    ms = dict(zip(compiled_cpu.VARIANTS, (12.0, 10.0, 14.0, 11.0, 8.0)))
    report = {"model": "patnet_t0", "ms": ms,
              "first_call_s": dict.fromkeys(compiled_cpu.VARIANTS, 1.0),
              "max_rel_error": dict.fromkeys(compiled_cpu.VARIANTS, 1e-7)}
    assert compiled_cpu.table(report).splitlines()[-1] == (
        "C++ wrapper: reference 1.20x, ours 1.38x; ours compiled (C++) vs reference compiled "
        "(C++) 1.25x")
