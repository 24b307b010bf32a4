"""The block's ops in the Triton backend (see :mod:`..partial_block`): importing this module
registers the ``patnet_triton`` ops it composes, and its own,
``partial_conv3x3_stats(x, weight) -> (y1, mean, m2)``: conv3x3(X1) alone, (B, C1, H, W), in
the same launch as the statistics of X2 per pixel chunk, each (B, T, C2) fp32 (chunk means and
sums of squared deviations, merged by ``channel_attention_gate``; T from
:func:`patnet_kernels.triton.partial_conv.stats_chunks`)."""
from __future__ import annotations

from typing import Tuple

import torch

from ...triton import partial_conv as kernels
from ...triton._common import on_tensor_device
from . import channel_attention, partial_conv, pointwise_mlp  # noqa: F401 - registers them
from .._layout import empty_activation

Tensor = torch.Tensor


def _stats_shape(x: Tensor, weight: Tensor):
    b, c, h, w = x.shape
    c1 = weight.shape[0]
    return (b, kernels.stats_chunks(c1, h, w), c - c1)


@torch.library.custom_op("patnet_triton::partial_conv3x3_stats", mutates_args=())
@on_tensor_device
def _conv_stats(x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    b, _, h, w = x.shape
    y1 = empty_activation(x, (b, weight.shape[0], h, w))
    mean = torch.empty(_stats_shape(x, weight), device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    kernels.conv3x3_passthrough(x, kernels.forward_taps(weight), y1, copy_rest=False,
                                stats=(mean, m2))
    return y1, mean, m2


@_conv_stats.register_fake
def _conv_stats_fake(x, weight):
    b, _, h, w = x.shape
    stats = x.new_empty(_stats_shape(x, weight), dtype=torch.float32)
    return (empty_activation(x, (b, weight.shape[0], h, w)), stats,
            x.new_empty(stats.shape, dtype=torch.float32))
