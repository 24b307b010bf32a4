"""The stem and the merging layers in inference (reference): a non-overlapping k x k, stride-k
convolution with bias (their BatchNorm folded, :func:`patnet.fuse_for_inference`). SPEC.md
section 5."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .channel_attention import output_statistics


def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               statistics_of: Optional[int] = None, channels_last: Optional[bool] = None):
    """conv(x, weight, bias) with stride k: x (B, C_IN, H, W), converted to the weight's dtype
    first; weight (C_OUT, C_IN, k, k); bias (C_OUT,) or None. Returns (B, C_OUT, H // k,
    W // k) in the weight's dtype, channels_last or NCHW as ``channels_last`` asks (None:
    conv2d's own choice, x's memory format), or with
    ``statistics_of`` = C1 (y, :func:`output_statistics` of y[:, C1:]): what the next stage's
    first PAT_ch block reads."""
    return patch_output(F.conv2d(x.to(weight.dtype), weight, bias, stride=weight.shape[-1]),
                        statistics_of, channels_last)


def patch_output(y: torch.Tensor, statistics_of: Optional[int], channels_last: Optional[bool]):
    """The patch conv's output y (B, C_OUT, H', W') as :func:`patch_conv` returns it: in the
    layout ``channels_last`` asks (None: as it is), with its statistics where
    ``statistics_of`` is given."""
    if channels_last is not None:
        y = y.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return y if statistics_of is None else (y, output_statistics(y, statistics_of))
