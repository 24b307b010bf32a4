"""The block's ops in the Triton backend (see :mod:`..partial_block`): importing this module
registers the ``patnet_triton`` ops it composes, and its own,
``channel_attention_chunk_stats(x, c1) -> (mean, m2)``: the statistics of X2 = x[:, c1:] split
over H x W, per pixel chunk its mean and sum of squared deviations, each (B, T, C2) fp32 (chunks
of :func:`patnet_kernels.triton.channel_attention.stats_chunk_pixels`; merged by
``channel_attention_gate``)."""
from __future__ import annotations

from typing import Tuple

import torch

from ...triton import channel_attention as kernels
from ...triton._common import on_tensor_device
from .. import custom_op
from . import channel_attention, partial_conv, pointwise_mlp  # noqa: F401 - registers them

Tensor = torch.Tensor


@custom_op("patnet_triton::channel_attention_chunk_stats", mutates_args=())
@on_tensor_device
def _chunk_stats(x: Tensor, c1: int) -> Tuple[Tensor, Tensor]:
    return kernels.channel_chunk_stats(x, c1)


@_chunk_stats.register_fake
def _chunk_stats_fake(x, c1):
    shape = kernels.chunk_stats_shape(x, c1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)
