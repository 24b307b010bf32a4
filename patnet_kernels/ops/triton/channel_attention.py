"""PAT_ch's ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.channel_attention`; fakes, gate and autograd in
:mod:`..channel_attention`. The backward also needs ``conv3x3_weight_grad``, registered by
:mod:`.partial_conv` (imported here)."""
from __future__ import annotations

from typing import Tuple

import torch

from ...triton import channel_attention as kernels
from ...triton import partial_conv as conv_kernels
from ...triton._common import on_tensor_device
from .. import channel_attention as spec, register_fakes
from .._layout import empty_activation
from . import partial_conv as _conv_ops  # noqa: F401 (registers conv3x3_weight_grad)

Tensor = torch.Tensor


@torch.library.custom_op("patnet_triton::channel_attention_stats", mutates_args=())
@on_tensor_device
def _stats(x: Tensor, c1: int) -> Tuple[Tensor, Tensor]:
    return kernels.channel_stats(x, c1)


@torch.library.custom_op("patnet_triton::channel_attention_apply", mutates_args=())
@on_tensor_device
def _apply(x: Tensor, conv_weight: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return kernels.conv3x3_affine(x, conv_kernels.forward_taps(conv_weight),
                                  empty_activation(x, x.shape), scale.contiguous(),
                                  shift.contiguous())


@torch.library.custom_op("patnet_triton::channel_attention_grad_sums", mutates_args=())
@on_tensor_device
def _grad_sums(x: Tensor, grad_y: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    return kernels.channel_grad_sums(x, grad_y, mean.contiguous())


@torch.library.custom_op("patnet_triton::channel_attention_input_grad", mutates_args=())
@on_tensor_device
def _input_grad(grad_y: Tensor, x: Tensor, conv_weight: Tensor, scale: Tensor, center: Tensor,
                slope: Tensor, offset: Tensor) -> Tensor:
    return kernels.conv3x3_affine(grad_y, conv_kernels.transposed_taps(conv_weight),
                                  empty_activation(x, x.shape), scale.contiguous(),
                                  offset.contiguous(), aux=x, center=center.contiguous(),
                                  slope=slope.contiguous())


register_fakes("patnet_triton", spec.FAKES)
