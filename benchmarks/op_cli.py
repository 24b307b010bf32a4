"""The command line of the op-family scripts (bench_partial_conv.py, ...): parses the options,
runs every case (op_cases), writes the JSON report after each and prints the table, the summary
and the targets (op_tables). ``main_of(FAMILY)`` is a family script's ``main``.

The JSON report goes to ``--json`` or benchmarks/results/<family>.<device>.json (``.local``
for CPU and --quick runs); the table goes to stdout, progress (one line per case and provider)
to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import torch

from benchmarks import env
from benchmarks.op_cases import run_case
from benchmarks.op_family import Family
from benchmarks.op_tables import check_targets, format_table, summary_lines
from benchmarks.report import matching_shapes, split_list, write_json
from benchmarks.timer import Timer, measure_copy_bandwidth
from benchmarks.tolerance import DTYPE_NAMES, DTYPES, MISMATCH


def parse_args(family: Family, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.bench_{family.name}",
        description=f"Benchmark {family.title}: {' vs '.join(family.providers)}.")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of float16, bfloat16, float32 (default: "
                             f"{family.default_dtypes}; --quick on the CPU: float32)")
    parser.add_argument("--batches", default=None,
                        help="comma list, for every shape (default: 1,64,256, or the family's "
                             "batches per shape; --quick: 2)")
    parser.add_argument("--modes", default=",".join(family.modes),
                        help=f"comma list of {', '.join(family.modes)} (default: all)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of substrings of the shape names to keep, e.g. "
                             "'fasternet_t2.s1,patnet_t2' (names: <model>.s<stage>)")
    parser.add_argument("--providers", default=None,
                        help=f"comma list, default all: {', '.join(family.providers)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (the networks shrunk: embed_dim 8, 32 x 32 input), "
                             "batch 2, few runs: a smoke run; on the CPU the compiled "
                             f"providers ({', '.join(family.compiled_providers)}) are skipped")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON report (default: benchmarks/results/"
                             f"{family.name}.<device>.json; .local.json for CPU or --quick runs)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench repetition")
    parser.add_argument("--warmup", type=int, default=None, help="CPU: warm-up calls (2)")
    parser.add_argument("--runs", type=int, default=None, help="CPU: timed calls (10; quick 3)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of each copy buffer (default 1024 MiB on GPU, 64 on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (default 1, as the authors time CPU latency; "
                             "also robust on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw",
                        help="memory format of the op's (B, C, H, W) activation (not for the "
                             "attention, whose (B, heads, N, d) tensors have none)")
    args = parser.parse_args(argv)
    if args.layout == "channels_last" and family.name == "rpe_attention":
        parser.error("--layout channels_last: the attention's (B, heads, N, d) tensors have no "
                     "channels_last form; leave --layout out")
    return args


def run(family: Family, argv=None) -> int:
    """Entry point of a family script. Returns 0, or 1 if a provider failed or mismatched."""
    args = parse_args(family, argv)
    device = env.pick_device(args.device)
    with env.cpu_threads(device, args.threads):
        return _run(family, args, argv, device)


def main_of(family: Family) -> Callable[[Optional[List[str]]], int]:
    """The ``main(argv=None)`` of a family script."""
    def main(argv=None) -> int:
        return run(family, argv)
    main.__doc__ = f"Benchmark {family.title} (``python -m benchmarks.bench_{family.name}``)."
    return main


def _run(family: Family, args: argparse.Namespace, argv, device: torch.device) -> int:
    cpu = device.type == "cpu"
    notes = list(family.notes)
    if cpu and "triton" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        # Triton kernels reach CPU tensors only through its interpreter, chosen before import.
        os.environ["TRITON_INTERPRET"] = "1"
    if cpu and "cuda" in family.providers and not os.environ.get("PATNET_CUDA_EMULATE"):
        # The CUDA kernels reach CPU tensors only through their CPU emulation.
        os.environ["PATNET_CUDA_EMULATE"] = "1"
        notes.append("cuda runs the CUDA kernels' CPU emulation (PATNET_CUDA_EMULATE=1): its "
                     "times say nothing about GPU speed")
    if cpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append("Triton runs under its interpreter (TRITON_INTERPRET=1) on the CPU: its "
                     "times say nothing about GPU speed")
    if cpu:
        notes.append("CPU run: a smoke test of the harness; no figure here is a GPU result")

    dtypes_text = args.dtypes or ("float32" if (args.quick and cpu) else family.default_dtypes)
    try:
        dtypes = [DTYPES[d.lower()] for d in split_list(dtypes_text)]
    except KeyError as e:
        raise SystemExit(f"unknown dtype {e}; choose from {', '.join(DTYPES)}")
    given_batches = [int(b) for b in split_list(args.batches)] if args.batches else None
    modes = split_list(args.modes)
    for mode in modes:
        if mode not in family.modes:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(family.modes)}")
    providers = family.providers
    if args.providers:
        wanted = split_list(args.providers)
        unknown = set(wanted) - set(providers)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {providers}")
        providers = [p for p in providers if p in wanted]
    if "torch" not in providers:
        providers = ["torch"] + providers  # the reference: speed-ups and the parity check
    shapes = matching_shapes(family.shapes(args.quick), args.shapes)
    batches_of = {s.name: given_batches or family.batches_of(s, args.quick) for s in shapes}
    batches = sorted({b for bs in batches_of.values() for b in bs})
    skipped = {}
    if args.quick and cpu:
        for provider in family.compiled_providers:
            if provider in providers and not (args.providers and provider in wanted):
                skipped[provider] = "--quick on the CPU"
        if skipped:
            names = ", ".join(skipped)
            notes.append(f"{names} {'is' if len(skipped) == 1 else 'are'} skipped in --quick "
                         "runs on the CPU (compiling takes seconds per case there); name "
                         f"{'it' if len(skipped) == 1 else 'them'} in --providers, or drop "
                         "--quick, to time "
                         f"{'it' if len(skipped) == 1 else 'them'}")

    timer = Timer(device, args.warmup_ms, args.rep_ms,
                  2 if args.warmup is None else args.warmup,
                  args.runs if args.runs is not None else (3 if args.quick else 10))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cuda_name = None if cpu else env.device_name(device)
    device_name = env.device_name(device)
    default_json = (env.RESULTS /
                    f"{family.name}.{env.slug(cuda_name or 'cpu')}"
                    f"{'.channels_last' if args.layout == 'channels_last' else ''}"
                    f"{'.quick' if args.quick else ''}{'.local' if (cpu or args.quick) else ''}.json")
    json_path = Path(args.json) if args.json else default_json

    log = sys.stderr
    print(f"{family.title} on {device_name}", file=log, flush=True)
    copy_mib = args.copy_mib or (64 if cpu else 1024)
    copy = measure_copy_bandwidth(timer, copy_mib << 20)
    print(f"copy bandwidth (the ceiling): {copy['gbps']:,.1f} GB/s "
          f"({copy['what']}, 2 x {copy_mib} MiB)", file=log, flush=True)

    report = {
        "benchmark": family.name, "title": family.title,
        **env.run_info(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "settings": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "dtypes": [DTYPE_NAMES[d] for d in dtypes], "batches": batches,
            "batches_per_shape": batches_of, "modes": modes,
            "providers": providers, "quick": args.quick, "compile_mode": args.compile_mode,
            "timing": timer.method, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "mismatch_tolerance": {DTYPE_NAMES[d]: MISMATCH[d] for d in dtypes},
            "checked_against": ("the reference in fp32 on the inputs upcast (fp16 / bf16 "
                                "cases), eager itself in fp32 cases" if family.fp32_reference
                                else "eager (the torch provider) in the case's dtype"),
            "seed": args.seed,
            "layout": ("channels_last (the activation)" if args.layout == "channels_last"
                       else "NCHW (contiguous)"),
            "cpu_threads": torch.get_num_threads() if cpu else None,
        },
        "modes": {m: family.mode_text[m] for m in modes},
        "byte_formulas": {m: family.formulas[m] for m in modes},
        "flop_formulas": ({m: family.flop_formulas[m] for m in modes}
                          if family.flops is not None else None),
        "speedups": {f"speedup_vs_{label}": provider
                     for label, provider in family.speedups.items()},
        "shapes": [dict(asdict(s), name=s.name) for s in shapes],
        "copy_bandwidth": copy, "notes": notes, "complete": False, "rows": [],
    }

    cases = [(s, b, d, m) for d in dtypes for m in modes for s in shapes
             for b in batches_of[s.name]]
    for index, (shape, batch, dtype, mode) in enumerate(cases, 1):
        label = (f"{shape.name} B={batch} C={shape.channels} {shape.height}x{shape.width} "
                 f"{DTYPE_NAMES[dtype]} {mode}")
        print(f"[{family.name} {index}/{len(cases)}] {label}", file=log, flush=True)
        row = run_case(family, shape, batch, dtype, mode, providers, timer, copy["gbps"],
                       skipped, args.compile_mode, args.seed, args.layout)
        for provider in providers:
            entry = row["providers"][provider]
            text = (f"{entry['ms'] * 1e3:,.1f} us, {entry['gbps']:,.1f} GB/s"
                    if entry.get("ms") is not None else "")
            if entry["status"] != "ok":
                text += (" " if text else "") + f"{entry['status']}: {entry.get('reason', '')}"
            print(f"    {provider:<14} {text}", file=log, flush=True)
        report["rows"].append(row)
        write_json(json_path, report)  # partial results survive

    report["complete"] = True
    write_json(json_path, report)
    print_report(family, report, providers, modes, notes, timer, copy, json_path, cuda_name)
    bad = [(r["shape"], r["batch"], r["dtype"], r["mode"], p, e["status"])
           for r in report["rows"] for p, e in r["providers"].items()
           if e["status"] in ("error", "mismatch")]
    if bad:
        print(f"{len(bad)} provider runs failed or mismatched the reference:")
        for item in bad[:20]:
            print("  " + " ".join(map(str, item)))
        return 1
    return 0


def print_report(family: Family, report: dict, providers: List[str], modes: List[str],
                 notes: List[str], timer: Timer, copy: dict, json_path: Path,
                 cuda_name: Optional[str]) -> None:
    """The report on stdout: device, timing, formulas, notes, table, summary and targets."""
    print(f"{family.title}")
    print(f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
          f"commit {report['git_commit']}")
    print(f"timing: {timer.method}")
    print(f"copy bandwidth (the ceiling of '% copy'): {copy['gbps']:,.1f} GB/s "
          f"({copy['what']})")
    for mode in modes:
        print(f"{mode}: {family.mode_text[mode]}")
        print(f"  bytes: {family.formulas[mode]}")
        if family.flops is not None:
            print(f"  FLOPs: {family.flop_formulas[mode]}")
    for note in notes:
        print(f"note: {note}")
    print()
    labels = list(family.speedups)
    has_flops = family.flops is not None
    print(format_table(report["rows"], providers, labels, has_flops))
    summary = summary_lines(report["rows"], providers, labels, has_flops)
    if summary:
        print("\nSummary (speed-ups: geometric mean over shapes)")
        print("\n".join(summary))
    targets = check_targets(family, report["rows"], cuda_name)
    if targets:
        print("\nTargets of the issue")
        print("\n".join(targets))
    print(f"\nReport written to {json_path}")
