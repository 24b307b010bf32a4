"""The CPU inference path's measured choices: per kind of call, the reference against the eval
form, and F.conv2d against oneDNN, as this machine timed them.

    python -m benchmarks.cpu_choice_speed                          # PATNet-T2, FasterNet-T2
    python -m benchmarks.cpu_choice_speed --models patnet_t0 --size 32 --json out.json

``patnet.optimize_for_inference``'s copy runs each call of an op with a CPU eval form as the
reference or the eval form, and each float32 convolution of an eval form on F.conv2d or
oneDNN, whichever was faster on the first call of its kind (:mod:`patnet_kernels.cpu_choice`).
This runs one forward of a fresh copy of each model at batch x 3 x size x size with no choice
made before, and prints what each kind of op call kept, with the least time of a round of each
way (``cpu_choice.ROUNDS`` rounds, in turn, after a warm-up run of each): the measurement the
choice was made on. The convolutions are summed (how many kept each; their own times:
``python -m benchmarks.cpu_conv_speed``). The first forward's time, which makes the choices,
and the next one's are printed too; then the eager reference, the copy with every op in its
eval form and every conv on oneDNN (``PATNET_CPU_MEASURE=0``'s path) and the copy with its
choices are timed round-robin in one loop (``--runs`` rounds after 3): what the choices buy.
Float32, as the CPU eval forms run; ratios are what to read (the machine may be shared).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import env
from .report import columns, fmt, pretty
from .timer import time_cpu_round_robin

# The two ways of running the copy timed beside eager.
FIXED = "copy, every op in its eval form (PATNET_CPU_MEASURE=0)"
MEASURED = "copy, measured choices"


def measure(name: str, batch: int, size: int, runs: int) -> dict:
    """The choices a fresh copy of ``name`` makes in its first forward and its first two
    forwards' times; then the eager reference, the copy with every op in its eval form and the
    copy with its choices, timed round-robin (median ms per forward of ``runs`` rounds)."""
    import patnet
    from patnet_kernels import cpu_choice

    model = patnet.create_model(name, backend="torch").eval()
    copy = patnet.optimize_for_inference(model)
    x = torch.randn(batch, 3, size, size)
    cpu_choice.EVAL_FORMS.forget()
    cpu_choice.CONVOLUTIONS.forget()
    forwards = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            copy(x)
            forwards.append(1e3 * (time.perf_counter() - start))

        def fixed():
            with cpu_choice.measuring_as(False):
                copy(x)
        times = time_cpu_round_robin({"eager": lambda: model(x), FIXED: fixed,
                                      MEASURED: lambda: copy(x)}, 3, runs, pretty(name))
    calls = [{"op": key[0], "input": list(key[1]), "kept": label,
              "us": dict(zip(cpu_choice.EVAL_FORMS.labels, (1e6 * t for t in times_)))}
             for key, label, times_ in cpu_choice.EVAL_FORMS.records()]
    return {"model": name, "batch": batch, "size": size, "calls": calls,
            "convolutions_kept": cpu_choice.CONVOLUTIONS.summary(),
            "first_forward_ms": forwards[0], "second_forward_ms": forwards[1],
            "median_ms": {key: t["median_ms"] for key, t in times.items()}}


def table(report: dict) -> str:
    headers = ["op", "input", "reference us", "eval form us", "x eval form", "kept"]
    cells = [[row["op"], "x".join(map(str, row["input"])), fmt(row["us"]["reference"], ".0f"),
              fmt(row["us"]["eval form"], ".0f"),
              fmt(row["us"]["reference"] / row["us"]["eval form"], ".2f"), row["kept"]]
             for row in report["calls"]]
    head, render = columns(headers, cells, left={0, 1, 5})
    eager = report["median_ms"]["eager"]
    kept = ", ".join(f"{label} {n}" for label, n in report["convolutions_kept"].items())
    return "\n".join(
        [f"{pretty(report['model'])}: the copy's measured choices, batch {report['batch']} at "
         f"{report['size']} x {report['size']}, float32 (least us of a round; x eval form: "
         "reference us / eval form us)"]
        + head + [render(c) for c in cells]
        + [f"convolutions of the eval forms, kinds kept: {kept}",
           f"forward 1 (makes the choices) {report['first_forward_ms']:.1f} ms, forward 2 "
           f"{report['second_forward_ms']:.1f} ms"]
        + [f"{key}: {ms:.2f} ms a forward (median, round-robin), eager / it "
           f"{eager / ms:.2f}x" for key, ms in report["median_ms"].items()])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50,
                        help="timed round-robin rounds of the three forwards (default 50)")
    args = env.cpu_model_arguments(parser, argv)
    from patnet_kernels import cpu_choice

    if not cpu_choice.measuring():
        print("PATNET_CPU_MEASURE=0 is set: the copy makes no measured choice; unset it",
              file=sys.stderr)
        return 2
    return env.run_cpu_models(args, lambda name: measure(name, args.batch, args.size, args.runs),
                              table, {"rounds": cpu_choice.ROUNDS, "runs": args.runs})


if __name__ == "__main__":
    sys.exit(main())
