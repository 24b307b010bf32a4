"""benchmarks/cpu_allocator.py: each provider timed alone in a fresh process, under glibc's
default malloc thresholds and under fixed ones, with its page faults counted."""
import json
import os
import platform

import pytest

from benchmarks import cpu_allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc settings")


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


def test_unknown_provider_is_refused():
    with pytest.raises(SystemExit):
        cpu_allocator.main(["--providers", "compiled"])
