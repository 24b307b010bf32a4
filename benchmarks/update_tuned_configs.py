"""Rewrite the tuned kernel configurations from committed GPU sweep reports.

    python -m benchmarks.update_tuned_configs [REPORT_DIR_OR_JSON ...] [--out PATH] [--check]

Reads every ``sweep_pointwise_mlp`` JSON report (``python -m benchmarks.sweep_pointwise_mlp
--json ...`` on a GPU) found under the given folders (default: ``benchmarks/results``) and
writes ``patnet_kernels/triton/tuned_configs.json`` (see :mod:`patnet_kernels.triton.tuned`):
for each (GPU architecture, dtype, call key) the fastest configuration that passed its parity
check, where it beat the untuned default (the report's ``shipped`` row) by at least
``tuned.MARGIN``; where several reports timed the same call on the same architecture, the
newest wins. ``--check`` writes nothing and exits 1 if the file is not what the reports give
(CI runs it, so what the launchers take never drifts from the committed measurements). A
listed configuration ships only once ``python -m patnet_kernels.triton.aot`` compiles it
without spills (the AOT check compiles every one).
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
from patnet_kernels.triton import tuned  # noqa: E402

SWEEPS = {"sweep_pointwise_mlp": "pointwise_mlp"}  # report "benchmark" -> kernel family


def _reports(paths: Iterable[Path]) -> Iterable[tuple]:
    """(path, report) of every sweep report at or under ``paths``, on a GPU."""
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("*.json"))
        for file in files:
            try:
                report = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if (isinstance(report, dict) and report.get("benchmark") in SWEEPS
                    and report.get("arch")):
                yield file, report


def collect(paths: Iterable[Path]) -> Dict[str, List[dict]]:
    """The table's entries per family from the reports at ``paths`` (see module doc)."""
    best: Dict[tuple, dict] = {}
    for file, report in _reports(paths):
        family = SWEEPS[report["benchmark"]]
        calls: Dict[tuple, List[dict]] = {}
        for row in report.get("rows", []):
            if row.get("status") == "ok" and row.get("key"):
                calls.setdefault((row["dtype"], tuple(row["key"])), []).append(row)
        for (dtype, key), rows in calls.items():
            default = next((r for r in rows if r["shipped"]), None)
            fastest = min(rows, key=lambda r: r["ms"])
            if default is None or fastest["shipped"] or \
                    default["ms"] < tuned.MARGIN * fastest["ms"]:
                entry = None  # (the default is as fast: nothing to list)
            else:
                entry = {"arch": report["arch"], "dtype": dtype, "key": list(key),
                         "config": list(fastest["config"].values()),
                         "speedup": round(default["ms"] / fastest["ms"], 3),
                         "shape": fastest["shape"], "batch": fastest["batch"],
                         "device": report.get("device"), "date": report.get("date", ""),
                         "report": _relative(file)}
            slot = (family, report["arch"], dtype, key)
            if slot not in best or report.get("date", "") >= best[slot]["date"]:
                best[slot] = {"date": report.get("date", ""), "entry": entry}
    table: Dict[str, List[dict]] = {family: [] for family in SWEEPS.values()}
    for (family, *_), found in sorted(best.items(), key=lambda item: str(item[0])):
        if found["entry"] is not None:
            table[family].append(found["entry"])
    return table


def _relative(file: Path) -> str:
    try:
        return str(file.resolve().relative_to(REPO))
    except ValueError:
        return str(file)


def render(table: Dict[str, List[dict]]) -> str:
    what = json.loads(tuned.DATA.read_text())["what"]
    return json.dumps({"what": what, **table}, indent=2) + "\n"


def main(argv: List[str] = None) -> int:
    return rewrite_from_reports(argv, __doc__.splitlines()[0], tuned.DATA, RESULTS,
                                lambda paths: render(collect(paths)),
                                "benchmarks.update_tuned_configs")


if __name__ == "__main__":
    sys.exit(main())
