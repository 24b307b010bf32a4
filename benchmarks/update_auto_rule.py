"""Rewrite the measurements behind ``backend="auto"`` from committed GPU benchmark reports.

    python -m benchmarks.update_auto_rule [REPORT_DIR_OR_JSON ...] [--out PATH] [--check]

Reads every op-benchmark JSON (``bench_partial_conv``, ``bench_channel_attention``,
``bench_spatial_attention``, ``bench_rpe_attention`` reports, as ``scripts/gpu_check.sh``
writes them) found under the given folders (default: ``benchmarks/results``), keeps the cases
measured on a GPU, and writes one point per case to ``patnet_kernels/measured_speed.json``
(see :mod:`patnet_kernels.auto_rule`); where several reports measured the same case on the
same kind of GPU, the newest wins. ``--check`` writes nothing and exits 1 if the file is not
what the reports give (CI runs it, so the rule never drifts from the committed reports).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.env import REPO, RESULTS  # noqa: E402
from benchmarks.report import rewrite_from_reports  # noqa: E402
from patnet_kernels import auto_rule, registry  # noqa: E402
# Benchmark name (the reports' "benchmark": bench_<ops module>.py) -> the op it times.
OPS = {op.module: name for name, op in registry.OPS.items()}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Providers that are backends of the functional API ("torch" is the reference).
BACKENDS = ("torch",) + auto_rule.FUSED


def _layout(op: str, settings: dict) -> str:
    if op == "rpe_attention":
        return "any"
    return "channels_last" if "channels_last" in str(settings.get("layout", "")) else "nchw"


def _row_shape(op: str, row: dict) -> List[int]:
    if op == "rpe_attention":
        return list(auto_rule.shape_key(op, (row["batch"], row["heads"], row["tokens"],
                                             row["head_dim"])))
    return list(auto_rule.shape_key(op, (row["batch"], row["channels"], row["height"],
                                         row["width"])))


def points_of(report: dict, source: str) -> List[dict]:
    """The measured points of one op-benchmark report (none for CPU runs)."""
    op = OPS.get(report.get("benchmark"))
    if op is None or report.get("device_type") != "cuda":
        return []
    points = []
    for row in report.get("rows", []):
        ms = {name: result["ms"] for name, result in row["providers"].items()
              if name in BACKENDS and result.get("status") == "ok" and result.get("ms")}
        if "torch" not in ms or len(ms) < 2:
            continue
        points.append({"gpu": report["device"], "op": op, "dtype": DTYPES[row["dtype"]],
                       "mode": row["mode"], "layout": _layout(op, report["settings"]),
                       "shape": _row_shape(op, row), "ms": ms,
                       "source": f"{source}#{row['shape']}", "date": report.get("date", "")})
    return points


def collect(paths: Iterable[Path]) -> List[dict]:
    """Points of every report under ``paths``, the newest per (gpu, op, dtype, mode, layout,
    shape), sorted."""
    newest: Dict[tuple, dict] = {}
    for path in paths:
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        for file in files:
            try:
                report = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(report, dict):
                continue
            source = str(file.relative_to(REPO)) if file.is_relative_to(REPO) else file.name
            # scripts/gpu_check.sh joins its op reports into one ops.json, {"reports": {name:
            # report}} (its results folder may hold 8 files); each is read as a report
            joined = report.get("reports")
            parts = ([(f"{source}:{name}", part) for name, part in joined.items()]
                     if isinstance(joined, dict) else [(source, report)])
            for point in (p for part_source, part in parts for p in points_of(part, part_source)):
                key = (point["gpu"], point["op"], point["dtype"], point["mode"],
                       point["layout"], tuple(point["shape"]))
                if key not in newest or point["date"] >= newest[key]["date"]:
                    newest[key] = point
    return [newest[key] for key in sorted(newest)]


def render(points: List[dict]) -> str:
    return json.dumps({
        "about": "What backend='auto' decides from (patnet_kernels/auto_rule.py): op "
                 "benchmark times in ms per provider, 'torch' being the reference. Written by "
                 "python -m benchmarks.update_auto_rule from the reports it names; do not "
                 "edit by hand.",
        "points": points,
    }, indent=1) + "\n"


def main(argv=None) -> int:
    return rewrite_from_reports(argv, __doc__.split("\n\n")[0], auto_rule.DATA, RESULTS,
                                lambda paths: render(collect(paths)),
                                "benchmarks.update_auto_rule")


if __name__ == "__main__":
    sys.exit(main())
