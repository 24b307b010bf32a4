"""The whole-model benchmark's report: the table, PREFIX.json, PREFIX.csv and PREFIX.png, and
the merge of reports of runs split across several commands (which gpu_report.py also uses)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import env
from benchmarks.model_measure import BASES, PROVIDERS, plan_text
from benchmarks.report import columns, pretty, read_json, write_csv, write_json

CSV_FIELDS = ["date", "device", "git_commit", "torch", "triton", "cuda", "model", "precision",
              "layout", "batch", "image_size", "provider", "status", "reason", "mean_ms",
              "median_ms", "min_ms", "images_per_s"] + [f"speedup_vs_{base}" for base in BASES] + [
              "max_rel_error", "compile_s", "first_call_s", "backends", "warmup", "runs",
              "threads"]
FAILED = ("error", "mismatch")
# The traffic model's roofline of every variant per layout (benchmarks/traffic.py, counted on
# the CPU: a lower bound at the H200's measured rates, fp16-like activations, batch 256 at
# 224 x 224; in channels_last our kernels' pixel tiles span samples where they may).
ROOFLINE_REPORTS = {layout: Path(__file__).resolve().parent / "results" / name for layout, name in (
    ("nchw", "traffic.cpu.roofline.224.autocast.json"),
    ("channels_last", "traffic.cpu.roofline.224.autocast.channels_last.json"))}


def format_table(report: dict) -> str:
    """One line per (model, precision, layout), the providers side by side."""
    gpu = report["device_type"] == "cuda"
    providers = report["settings"]["providers"]
    unit = "img/s" if gpu else "ms"
    headers = ["model", "precision", "layout"] + [f"{p} {unit}" for p in providers]
    ratios = [(p, base) for p in providers for base in BASES
              if base in providers and providers.index(base) < providers.index(p)]
    headers += [f"{p} vs {base}" for p, base in ratios]
    headers += [f"{p} err" for p in providers if p != "eager"]
    if "compile" in providers:
        headers.append("compile s")
    lines, notes = [], []
    for row in report["rows"]:
        entries = row["providers"]
        cells = [row["model_name"], row["precision"], row["layout"]]
        for p in providers:
            e = entries.get(p, {})
            if e.get("mean_ms") is None:
                cells.append(e.get("status", "-"))
            else:
                cells.append(f"{e['images_per_s']:,.0f}" if gpu else f"{e['mean_ms']:.2f}")
            if e.get("status") not in (None, "ok"):
                notes.append(f"  {row['model_name']} {row['precision']} {row['layout']} {p}: "
                             f"{e['status']}: {e['reason'].splitlines()[0]}")
        for p, base in ratios:
            value = entries.get(p, {}).get(f"speedup_vs_{base}")
            cells.append(f"{value:.2f}x" if value is not None else "-")
        for p in providers:
            if p != "eager":
                value = entries.get(p, {}).get("max_rel_error")
                cells.append(f"{value:.1e}" if value is not None else "-")
        if "compile" in providers:
            value = entries.get("compile", {}).get("compile_s")
            cells.append(f"{value:.1f}" if value is not None else "-")
        lines.append(cells)
    text, render = columns(headers, lines, left={0, 1, 2})
    text += [render(line) for line in lines]
    what = (f"images/s at batch {report['settings']['batch']} (mean of the timed calls)" if gpu
            else f"latency in ms at batch {report['settings']['batch']}, "
                 f"{report['settings']['threads']} thread(s) (mean of the timed calls)")
    text = [f"{what}; 'X vs Y': time of Y / time of X (> 1: X is faster); "
            "err: max |out - eager| / max |eager| of the logits", ""] + text
    plans = {row["model_name"]: plan_text(row["providers"]["ours"]["backends"])
             for row in report["rows"] if "backends" in row["providers"].get("ours", {})}
    if plans:
        text += [""] + [f"ours on {model}: {plan}" for model, plan in plans.items()]
    if gpu:
        text += roofline_lines(report) + target_lines(report)
    if notes:
        text += ["", "Not measured or flagged:"] + notes
    return "\n".join(text)


# The issues' whole-model targets, on an H100 / H200 at batch 256, 224 x 224, AMP (fp16),
# channels_last: (model, against (model, provider), at least this many times its images/s,
# issue). "ours": the fastest of OURS measured on that model.
MODEL_TARGETS = (
    ("patnet_t2", ("patnet_t2", "eager"), 1.5, 13),
    ("patnet_t2", ("patnet_t2", "eager"), 2.5, 14),
    ("patnet_t2", ("patnet_t2", "compile-max"), 1.5, 14),
    ("fasternet_t2", ("fasternet_t2", "eager"), 2.5, 14),
    ("fasternet_t2", ("fasternet_t2", "compile-max"), 1.5, 14),
    ("patnet_t2", ("fasternet_t2", "ours"), 1.25, 14),
)
OURS = ("ours", "ours-graph", "ours-compiled")


def target_lines(report: dict) -> List[str]:
    """:data:`MODEL_TARGETS` evaluated on the report's rows (none when it has no row of that
    mode): met, NOT met, or not measured; for information only off an H100 / H200."""
    rows = {r["model"]: r for r in report["rows"]
            if (r["precision"], r["layout"], r.get("batch"), r.get("image_size"))
            == ("amp", "channels_last", 256, 224)}
    if not rows:
        return []

    def speed(model: str, provider: str) -> Optional[tuple]:
        """(images/s, provider) of ``provider`` on ``model`` (the fastest of OURS for
        "ours"), None where not measured."""
        entries = rows.get(model, {}).get("providers", {})
        found = [(e["images_per_s"], p) for p, e in entries.items()
                 if p in (OURS if provider == "ours" else (provider,))
                 and e.get("status") == "ok" and e.get("images_per_s")]
        return max(found) if found else None

    device = report.get("device", "")
    lines = ["", "Targets (batch 256, 224 x 224, AMP, channels_last; ours: the fastest of "
             + ", ".join(OURS) + " measured)"
             + ("" if env.targets_apply(device) else
                f": for an H100 / H200, shown for information only on {device}")]
    for model, (other, provider), threshold, issue in MODEL_TARGETS:
        label = provider if other == model else f"{pretty(other)} {provider}"
        head = f"  issue {issue}: {pretty(model)} ours >= {threshold:g}x {label}: "
        mine, base = speed(model, "ours"), speed(other, provider)
        if mine is None or base is None:
            lines.append(head + "not measured")
            continue
        ratio = mine[0] / base[0]
        lines.append(head + f"{'met' if ratio >= threshold else 'NOT met'}: {ratio:.2f}x "
                            f"({mine[1]} {mine[0]:,.0f} img/s, {base[1]} {base[0]:,.0f})")
    return lines


def roofline_lines(report: dict, paths: Optional[Dict[str, Path]] = None) -> List[str]:
    """Each mixed-precision row at the roofline's batch and size beside the traffic model's
    lower bound in its layout (``paths``, default :data:`ROOFLINE_REPORTS`): the measured time
    of eager and of ours (and of ours as a CUDA graph) as a multiple of their roofline (ours'
    roofline is the Triton path's; under backend "auto" some of ours may run the reference),
    and the floor's. None where the report or the model is not there."""
    paths = ROOFLINE_REPORTS if paths is None else paths
    models = {layout: (read_json(path) or {}).get("models", {}) for layout, path in paths.items()}
    lines = []
    for row in report["rows"]:
        roofline = models.get(row["layout"], {}).get(row["model"], {})
        rates = (roofline.get("roofline") or {}).get("rates", {})
        if (row["precision"] != "amp" or not rates or row.get("batch") != rates.get("batch")
                or row.get("image_size") != roofline.get("size")):
            continue
        cells = []
        for provider, label in (("eager", "eager"), ("ours", "triton"),
                                ("ours-graph", "triton")):
            bound = roofline["providers"].get(label, {}).get("roofline")
            measured = row["providers"].get(provider, {}).get("mean_ms")
            if bound and measured:
                cells.append(f"{provider} {measured:.2f} ms = {measured / bound['ms']:.1f}x its "
                             f"{bound['ms']:.3f}")
        floor = roofline["roofline"]["floor"]["ms"]
        lines.append(f"  {row['model_name']} {row['precision']} {row['layout']}: "
                     + "; ".join(cells + [f"floor {floor:.3f} ms"]))
    if not lines:
        return []
    names = ", ".join(path.name for path in paths.values())
    return ["", "Against the traffic model's roofline (a lower bound counted on the CPU, "
                f"{names}; ms per batch):"] + lines


def csv_rows(report: dict) -> List[dict]:
    out = []
    for row in report["rows"]:
        for provider, entry in row["providers"].items():
            out.append({
                "date": row["date"], "device": report["device"], "git_commit": row["git_commit"],
                "torch": report["torch"], "triton": report["triton"], "cuda": report["cuda"],
                "model": row["model"], "precision": row["precision"], "layout": row["layout"],
                "batch": row["batch"], "image_size": row["image_size"], "provider": provider,
                "status": entry["status"], "reason": entry.get("reason", ""),
                **{k: entry.get(k, "") for k in
                   ("mean_ms", "median_ms", "min_ms", "images_per_s",
                    *[f"speedup_vs_{base}" for base in BASES], "max_rel_error",
                    "compile_s", "first_call_s")},
                "backends": " ".join(f"{op}={backend}"
                                     for op, backend in entry.get("backends", {}).items()),
                "warmup": row["warmup"], "runs": row["runs"], "threads": row["threads"]})
    return out


def write_files(report: dict, prefix: Path) -> None:
    """PREFIX.json and PREFIX.csv (the plot is written separately, at the end)."""
    write_json(Path(f"{prefix}.json"), report)
    write_csv(Path(f"{prefix}.csv"), CSV_FIELDS, csv_rows(report))


def write_plot(report: dict, path: Path) -> Optional[str]:
    """Grouped bars: per model, one bar per provider; one panel per (precision, layout).
    Images/s on a GPU, latency on the CPU. Returns why there is no plot, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e})"
    gpu = report["device_type"] == "cuda"
    providers = report["settings"]["providers"]
    modes = list(dict.fromkeys((r["precision"], r["layout"]) for r in report["rows"]))
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    names = {r["model"]: r["model_name"] for r in report["rows"]}
    width = 0.8 / len(providers)
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(6.0, 1.1 * len(models) + 2), 3.2 * len(modes) + 0.8))
    for ax, (precision, layout) in zip(axes[:, 0], modes):
        rows = {r["model"]: r for r in report["rows"]
                if (r["precision"], r["layout"]) == (precision, layout)}
        labelled = set()
        for k, provider in enumerate(providers):
            for i, model in enumerate(models):
                entry = rows.get(model, {}).get("providers", {}).get(provider)
                pos = i - 0.4 + width * (k + 0.5)
                if entry is None:
                    continue
                if entry.get("mean_ms") is None:
                    ax.text(pos, 0, entry["status"], rotation=90, ha="center", va="bottom",
                            fontsize=7, color="grey")
                    continue
                value = entry["images_per_s"] if gpu else entry["mean_ms"]
                ax.bar(pos, value, width, color=f"C{k}",
                       label=None if provider in labelled else provider)
                labelled.add(provider)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([names[m] for m in models], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images/s (higher is better)" if gpu else "latency ms (lower is better)")
        size = report["settings"]["image_size"]
        ax.set_title(f"{precision}, {layout}, batch {report['settings']['batch']}, "
                     f"{size} x {size}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:   # one legend, on the first panel with a bar
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    commits = ", ".join(sorted({r["git_commit"] for r in report["rows"]}))
    fig.suptitle(f"{report['device']}, torch {report['torch']}, commit {commits}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def finish(report: dict, prefix: Path) -> int:
    """Print the table, write JSON, CSV and the plot; 1 if a provider failed or mismatched."""
    png = Path(f"{prefix}.png")
    why = write_plot(report, png)
    report["plot"] = str(png) if why is None else None
    report["complete"] = True
    write_files(report, prefix)
    print()
    print(f"{report['device']}; torch {report['torch']}, triton {report['triton']}, "
          f"CUDA {report['cuda']}, commit {report['git_commit']}")
    print(format_table(report))
    print(f"\nWritten: {prefix}.json, {prefix}.csv, "
          + (f"{png}" if why is None else f"no plot: {why}"))
    failed = [(r["model"], r["precision"], r["layout"], p) for r in report["rows"]
              for p, e in r["providers"].items() if e["status"] in FAILED]
    if failed:
        print(f"{len(failed)} provider runs failed or mismatched eager: "
              + "; ".join(" ".join(f) for f in failed[:20]))
        return 1
    return 0



def default_prefix(device_type: str, device_name: str) -> Path:
    local = ".local" if device_type == "cpu" else ""
    slug = env.slug(device_name) if device_type == "cuda" else "cpu"
    return env.RESULTS / f"models.{slug}{local}"



def merge(paths: Sequence[str], out: Optional[str]) -> int:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    devices = {r["device"] for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"--merge: the reports are of different devices: {sorted(devices)}")
    merged = dict(reports[0])
    rows: Dict[tuple, dict] = {}
    providers: List[str] = []
    for report in reports:   # a later report's row replaces an earlier one of the same mode
        for row in report["rows"]:
            rows[(row["model"], row["precision"], row["layout"])] = row
        providers += [p for p in report["settings"]["providers"] if p not in providers]
    merged["rows"] = list(rows.values())
    merged["settings"] = dict(
        reports[0]["settings"], providers=[p for p in PROVIDERS if p in providers],
        **{key: list(dict.fromkeys(row[field] for row in merged["rows"]))
           for key, field in (("models", "model"), ("precisions", "precision"),
                              ("layouts", "layout"))})
    merged["parts"] = [{"file": str(p), "git_commit": r["git_commit"], "date": r["date"],
                        "settings": r["settings"], "complete": r["complete"]}
                       for p, r in zip(paths, reports)]
    merged["git_commit"] = ", ".join(dict.fromkeys(r["git_commit"] for r in reports))
    for key in ("warmup", "runs", "threads", "batch"):
        values = {r["settings"][key] for r in reports}
        if len(values) > 1:
            merged["settings"][key] = "mixed: " + ", ".join(map(str, sorted(values)))
    prefix = Path(out) if out else default_prefix(merged["device_type"], merged["device"])
    return finish(merged, prefix)


