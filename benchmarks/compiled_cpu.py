"""The compiled models on the CPU: Inductor's C++ wrapper against its Python one.

    python -m benchmarks.compiled_cpu                     # PATNet-T2, FasterNet-T2, PATNet-T1
    python -m benchmarks.compiled_cpu --models patnet_t1 --runs 100 --json out.json

``patnet.optimize_for_inference(model, compile=True)`` runs its copy compiled by Inductor under
``freezing`` (:class:`patnet.wrappers.FrozenCompiledModel`), on the CPU with Inductor's C++
wrapper: the compiled graph's kernel and library calls issued from C++ rather than from
generated Python, which at batch 1 costs a few microseconds per call. This times, at batch 1 on
one thread (float32, no_grad, 224 x 224), round-robin in one loop so that a shared machine's
load reaches all alike:

- ``reference, frozen`` and ``reference, frozen, C++``: the eager reference compiled the same
  way, with the Python wrapper and with the C++ one;
- ``ours``: the uncompiled inference copy;
- ``ours, frozen`` and ``ours, frozen, C++``: the copy compiled, with each wrapper (the last is
  what ``compile=True`` runs on the CPU).

Prints per model the median ms of each and the C++ wrapper's gain, with each compile's time;
the outputs are checked against the eager reference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import env
from .report import columns, fmt, pretty, split_list, write_json
from .timer import time_cpu_round_robin
from .tolerance import rel_max_error

VARIANTS = ("reference, frozen", "reference, frozen, C++", "ours", "ours, frozen",
            "ours, frozen, C++")
TOLERANCE = 1e-4  # max |variant - reference| / max |reference|, float32


def variants(name: str) -> Dict[str, torch.nn.Module]:
    """The models of :data:`VARIANTS` for ``name`` (random weights, BatchNorms randomised),
    and the eager reference under "eager"."""
    import patnet
    from patnet.testing import randomize_norms
    from patnet.wrappers import FrozenCompiledModel

    torch._dynamo.reset()  # (the models of a run share forward code: the recompile limit)
    torch.manual_seed(0)
    reference = randomize_norms(patnet.create_model(name), 0).eval()
    ours = patnet.optimize_for_inference(reference)
    return {"eager": reference,
            "reference, frozen": FrozenCompiledModel(reference, cpp_wrapper=False),
            "reference, frozen, C++": FrozenCompiledModel(reference, cpp_wrapper=True),
            "ours": ours,
            "ours, frozen": FrozenCompiledModel(ours, cpp_wrapper=False),
            "ours, frozen, C++": FrozenCompiledModel(ours, cpp_wrapper=True)}


def measure(name: str, warmup: int, runs: int) -> dict:
    """One model's report: each variant's first-call seconds (its compile), its error against
    the eager reference and its round-robin times."""
    models = variants(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    first_call_s, errors = {}, {}
    with torch.no_grad():
        want = models["eager"](x)
        for key in VARIANTS:
            print(f"    {pretty(name)}: first call of {key}", flush=True)
            start = time.perf_counter()
            got = models[key](x)
            first_call_s[key] = time.perf_counter() - start
            errors[key] = rel_max_error(got, want)
        times = time_cpu_round_robin({key: (lambda m=models[key]: m(x)) for key in VARIANTS},
                                     warmup, runs, f"{pretty(name)} round-robin")
    return {"model": name, "first_call_s": first_call_s, "max_rel_error": errors,
            "ms": {key: times[key]["median_ms"] for key in VARIANTS}, "times": times}


def table(report: dict) -> str:
    ms = report["ms"]
    cells = [[key, fmt(ms[key], ".2f"), fmt(report["first_call_s"][key], ".1f"),
              f"{report['max_rel_error'][key]:.1e}"] for key in VARIANTS]
    head, render = columns(["variant", "median ms", "first call s", "err vs eager"], cells,
                           left={0})
    reference_gain = ms["reference, frozen"] / ms["reference, frozen, C++"]
    ours_gain = ms["ours, frozen"] / ms["ours, frozen, C++"]
    ours_vs_reference = ms["reference, frozen, C++"] / ms["ours, frozen, C++"]
    gains = [f"C++ wrapper: reference {reference_gain:.2f}x, ours {ours_gain:.2f}x; ours "
             f"compiled (C++) vs reference compiled (C++) {ours_vs_reference:.2f}x"]
    title = f"{pretty(report['model'])}, batch 1 at 224 x 224, one thread, fp32, round-robin"
    return "\n".join([title] + head + [render(c) for c in cells] + gains)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="patnet_t2,fasternet_t2,patnet_t1",
                        help="comma list (default patnet_t2,fasternet_t2,patnet_t1)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    reports, failures = [], []
    with env.cpu_threads(torch.device("cpu"), 1):
        for name in split_list(args.models):
            reports.append(measure(name, args.warmup, args.runs))
            print(table(reports[-1]) + "\n", flush=True)
            failures += [f"{name} {key}: {error:.1e}" for key, error
                         in reports[-1]["max_rel_error"].items() if error > TOLERANCE]
    if args.json:
        write_json(args.json, {**env.run_info(torch.device("cpu")), "threads": 1,
                               "runs": args.runs, "warmup": args.warmup, "reports": reports})
    if failures:
        print("MISMATCH against the eager reference:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
