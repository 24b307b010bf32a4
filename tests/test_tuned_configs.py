"""Offline tuning (patnet_kernels/triton/tuned.py, benchmarks/update_tuned_configs.py): the
committed table is what the committed sweep reports give; a sweep report becomes a table entry
only where a configuration beat the default by the margin (the newest report deciding); the
MLP launcher takes a listed configuration on that GPU architecture only, and the AOT check
compiles it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import update_tuned_configs
from patnet_kernels.triton import pointwise_mlp, tuned

# (C, hidden, C_out, conv head, PAT_sp's wider half): PATNet-T2's stage-1 block
KEY = [64, 128, 64, 16, 0]


def _report(path, rows, arch=90, date="2026-12-05T10:00:00"):
    path.write_text(json.dumps({"benchmark": "sweep_pointwise_mlp", "op": "block",
                                "date": date, "device": "NVIDIA H100", "arch": arch,
                                "rows": rows}))


def _row(config, ms, shipped=False, status="ok", dtype="float16", key=KEY):
    return {"shape": "patnet_t2.s1", "dtype": dtype, "batch": 256, "key": key,
            "config": config._asdict(), "shipped": shipped, "status": status, "ms": ms}


DEFAULT = pointwise_mlp.default_config(64, 128, 64, torch.float16, 16, interpret=False)
FASTER = DEFAULT._replace(block_p=128, warps=4)


def test_the_committed_table_is_what_the_reports_give(capsys):
    assert update_tuned_configs.main(["--check"]) == 0, capsys.readouterr().err


def test_a_sweep_becomes_an_entry_only_past_the_margin(tmp_path):
    _report(tmp_path / "a.json", [_row(DEFAULT, 1.00, shipped=True), _row(FASTER, 0.80),
                                  _row(DEFAULT._replace(block_h=32), 0.50, status="error"),
                                  _row(DEFAULT, 1.0, shipped=True, key=[8, 16, 8, 0, 0]),
                                  _row(FASTER, 0.99, key=[8, 16, 8, 0, 0])])
    _report(tmp_path / "cpu.json", [_row(DEFAULT, 9.0, shipped=True), _row(FASTER, 1.0)],
            arch=None)  # (a CPU smoke run: never an entry)
    (entry,) = update_tuned_configs.collect([tmp_path])["pointwise_mlp"]
    assert entry["arch"] == 90 and entry["dtype"] == "float16" and entry["key"] == KEY
    assert pointwise_mlp.Config(*entry["config"]) == FASTER and entry["speedup"] == 1.25
    # a newer report where the default is as fast takes the entry away
    _report(tmp_path / "b.json", [_row(DEFAULT, 1.00, shipped=True), _row(FASTER, 0.99)],
            date="2026-12-06T10:00:00")
    assert update_tuned_configs.collect([tmp_path])["pointwise_mlp"] == []
    out = tmp_path / "table.json"
    out.write_text(tuned.DATA.read_text())
    assert update_tuned_configs.main([str(tmp_path / "a.json"), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["pointwise_mlp"]) == 1
    assert update_tuned_configs.main([str(tmp_path / "a.json"), "--out", str(out),
                                      "--check"]) == 0
    with pytest.raises(SystemExit):
        update_tuned_configs.main([str(tmp_path / "nowhere")])


@pytest.fixture
def listed(tmp_path, monkeypatch):
    """The table with FASTER listed for KEY in fp16 on sm_90, the interpreter off and the
    device's architecture 9.0 (no GPU needed: nothing is launched)."""
    data = tmp_path / "tuned_configs.json"
    data.write_text(json.dumps({"what": "", "pointwise_mlp": [
        {"arch": 90, "dtype": "float16", "key": KEY, "config": list(FASTER)}]}))
    monkeypatch.setattr(tuned, "DATA", data)
    monkeypatch.setattr(tuned, "INTERPRET", False)
    monkeypatch.setattr(tuned, "_arch", lambda index: 90)
    tuned.table.cache_clear()
    yield
    tuned.table.cache_clear()


def test_the_launcher_takes_a_listed_configuration_on_its_architecture(listed, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert pointwise_mlp.config_for(*KEY[:3], torch.float16, *KEY[3:], cuda) == FASTER
    assert pointwise_mlp.config_for(*KEY[:3], torch.bfloat16, *KEY[3:], cuda) == \
        pointwise_mlp.default_config(*KEY[:3], torch.bfloat16, *KEY[3:])
    assert pointwise_mlp.config_for(*KEY[:3], torch.float16, *KEY[3:], torch.device("cpu")) \
        == pointwise_mlp.default_config(*KEY[:3], torch.float16, *KEY[3:])
    monkeypatch.setattr(tuned, "_arch", lambda index: 80)  # (an A100: not tuned there)
    assert pointwise_mlp.config_for(*KEY[:3], torch.float16, *KEY[3:], cuda) != FASTER


# Without TRITON_INTERPRET (the AOT list reads the kernels' signatures): the list with a table
# that lists FASTER holds it beside the default.
_AOT_LIST = """
import sys, torch
from patnet_kernels.triton import pointwise_mlp, tuned
tuned.DATA = __import__("pathlib").Path(sys.argv[1])
names = [k.name for k in pointwise_mlp.aot_kernels()]
fast = pointwise_mlp.Config(*tuned.table("pointwise_mlp")[(90, "float16", 64, 128, 64, 16, 0)])
default = pointwise_mlp.default_config(64, 128, 64, torch.float16, 16, interpret=False)
for config in (fast, default):
    assert pointwise_mlp.aot_kernel(config, torch.float16, "relu", True, True, 16,
                                    True).name in names, config
print("listed")
"""


def test_the_aot_check_compiles_a_listed_configuration(listed):
    from conftest import REPO, compile_env
    proc = subprocess.run([sys.executable, "-c", _AOT_LIST, str(tuned.DATA)], cwd=REPO,
                          env=compile_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "listed" in proc.stdout, proc.stdout + proc.stderr
