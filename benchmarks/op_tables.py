"""The printed results of the op benchmarks: the table of every case and provider, the summary
lines (geometric-mean speed-ups, % copy ranges) and the issue's targets. gpu_report.py reuses
the summary and target lines in SUMMARY.md."""
from __future__ import annotations

from typing import List, Optional, Sequence

from benchmarks import env
from benchmarks.op_family import MODES, Family
from benchmarks.report import columns, fmt, geomean


def format_table(rows: List[dict], providers: List[str],
                 speedup_labels: Sequence[str] = ("eager", "compile"),
                 flops: bool = False) -> str:
    headers = (["shape", "blocks", "B", "C", "HxW", "dtype", "mode", "provider", "time us",
                "GB/s", "% copy"] + (["TFLOP/s"] if flops else [])
               + [f"vs {label}" for label in speedup_labels] + ["max err", "status"])
    lines = []
    for row in rows:
        first = True
        for provider in providers:
            entry = row["providers"].get(provider)
            if entry is None:
                continue
            case = ([row["shape"], str(row["blocks"]), str(row["batch"]), str(row["channels"]),
                     f"{row['height']}x{row['width']}", row["dtype"], row["mode"]]
                    if first else [""] * 7)
            first = False
            ms = entry.get("ms")
            status = entry["status"]
            if entry.get("reason"):
                status += ": " + entry["reason"].splitlines()[0]
            lines.append(case + [
                provider, fmt(ms * 1e3 if ms is not None else None, ",.1f"),
                fmt(entry.get("gbps"), ",.1f"), fmt(entry.get("pct_copy"), ".1f", "%")]
                + ([fmt(entry.get("tflops"), ",.1f")] if flops else [])
                + [fmt(entry.get(f"speedup_vs_{label}"), ".2f", "x")
                   for label in speedup_labels]
                + [fmt(entry.get("max_rel_error"), ".1e"), status])
    text, render = columns(headers, lines, left={0, 5, 6, 7, len(headers) - 1})
    previous = None
    for line in lines:
        if line[0] and previous is not None:
            text.append("")
        text.append(render(line))
        previous = line
    return "\n".join(text)


def check_targets(family: Family, rows: List[dict], cuda_name: Optional[str]) -> List[str]:
    out = []
    for target in family.targets:
        values = []
        for row in rows:
            entry = row["providers"].get(target.provider, {})
            if (row["mode"] == target.mode and row["batch"] == target.batch
                    and (target.where is None or target.where(row))
                    and entry.get("status") == "ok"  # (a mismatching kernel meets nothing)
                    and entry.get(target.metric) is not None):
                values.append((entry[target.metric], row))
        head = f"  {target.text}: "
        if not values:
            out.append(head + f"no measured {target.provider} rows at batch {target.batch} "
                              f"in mode {target.mode}")
            continue
        worst, row = min(values, key=lambda v: v[0])
        unit = "%" if target.metric == "pct_copy" else "x"
        verdict = "met" if worst >= target.threshold else "NOT met"
        text = (head + f"{verdict}: worst {worst:.2f}{unit} ({row['shape']} {row['dtype']}, "
                       f"{len(values)} rows; target {target.threshold:g}{unit})")
        dtypes = sorted({r["dtype"] for _, r in values})
        if len(dtypes) > 1:  # the worst row per dtype, as a target may hold for some only
            text += "; worst per dtype: " + ", ".join(
                f"{d} {min(v for v, r in values if r['dtype'] == d):.2f}{unit}" for d in dtypes)
        out.append(text)
    if out and not env.targets_apply(cuda_name):
        out.append("  (the targets are for an H100 / H200; this run is on "
                   f"{cuda_name or 'the CPU'}, so they are shown for information only)")
    return out


def summary_lines(rows: List[dict], providers: List[str],
                  speedup_labels: Sequence[str] = ("eager", "compile"),
                  flops: bool = False) -> List[str]:
    """Per provider, mode, dtype and batch: geometric-mean speed-ups and the % of copy range
    (and with ``flops`` the TFLOP/s range)."""
    keys = sorted({(r["mode"], r["dtype"], r["batch"]) for r in rows},
                  key=lambda k: (MODES.index(k[0]) if k[0] in MODES else 9, k[1], k[2]))
    lines = []
    for provider in providers:
        if provider == "torch":
            continue
        for mode, dtype, batch in keys:
            entries = [r["providers"][provider] for r in rows
                       if (r["mode"], r["dtype"], r["batch"]) == (mode, dtype, batch)
                       and r["providers"].get(provider, {}).get("status") == "ok"
                       and r["providers"][provider].get("ms") is not None]
            if not entries:
                continue
            pct = [e["pct_copy"] for e in entries if e.get("pct_copy") is not None]
            speedups = ", ".join(
                f"vs {label} "
                f"{fmt(geomean([e.get(f'speedup_vs_{label}') for e in entries]), '.2f', 'x')}"
                for label in speedup_labels)
            line = (f"  {provider:<14} {mode:<8} {dtype} B={batch:<4} shapes {len(entries)}: "
                    f"{speedups} (geomean); % copy {fmt(min(pct) if pct else None, '.1f')}.."
                    f"{fmt(max(pct) if pct else None, '.1f')}")
            if flops:
                tf = [e["tflops"] for e in entries if e.get("tflops") is not None]
                line += (f"; TFLOP/s {fmt(min(tf) if tf else None, '.1f')}.."
                         f"{fmt(max(tf) if tf else None, '.1f')}")
            lines.append(line)
    return lines
