"""Dtypes by name and the error measure and tolerance every benchmark checks its providers with.

A provider whose result differs from the reference's by more than MISMATCH[dtype] (max |diff| /
max |reference|, over the output and every gradient) is flagged as a mismatch. Loose on
purpose: eager fp32 convolutions may use TF32 (cudnn's default); this catches wrong kernels,
not rounding.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MISMATCH = {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the whole-model benchmarks: logits against eager's)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def max_rel_error(results: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                  floor: float = 0.0) -> float:
    """The largest max |a - b| / max(max |b|, floor) over pairs of tensors, in float64 (max
    |a - b| where that is 0); NaN if any difference is NaN. ``floor``: the scale below which
    a tensor's values are taken as rounding noise around zero (a gradient that vanishes in
    exact arithmetic, as a bias's that a normalisation follows, is judged against it)."""
    worst = 0.0
    for a, b in zip(results, expected):
        a, b = a.double(), b.double()
        scale = max(b.abs().max().item(), floor)
        diff = (a - b).abs().max().item()
        if math.isnan(diff):
            return float("nan")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
