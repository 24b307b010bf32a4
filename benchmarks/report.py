"""Writing what a benchmark measured: JSON and CSV files, plain-text tables, number formats.

Shared by every benchmark script; nothing here imports torch.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON (one space), the folder made where missing. Benchmarks rewrite
    their report after every case, so a run cut off keeps what it measured: written beside it
    and renamed over it, so a run killed while writing leaves the previous report whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)


def read_json(path: Path) -> Optional[dict]:
    """The JSON document at ``path``, or None where there is none (or it does not parse)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_csv(path: Path, fields: Sequence[str], rows: Iterable[dict]) -> None:
    """``rows`` (dicts) under a header of ``fields``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def split_list(text: str) -> List[str]:
    """A comma list of the command line: "a, b,,c" -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def matching_shapes(shapes: list, wanted: Optional[str]) -> list:
    """The shapes whose name contains one of ``wanted``'s comma list (all where None); exits
    with the shape names when none matches."""
    if not wanted:
        return shapes
    keep = split_list(wanted)
    found = [s for s in shapes if any(k in s.name for k in keep)]
    if not found:
        raise SystemExit(f"--shapes {wanted!r} matches none of {[s.name for s in shapes]}")
    return found


def pretty(name: str) -> str:
    """A model's name as the papers write it: "patnet_t2" -> "PATNet-T2"."""
    family, size = name.split("_")
    return {"patnet": "PATNet", "fasternet": "FasterNet"}[family] + "-" + size.upper()


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec``, "-" for None; small values keep three significant
    digits."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 0.995 and not spec.endswith("e"):
        return f"{value:.3g}{suffix}"
    return format(value, spec) + suffix


def geomean(values: List[float]) -> Optional[float]:
    """The geometric mean of the positive values (None and the rest left out), or None."""
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def columns(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Set[int]
            ) -> Tuple[List[str], Callable[[Sequence[str]], str]]:
    """A plain-text table: the header line and the dashes under it, and the function that
    renders a row. Each column is as wide as its widest cell, left-aligned where its index is
    in ``left``, right-aligned elsewhere, two spaces apart; lines carry no trailing blanks."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    header = render(headers)
    return [header, "-" * len(header)], render


def run_models(models: Sequence[str], measure: Callable[[str], dict],
               table: Callable[[dict], str],
               write: Optional[Callable[[List[dict]], None]] = None) -> int:
    """The model loop of the per-model entry scripts (traffic.py, host_time.py): each model's
    report made by ``measure(name)``, its table printed, and all reports so far handed to
    ``write`` after each model (a cut run keeps what it had). Exit status: 1 if any provider
    of any model errored, else 0. Each report has ``model`` and ``providers`` (name -> row
    with a ``status``)."""
    reports: List[dict] = []
    for name in models:
        report = measure(name)
        reports.append(report)
        print(table(report) + "\n", flush=True)
        if write is not None:
            write(reports)
    failed = [(r["model"], p) for r in reports for p, row in r["providers"].items()
              if row.get("status") == "error"]
    return 1 if failed else 0


def rewrite_from_reports(argv, description: str, default_out: Path, default_reports: Path,
                         render: Callable[[List[Path]], str], command: str) -> int:
    """The command line of a file derived from committed GPU reports (``update_auto_rule``,
    ``update_tuned_configs``): ``[REPORTS ...] [--out PATH] [--check]``. Writes
    ``render(report paths)`` to --out, or with --check writes nothing and returns 1 (saying to
    run ``command``) where the file is not that; a missing report path exits with status 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m {command}", description=description)
    parser.add_argument("paths", nargs="*", type=Path, default=[default_reports],
                        help=f"report folders or JSON files (default: {default_reports.name})")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if --out differs from the reports")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such report folder or file: {', '.join(missing)}")
    text = render([p.resolve() for p in args.paths])
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is not what the reports give; run python -m {command} and "
                  "commit it", file=sys.stderr)
            return 1
        print(f"{args.out} matches the reports")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0
