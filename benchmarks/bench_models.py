"""Whole-model benchmark: PATNet and FasterNet T0 ... L, eager vs torch.compile vs ours, one run.

    python -m benchmarks.bench_models [--models patnet_t2,fasternet_t2] [--precisions fp32]
                                      [--layouts nchw] [--providers eager,ours] [--out PREFIX]
    python -m benchmarks.bench_models --merge part1.json part2.json [--out PREFIX]

Providers, each on the same seeded input and the same model (random weights, seeded random
BatchNorm / LayerNorm statistics and RPE tables, eval mode, under torch.no_grad()):

* ``eager``: the pure-PyTorch reference model (``create_model(name, backend="torch")``); its
  output in each mode is what the others are checked against, and it always runs;
* ``compile``: ``torch.compile`` of that model, compiled anew for each mode after
  ``torch._dynamo.reset()``; the compiling first call is not timed (``compile_s``);
* ``ours``: the fused inference path, ``patnet.optimize_for_inference(model)`` (BatchNorms
  folded, each op on the fastest backend usable on the device, in-place and buffer-reusing
  blocks); which backend runs each op is recorded (``backends``).

On a GPU: images/s at batch 256, fp32 and AMP (``torch.autocast``, fp16 or bf16), NCHW and
channels_last, cudnn.benchmark on, 50 warm-up + 200 timed calls between two synchronisations
(benchmarks/timer.py). On the CPU: latency at batch 1 with one thread, fp32, NCHW, 10 warm-up
+ 200 timed calls (the authors' way, SPEC.md section 7). Writes PREFIX.json, PREFIX.csv and
PREFIX.png (rewritten after every case, so a run cut off keeps what it measured); --merge joins
the JSON of runs split across several commands. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks import env  # noqa: E402
from benchmarks.providers import Unavailable, compile_settings  # noqa: E402
from benchmarks.report import columns, pretty, split_list, write_csv, write_json  # noqa: E402
from benchmarks.timer import time_cpu, time_cuda  # noqa: E402
from benchmarks.tolerance import DTYPE_NAMES, DTYPES, MISMATCH, rel_max_error  # noqa: E402
from patnet.testing import randomize_norms  # noqa: E402

REPO = env.REPO
PROVIDERS = ("eager", "compile", "ours")
PRECISIONS = ("fp32", "amp")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SIZES = ("t0", "t1", "t2", "s", "m", "l")
DEFAULT_MODELS = [f"{family}_{size}" for size in SIZES for family in ("patnet", "fasternet")]
CSV_FIELDS = ["date", "device", "git_commit", "torch", "triton", "cuda", "model", "precision",
              "layout", "batch", "image_size", "provider", "status", "reason", "mean_ms",
              "median_ms", "min_ms", "images_per_s", "speedup_vs_eager", "speedup_vs_compile",
              "max_rel_error", "compile_s", "first_call_s", "backends", "warmup", "runs",
              "threads"]
FAILED = ("error", "mismatch")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(name: str, reference: torch.nn.Module, x: torch.Tensor, precision: str,
             amp_dtype: Optional[torch.dtype], layout: str, providers: Sequence[str],
             args: argparse.Namespace) -> dict:
    """Check and time every provider in one mode (precision, layout); returns the JSON row."""
    device = x.device
    row = {"model": name, "model_name": pretty(name), "precision": precision, "layout": layout,
           "batch": x.shape[0], "image_size": x.shape[-1], "warmup": args.warmup,
           "runs": args.runs, "threads": None if device.type == "cuda" else torch.get_num_threads(),
           "git_commit": env.git_commit(), "date": env.now(), "providers": {}}
    tolerance = MISMATCH[amp_dtype or torch.float32]
    expected = None
    timer = time_cuda if device.type == "cuda" else time_cpu
    for provider in providers:
        entry: dict = {}
        row["providers"][provider] = entry
        net = call = None
        try:
            if provider != "eager" and expected is None:
                raise Unavailable("skipped", "the eager reference failed in this mode")
            if provider == "compile":
                compile_settings().reset()   # compile once for this mode, from a clean cache
                net = torch.compile(reference, backend=args.compile_backend,
                                    **({"mode": args.compile_mode}
                                       if args.compile_backend == "inductor" else {}))
            elif provider == "ours":
                net = patnet.optimize_for_inference(reference).to(memory_format=LAYOUTS[layout])
                entry["backends"] = net.backend_plan()
            else:
                net = reference

            def call(net=net):
                with torch.no_grad(), _autocast(device, amp_dtype):
                    return net(x)

            start = time.perf_counter()
            out = call()   # the check (and, for compile, the compilation): not timed
            _sync(device)
            first_s = time.perf_counter() - start
            out = out.float()
            if provider == "eager":
                expected = out
            err = rel_max_error(out, expected)
            del out
            label = f"{name} {precision} {layout} {provider}"
            t = timer(call, args.warmup, args.runs, label)
            entry.update(status="ok", mean_ms=t["mean_ms"], median_ms=t["median_ms"],
                         min_ms=t["min_ms"], images_per_s=x.shape[0] / (t["mean_ms"] * 1e-3),
                         max_rel_error=err, first_call_s=first_s)
            if provider == "compile":
                entry["compile_s"] = first_s
            if not err <= tolerance:
                entry.update(status="mismatch", reason=f"max rel error {err:.2g} vs eager "
                                                       f"exceeds {tolerance:g}")
        except Unavailable as e:
            entry.update(status=e.status, reason=e.reason)
        except pk.BackendUnavailableError as e:
            entry.update(status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            entry.update(status="error", reason=f"{type(e).__name__}: {e}".strip(),
                         traceback=traceback.format_exc(limit=6))
        finally:
            net = call = None   # the compiled or fused model goes before the next provider
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"    {provider:<8} {_entry_text(entry, device.type == 'cuda')}", flush=True)
    for entry in row["providers"].values():
        for base in ("eager", "compile"):
            base_ms = row["providers"].get(base, {}).get("mean_ms")
            if entry.get("mean_ms") is not None:
                entry[f"speedup_vs_{base}"] = base_ms / entry["mean_ms"] if base_ms else None
    return row


def _plan_text(plan: Dict[str, str]) -> str:
    return "backends " + ", ".join(f"{op} {backend}" for op, backend in plan.items())


def _entry_text(entry: dict, gpu: bool) -> str:
    if entry.get("mean_ms") is None:
        return f"{entry['status']}: {entry['reason'].splitlines()[0]}"
    text = (f"{entry['images_per_s']:,.0f} img/s, " if gpu else "") + \
        (f"mean {entry['mean_ms']:.2f} ms, median {entry['median_ms']:.2f} ms, "
         f"max rel error {entry['max_rel_error']:.1e}")
    if "compile_s" in entry:
        text += f", compiled in {entry['compile_s']:.1f} s"
    if "backends" in entry:
        text += f"; {_plan_text(entry['backends'])}"
    if entry["status"] != "ok":
        text += f"; {entry['status']}: {entry['reason']}"
    return text


# --------------------------------------------------------------------------------------------
# Report: table, JSON, CSV, plot
# --------------------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    """One line per (model, precision, layout), the providers side by side."""
    gpu = report["device_type"] == "cuda"
    providers = report["settings"]["providers"]
    unit = "img/s" if gpu else "ms"
    headers = ["model", "precision", "layout"] + [f"{p} {unit}" for p in providers]
    ratios = [(p, base) for p in providers for base in ("eager", "compile")
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
    plans = {row["model_name"]: _plan_text(row["providers"]["ours"]["backends"])
             for row in report["rows"] if "backends" in row["providers"].get("ours", {})}
    if plans:
        text += [""] + [f"ours on {model}: {plan}" for model, plan in plans.items()]
    if notes:
        text += ["", "Not measured or flagged:"] + notes
    return "\n".join(text)


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
                   ("mean_ms", "median_ms", "min_ms", "images_per_s", "speedup_vs_eager",
                    "speedup_vs_compile", "max_rel_error", "compile_s", "first_call_s")},
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_models",
        description="Whole-model benchmark of PATNet and FasterNet: eager vs torch.compile vs "
                    "the fused inference model, side by side in one run.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma list of {', '.join(patnet.list_models())} (default: all)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma list of eager, compile, ours (default: all; eager, the "
                             "reference of the check, always runs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there)")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 1 on CPU")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--precisions", default=None,
                        help="comma list of fp32, amp (default: fp32,amp on GPU; fp32 on CPU)")
    parser.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                        help="the autocast dtype of the amp precision (default float16)")
    parser.add_argument("--layouts", default=None,
                        help="comma list of nchw, channels_last (default: both on GPU; nchw on "
                             "CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up calls (default: 50 on GPU, 10 on CPU)")
    parser.add_argument("--runs", type=int, default=200, help="timed calls (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; eager and aot_eager "
                             "only trace, which the CPU smoke test uses to stay fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="output prefix: writes PREFIX.json, .csv, .png (default: "
                             "benchmarks/results/models.<device>, .local on the CPU)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="join the JSON reports of earlier runs (one device) into one table, "
                             "JSON, CSV and plot; measures nothing")
    return parser.parse_args(argv)


def _choose(text: str, valid: Sequence[str], what: str) -> List[str]:
    chosen = split_list(text)
    unknown = [c for c in chosen if c not in valid]
    if unknown or not chosen:
        raise SystemExit(f"--{what}: unknown or empty {unknown}; choose from {', '.join(valid)}")
    return chosen


def _default_prefix(device_type: str, device_name: str) -> Path:
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
    prefix = Path(out) if out else _default_prefix(merged["device_type"], merged["device"])
    return finish(merged, prefix)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    device = env.pick_device(args.device)
    gpu = device.type == "cuda"
    models = _choose(args.models, patnet.list_models(), "models")
    wanted = _choose(args.providers, PROVIDERS, "providers")
    providers = [p for p in PROVIDERS if p in wanted or p == "eager"]
    precisions = _choose(args.precisions or ("fp32,amp" if gpu else "fp32"), PRECISIONS,
                         "precisions")
    layouts = _choose(args.layouts or ("nchw,channels_last" if gpu else "nchw"), list(LAYOUTS),
                      "layouts")
    args.batch = args.batch or (256 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (50 if gpu else 10)
    amp_dtype = DTYPES[args.amp_dtype]
    modes = [(p, f"amp-{DTYPE_NAMES[amp_dtype]}" if p == "amp" else p, lay)
             for p in precisions for lay in layouts]

    if gpu:
        torch.backends.cudnn.benchmark = True
    with env.cpu_threads(device, args.threads):
        report, prefix = _measure(args, device, models, providers, modes, layouts, amp_dtype,
                                  argv)
    return finish(report, prefix)


def _measure(args: argparse.Namespace, device: torch.device, models: List[str],
             providers: List[str], modes: List[tuple], layouts: List[str],
             amp_dtype: torch.dtype, argv) -> Tuple[dict, Path]:
    """Every model in every mode, the report (JSON, CSV) rewritten after each; returns the
    report and the output prefix."""
    gpu = device.type == "cuda"
    device_name = env.device_name(device)
    prefix = Path(args.out) if args.out else _default_prefix(device.type, device_name)
    report = {
        "benchmark": "models", **env.run_info(device),
        "settings": {
            "argv": list(sys.argv[1:] if argv is None else argv), "models": models,
            "providers": providers, "precisions": [m[1] for m in modes], "layouts": layouts,
            "batch": args.batch, "image_size": args.size, "warmup": args.warmup,
            "runs": args.runs, "threads": torch.get_num_threads() if not gpu else None,
            "compile_backend": args.compile_backend,
            "compile_mode": args.compile_mode if args.compile_backend == "inductor" else None,
            "seed": args.seed,
            "ours": "patnet.optimize_for_inference(model)",
            "timing": ("time_cuda: warm-up calls, then the timed calls between two "
                       "synchronisations (mean); median and min of per-call CUDA events"
                       if gpu else "time_cpu: warm-up calls, then per-call wall time"),
            "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "mismatch_tolerance": {m[1]: MISMATCH[amp_dtype if m[0] == "amp" else torch.float32]
                                   for m in modes},
            "model_init": "random weights (seeded), patnet.testing.randomize_norms, eval",
        },
        "complete": False, "rows": [],
    }
    print(f"Models on {device_name}: {', '.join(models)}; providers {', '.join(providers)}; "
          f"batch {args.batch} at {args.size} x {args.size}; {args.warmup} warm-up + "
          f"{args.runs} timed calls", flush=True)
    total, index = len(models) * len(modes), 0
    for name in models:
        torch.manual_seed(args.seed)
        reference = randomize_norms(patnet.create_model(name, backend="torch"),
                                    args.seed).eval().to(device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        image = torch.randn(args.batch, 3, args.size, args.size, generator=gen,
                            device=device)
        for kind, precision, layout in modes:
            index += 1
            print(f"[{index}/{total}] {pretty(name)} {precision} {layout}", flush=True)
            fmt = LAYOUTS[layout]
            reference = reference.to(memory_format=fmt)
            x = image.contiguous(memory_format=fmt)
            row = run_mode(name, reference, x, precision,
                           amp_dtype if kind == "amp" else None, layout, providers, args)
            report["rows"].append(row)
            write_files(report, prefix)   # partial results survive a cut-off run
        del reference, image
        if gpu:
            torch.cuda.empty_cache()
    return report, prefix


if __name__ == "__main__":
    sys.exit(main())
