"""The main job runs end to end (few timed runs) and writes a complete, truthful report."""
from __future__ import annotations

import json

from benchmarks.main_job import main


def test_main_job_writes_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--runs", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PATNet-T2" in printed and "FasterNet-T2" in printed and "CPU ours ms" in printed
    assert "CPU latency, PATNet-T2: ours / eager reference = " in printed
    report = json.loads(out.read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["PATNet-T2"]["params"] == 12_269_816
    assert rows["FasterNet-T2"]["params"] == 14_982_888
    assert abs(rows["PATNet-T2"]["flops"] / 1.039e9 - 1) < 0.02
    for row in rows.values():
        assert row["cpu_eager_ms"] > 0 and row["cpu_ours_ms"] > 0
    for check in report["checks"].values():
        assert check["inference_vs_eval"] < 1e-5
        assert set(check["backends"].values()) <= {"torch", "triton", "cuda"}
    assert report["torch"] and report["git_commit"] and report["settings"]["cpu_threads"] == 1
