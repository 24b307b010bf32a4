"""Page faults of a CPU forward under glibc's malloc, and the setting that removes them.

    python -m benchmarks.cpu_allocator                 # PATNet-T2, FasterNet-T2; eager and ours
    python -m benchmarks.cpu_allocator --models patnet_t1 --rounds 5 --json out.json

glibc's malloc serves a request above its *mmap threshold* with fresh pages from the kernel
and unmaps them when it is freed, and it hands the top of its heap back to the kernel once
more than its *trim threshold* lies free there. Both thresholds move with the process's
history (freeing a mapped block raises them to its size), so whether a forward's large
temporaries (at batch 1 and 224 x 224, the first stage's maps of 0.8 to 1.6 MB) come as fresh
pages in every forward depends on what the process did before; each fresh page is a page
fault, in which the kernel zeroes it. Fixed thresholds (:data:`FIXED_THRESHOLDS`, glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``: the heap keeps what is freed and
serves every request under 32 MiB from it) remove those faults, at the price of a process
that keeps its peak heap.

Each model and provider (``eager``: the reference model in eval; ``ours``:
``patnet.optimize_for_inference``'s copy) runs alone in a fresh Python process, as an
application runs one model (holding, for ``ours``, the model and its copy: what
``optimize_for_inference`` returns is a copy, and a process that drops the model frees its
tensors, which moves the thresholds), once under glibc's defaults (any ``MALLOC_*`` variable
of the caller's environment removed) and once with the fixed thresholds. Each process times
``--runs`` forwards at batch 1 on one thread (float32, no_grad) after ``--warmup`` and counts
the minor page faults among them (``getrusage``); rounds repeat every process in turn, so that
a shared machine's load reaches all alike, and the table gives the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import env
from .report import columns, fmt, pretty, split_list, write_json
from .timer import cpu_loop

PROVIDERS = ("eager", "ours")
# glibc's variables, as the processes of the "fixed" setting get them: every request under
# 32 MiB (the largest mmap threshold glibc takes on a 64-bit machine) from the heap, and up to
# 256 MiB of it kept free at its top rather than handed back.
FIXED_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
SETTINGS = ("glibc defaults", "fixed thresholds")


def child_env(setting: str) -> Dict[str, str]:
    """The environment of a measuring process under ``setting`` (one of :data:`SETTINGS`)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if setting == SETTINGS[1]:
        environment.update(FIXED_THRESHOLDS)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(env.REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return environment


def time_alone(name: str, provider: str, size: int, warmup: int, runs: int) -> dict:
    """This process's measurement: ``provider``'s forward of ``name`` at batch 1, one thread:
    median ms and minor page faults per forward over ``runs`` forwards after ``warmup``."""
    import resource

    import torch

    import patnet

    torch.set_num_threads(1)
    reference = patnet.create_model(name).eval()  # (kept, as by an application: see doc)
    model = patnet.optimize_for_inference(reference) if provider == "ours" else reference
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        cpu_loop({provider: lambda: model(x)}, warmup, 0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = cpu_loop({provider: lambda: model(x)}, 0, runs)[provider]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"ms": statistics.median(times), "faults_per_forward": faults / runs,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def run_alone(name: str, provider: str, setting: str, args: argparse.Namespace) -> dict:
    """:func:`time_alone` in a fresh Python process under ``setting``."""
    command = [sys.executable, "-m", "benchmarks.cpu_allocator", "--child", name, provider,
               "--size", str(args.size), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    done = subprocess.run(command, env=child_env(setting), cwd=env.REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> List[dict]:
    """A report per model: per provider and setting, each round's measurement and the medians
    over rounds."""
    names, providers = split_list(args.models), split_list(args.providers)
    runs = {(n, p, s): [] for n in names for p in providers for s in SETTINGS}
    for round_index in range(args.rounds):
        print(f"    round {round_index + 1}/{args.rounds}: {len(runs)} processes", flush=True)
        for key in runs:
            runs[key].append(run_alone(*key, args))
    reports = []
    for name in names:
        rows = {}
        for provider in providers:
            rows[provider] = {}
            for setting in SETTINGS:
                measured = runs[(name, provider, setting)]
                rows[provider][setting] = {
                    "ms": statistics.median(m["ms"] for m in measured),
                    "faults_per_forward": statistics.median(
                        m["faults_per_forward"] for m in measured),
                    "rounds": measured}
        reports.append({"model": name, "size": args.size, "rows": rows})
    return reports


def table(report: dict) -> str:
    headers = ["provider"] + [h for s in SETTINGS for h in (f"{s} ms", "faults")] \
        + ["defaults / fixed"]
    cells = []
    for provider, row in report["rows"].items():
        default, fixed = (row[s] for s in SETTINGS)
        cells.append([provider] + [c for s in SETTINGS for c in (
            fmt(row[s]["ms"], ".2f"), fmt(row[s]["faults_per_forward"], ".0f"))]
            + [fmt(default["ms"] / fixed["ms"], ".2f")])
    head, render = columns(headers, cells, left={0})
    title = (f"{pretty(report['model'])}, batch 1 at {report['size']} x {report['size']}, one "
             f"thread, fp32: median ms per forward and minor page faults per forward, each "
             f"provider alone in its process")
    return "\n".join([title] + head + [render(c) for c in cells])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="patnet_t2,fasternet_t2",
                        help="comma list (default patnet_t2,fasternet_t2)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)} (default both)")
    parser.add_argument("--size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PROVIDER"),
                        help=argparse.SUPPRESS)  # (a measuring process: see run_alone)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(time_alone(*args.child, args.size, args.warmup, args.runs)))
        return 0
    unknown = set(split_list(args.providers)) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {', '.join(PROVIDERS)}")
    if platform.libc_ver()[0] != "glibc":
        print("the settings measured here are glibc's malloc's; this Python does not run on "
              "glibc", file=sys.stderr)
        return 2
    reports = measure(args)
    for report in reports:
        print(table(report) + "\n", flush=True)
    if args.json:
        import torch

        write_json(args.json, {**env.run_info(torch.device("cpu")), "threads": 1,
                               "fixed_thresholds": FIXED_THRESHOLDS, "runs": args.runs,
                               "warmup": args.warmup, "rounds": args.rounds,
                               "reports": reports})
    return 0


if __name__ == "__main__":
    sys.exit(main())
