"""The CPU inference path's convolutions: PyTorch's F.conv2d against oneDNN, per shape.

    python -m benchmarks.cpu_conv_speed                          # PATNet-T2, FasterNet-T2
    python -m benchmarks.cpu_conv_speed --models patnet_t1 --batch 8 --threads 2 --json out.json
    python -m benchmarks.cpu_conv_speed --models patnet_t0 --size 32   # a small input

Every convolution (and linear layer run as one) that ``patnet.optimize_for_inference``'s copy
runs on the CPU (:func:`patnet_kernels.cpu_conv.conv2d`), every op in its eval form
(``PATNET_CPU_MEASURE=0``'s path), is recorded in one forward of each model at 224 x 224
(``--size``), with its input as the copy has it (channels_last). Each distinct shape is then
timed, round-robin in one loop so that a shared machine's load reaches all alike:

- ``F.conv2d``: what the reference runs (and the activation after it), PyTorch's choice of
  kernel (at batch 1 on one thread its im2col + GEMM path for 1 x 1 and small 3 x 3 convs);
- ``oneDNN``: ``torch.ops.mkldnn._convolution_pointwise`` with the dense weight (reordered by
  oneDNN in every call);
- ``ours``: :func:`patnet_kernels.cpu_conv.conv2d` on a frozen weight, what the copy runs:
  oneDNN with the weight reordered once, or F.conv2d, whichever was faster on the first call
  of the shape (:mod:`patnet_kernels.cpu_choice`; ``PATNET_CPU_MEASURE=0``: oneDNN; F.conv2d
  for a single output channel).

Printed per shape with its calls per forward, and summed per forward (each shape's median
times its calls): the convolutions' share of a forward under each. Ratios are what to read: the
machine may be shared. Float32, as the CPU eval forms run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import env
from .report import columns, fmt, pretty
from .timer import cpu_loop, quantiles

RUNNERS = ("F.conv2d", "oneDNN", "ours")


def conv_calls(name: str, batch: int, size: int = 224) -> Dict[tuple, int]:
    """The convolutions of ``name``'s inference copy in one forward at ``batch`` x 3 x
    ``size`` x ``size``: (input shape, weight shape, stride, padding, activation, whether a
    residual is added in it) -> calls per forward."""
    import patnet
    from patnet_kernels import cpu_choice, cpu_conv, eval_cpu

    copy = patnet.optimize_for_inference(patnet.create_model(name).eval())
    calls: Dict[tuple, int] = {}

    def recording(x, weight, bias=None, stride=1, padding=0, activation=None, add=None):
        key = (tuple(x.shape), tuple(weight.shape), bias is not None, stride, padding,
               activation, add is not None)
        calls[key] = calls.get(key, 0) + 1
        return cpu_conv.conv2d(x, weight, bias, stride, padding, activation, add)

    real = eval_cpu.conv2d
    eval_cpu.conv2d = recording
    try:  # (every op in its eval form, run once: no measured choice)
        with torch.no_grad(), cpu_choice.measuring_as(False):
            copy(torch.randn(batch, 3, size, size))
    finally:
        eval_cpu.conv2d = real
    return calls


def _runners(key: tuple):
    """The three ways of running one recorded convolution, on fresh random tensors."""
    from patnet_kernels import cpu_conv

    x_shape, w_shape, has_bias, stride, padding, activation, adds = key
    x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last)
    pair = cpu_conv._pair
    weight = torch.randn(w_shape) / (w_shape[1] ** 0.5)
    bias = torch.randn(w_shape[0]) if has_bias else None
    frozen = torch.nn.Parameter(weight.clone(), requires_grad=False)
    weight4d = cpu_conv._as_4d(weight)
    add = (torch.randn_like(F.conv2d(x, weight4d, None, stride, padding)) if adds else None)
    act = {None: lambda y: y, "relu": F.relu_, "gelu": F.gelu}[activation]
    attr, algorithm = cpu_conv._POST_OPS[activation]

    def reference():
        y = F.conv2d(x, weight4d, bias, stride, padding)
        return act(y) if add is None else y.add_(add)

    def onednn():
        if add is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, add, weight4d, bias, pair(padding), pair(stride), (1, 1), 1, "add", None,
                None, [], None)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight4d, bias, pair(padding), pair(stride), (1, 1), 1, attr, [], algorithm)

    def ours():
        return cpu_conv.conv2d(x, frozen, bias, stride, padding, activation, add)
    return dict(zip(RUNNERS, (reference, onednn, ours)))


def measure(name: str, batch: int, warmup: int, runs: int, size: int = 224) -> dict:
    """Per shape of ``name``'s copy, the median ms of each runner; and the sums per forward."""
    rows: List[dict] = []
    for key, count in conv_calls(name, batch, size).items():
        times = cpu_loop(_runners(key), warmup, runs)
        medians = {runner: quantiles(t)["ms"] for runner, t in times.items()}
        rows.append({"input": list(key[0]), "weight": list(key[1]), "bias": key[2],
                     "stride": key[3], "padding": key[4], "activation": key[5],
                     "residual": key[6],
                     "calls": count, "ms": medians})
    totals = {runner: sum(r["ms"][runner] * r["calls"] for r in rows) for runner in RUNNERS}
    return {"model": name, "batch": batch, "size": size, "shapes": rows,
            "ms_per_forward": totals}


def table(report: dict) -> str:
    headers = ["input", "weight", "act", "calls"] + [f"{r} ms" for r in RUNNERS] + ["x ours"]
    cells = []
    for row in report["shapes"]:
        ms = row["ms"]
        cells.append(["x".join(map(str, row["input"])), "x".join(map(str, row["weight"])),
                      (row["activation"] or "-") + (" +res" if row["residual"] else ""),
                      str(row["calls"])]
                     + [fmt(ms[r], ".3f") for r in RUNNERS]
                     + [fmt(ms["F.conv2d"] / ms["ours"], ".2f")])
    totals = report["ms_per_forward"]
    cells.append(["per forward", "", "", str(sum(r["calls"] for r in report["shapes"]))]
                 + [fmt(totals[r], ".2f") for r in RUNNERS]
                 + [fmt(totals["F.conv2d"] / totals["ours"], ".2f")])
    head, render = columns(headers, cells, left={0, 1, 2})
    title = (f"{pretty(report['model'])}: the inference copy's convolutions, batch "
             f"{report['batch']} at {report['size']} x {report['size']}, float32, "
             "channels_last, median ms per call")
    return "\n".join([title] + head + [render(c) for c in cells])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    args = env.cpu_model_arguments(parser, argv)
    from patnet_kernels import cpu_conv

    refusal = cpu_conv.onednn_refusal()
    if refusal is not None:
        print(f"oneDNN cannot run here: {refusal}", file=sys.stderr)
        return 2
    return env.run_cpu_models(
        args, lambda name: measure(name, args.batch, args.warmup, args.runs, args.size), table,
        {"runs": args.runs})


if __name__ == "__main__":
    sys.exit(main())
