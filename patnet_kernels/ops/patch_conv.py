"""The stem and the merging layers in inference (a non-overlapping k x k, stride-k conv with
bias, BatchNorm folded), for every fused backend that has them (Triton).

The op (registered as ``patnet_triton::patch_conv`` by
:mod:`patnet_kernels.ops.triton.patch_conv`, with its fake there: its statistics' shape is the
kernel's tiling):

* ``patch_conv(x, weight, bias, stats_first, channels_last) -> (y, mean, m2)``: y = conv(x,
  weight, bias, stride k) in the weight's dtype, channels_last or NCHW as ``channels_last``
  says (whatever x's layout), x read in its own dtype and layout (under autocast
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


def output(x: Tensor, weight: Tensor, channels_last: bool) -> Tensor:
    """A new (B, C_OUT, H // k, W // k) output in the weight's dtype, channels_last or NCHW."""
    k = weight.shape[-1]
    return torch.empty((x.shape[0], weight.shape[0], x.shape[2] // k, x.shape[3] // k),
                       dtype=weight.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last
                       else torch.contiguous_format)


# (its one op's fake lives beside its body: the statistics' shape is the Triton kernel's tiling)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.patch_conv` over ``ops``."""

    def patch_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   statistics_of: Optional[int] = None, channels_last: bool = False):
        """The conv with this backend's kernel (inputs checked; no gradient taken)."""
        y, mean, m2 = ops.patch_conv(x, weight, bias,
                                     -1 if statistics_of is None else statistics_of,
                                     channels_last)
        return y if statistics_of is None else (y, (mean, m2))

    return patch_conv
