"""PAT_ch's ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.channel_attention`; fakes, gate and autograd in
:mod:`..channel_attention`. ``channel_attention_gate`` (the eval gate as one kernel) is
Triton's alone. The backward also needs ``conv3x3_weight_grad``, registered by
:mod:`.partial_conv` (imported here)."""
from __future__ import annotations

from typing import Optional, Tuple

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


@torch.library.custom_op("patnet_triton::channel_attention_gate", mutates_args=())
@on_tensor_device
def _gate(mean: Tensor, std: Tensor, pixels: int, cfc_weight: Tensor,
          cfc_bias: Optional[Tensor], a_weight: Optional[Tensor], a_bias: Optional[Tensor],
          a_mean: Optional[Tensor], a_var: Optional[Tensor], eps_a: float,
          b_weight: Optional[Tensor], b_bias: Optional[Tensor], b_mean: Tensor, b_var: Tensor,
          eps_b: float, has_a: bool) -> Tuple[Tensor, Tensor]:
    def vector(t):
        return None if t is None else t.contiguous()

    bn_a = (tuple(map(vector, (a_weight, a_bias, a_mean, a_var))) + (eps_a,)) if has_a else None
    bn_b = tuple(map(vector, (b_weight, b_bias, b_mean, b_var))) + (eps_b,)
    return kernels.channel_gate(mean.contiguous(), std.contiguous(), cfc_weight.contiguous(),
                                vector(cfc_bias), bn_a, bn_b, pixels)


@_gate.register_fake
def _gate_fake(mean, std, pixels, cfc_weight, cfc_bias, a_weight, a_bias, a_mean, a_var,
               eps_a, b_weight, b_bias, b_mean, b_var, eps_b, has_a):
    # (Triton only: the CUDA extension has no gate op, so this fake is not in spec.FAKES)
    shape = (mean.shape[0], mean.shape[-1])
    return mean.new_empty(shape), mean.new_empty(shape)


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
