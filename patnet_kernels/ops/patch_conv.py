"""The stem and the merging layers in inference (a non-overlapping k x k, stride-k conv with
bias, BatchNorm folded), for every fused backend that has them (Triton).

The op (registered as ``patnet_triton::patch_conv`` by
:mod:`patnet_kernels.ops.triton.patch_conv`, with its fake there: its statistics' shape is the
kernel's tiling):

* ``patch_conv(x, weight, bias, stats_first) -> (y, mean, m2)``: y = conv(x, weight, bias,
  stride k) in the weight's dtype and x's memory format, x read in its own dtype (under autocast
  the float32 image, with no cast pass); with ``stats_first`` >= 0 also the statistics of
  y[:, stats_first:] per tile of pixels, each (B, T, C_OUT - stats_first) fp32 (what the next
  stage's first PAT_ch block reads, see :mod:`.partial_block`); < 0: none, both (B, 0, 0).

An inference op: it has no backward, and the registry refuses a call through which a gradient
may be taken (:func:`patnet_kernels.registry.refusals`).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def output_shape(x: Tensor, weight: Tensor):
    """(B, C_OUT, H // k, W // k): the shape of the output."""
    k = weight.shape[-1]
    return (x.shape[0], weight.shape[0], x.shape[2] // k, x.shape[3] // k)


# (its one op's fake lives beside its body: the statistics' shape is the Triton kernel's tiling)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.patch_conv` over ``ops``."""

    def patch_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   statistics_of: Optional[int] = None):
        """The conv with this backend's kernel (inputs checked; no gradient taken)."""
        y, mean, m2 = ops.patch_conv(x, weight, bias,
                                     -1 if statistics_of is None else statistics_of)
        return y if statistics_of is None else (y, (mean, m2))

    return patch_conv
