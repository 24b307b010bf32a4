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
  blocks); which backend runs each op is recorded (``backends``);
* ``ours-graph`` (GPU only, when named): the same captured once as a CUDA graph for the
  benchmark's input (``patnet.cuda_graph.GraphedModel``, what
  ``optimize_for_inference(..., example_input=x)`` returns): one launch per forward, and one
  copy of the input into the graph's buffer (timed with it).

On a GPU: images/s at batch 256, fp32 and AMP (``torch.autocast``, fp16 or bf16), NCHW and
channels_last, cudnn.benchmark on, 50 warm-up + 200 timed calls between two synchronisations
(benchmarks/timer.py). On the CPU: latency at batch 1 with one thread, fp32, NCHW, 10 warm-up
+ 200 timed calls (the authors' way, SPEC.md section 7). Writes PREFIX.json, PREFIX.csv and
PREFIX.png (rewritten after every case, so a run cut off keeps what it measured); --merge joins
the JSON of runs split across several commands. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks import env  # noqa: E402
from benchmarks.model_measure import (DEFAULT_PROVIDERS, LAYOUTS, PRECISIONS,  # noqa: E402
                                      PROVIDERS, run_mode)
from benchmarks.model_report import (  # noqa: E402
    default_prefix as _default_prefix, finish, format_table, merge, write_files)
from benchmarks.report import pretty, split_list  # noqa: E402
from benchmarks.tolerance import DTYPE_NAMES, DTYPES, MISMATCH  # noqa: E402
from patnet.testing import randomize_norms  # noqa: E402

__all__ = ["DEFAULT_MODELS", "LAYOUTS", "PRECISIONS", "PROVIDERS", "finish", "format_table",
           "main", "merge", "parse_args", "run_mode", "write_files"]

REPO = env.REPO
SIZES = ("t0", "t1", "t2", "s", "m", "l")
DEFAULT_MODELS = [f"{family}_{size}" for size in SIZES for family in ("patnet", "fasternet")]


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
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help="comma list of eager, compile, compile-frozen (torch.compile "
                             "under Inductor's freezing), compile-max (torch.compile "
                             "mode='max-autotune', GPU only), ours, ours-compiled "
                             "(optimize_for_inference(compile=True)), ours-graph (ours as one "
                             "CUDA graph, GPU only) (default: eager,compile,ours; eager, the "
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
    parser.add_argument("--ours-backend", default="auto", choices=list(pk.BACKENDS),
                        help="the backend of \"ours\", patnet.optimize_for_inference(model, "
                             "backend) (default auto; triton: every fused kernel, measured "
                             "or not)")
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
            "ours": f"patnet.optimize_for_inference(model, backend={args.ours_backend!r})",
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
