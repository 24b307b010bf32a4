"""PAT_ch's ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.channel_attention`; fakes, gate and autograd in
:mod:`..channel_attention`. The gate ops (``channel_attention_gate``, forward in eval and
training, and ``channel_attention_gate_backward``) are Triton's alone. The backward also needs
``conv3x3_weight_grad``, registered by :mod:`.partial_conv` (imported here)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...triton import channel_attention as kernels
from ...triton import partial_conv as conv_kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, channel_attention as spec
from .._layout import empty_activation
from . import partial_conv as _conv_ops  # noqa: F401 (registers conv3x3_weight_grad)

Tensor = torch.Tensor


@custom_op("patnet_triton::channel_attention_stats", mutates_args=())
@on_tensor_device
def _stats(x: Tensor, c1: int) -> Tuple[Tensor, Tensor]:
    return kernels.channel_stats(x, c1)


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@custom_op("patnet_triton::channel_attention_gate", mutates_args=())
@on_tensor_device
def _gate(mean: Tensor, std: Tensor, pixels: int, cfc_weight: Tensor,
          cfc_bias: Optional[Tensor], a_weight: Optional[Tensor], a_bias: Optional[Tensor],
          a_mean: Optional[Tensor], a_var: Optional[Tensor], eps_a: float,
          b_weight: Optional[Tensor], b_bias: Optional[Tensor], b_mean: Optional[Tensor],
          b_var: Optional[Tensor], eps_b: float, has_a: bool, training: bool
          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    bn_a = (tuple(map(_vector, (a_weight, a_bias, a_mean, a_var))) + (eps_a,)) if has_a else None
    bn_b = tuple(map(_vector, (b_weight, b_bias, b_mean, b_var))) + (eps_b,)
    return kernels.channel_gate(mean.contiguous(), std.contiguous(), pixels,
                                cfc_weight.contiguous(), _vector(cfc_bias), bn_a, bn_b, training)


@custom_op("patnet_triton::channel_attention_gate_backward", mutates_args=())
@on_tensor_device
def _gate_backward(sum_xg: Tensor, sum_g: Tensor, mean: Tensor, std: Tensor, pixels: int,
                   z: Tensor, moments: Tensor, cfc_weight: Tensor, a_weight: Optional[Tensor],
                   a_bias: Optional[Tensor], b_weight: Optional[Tensor], has_a: bool,
                   training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels.channel_gate_backward(
        *(t.contiguous() for t in (sum_xg, sum_g, mean, std)), pixels, z.contiguous(),
        moments.contiguous(), cfc_weight.contiguous(), _vector(a_weight), _vector(a_bias),
        _vector(b_weight), has_a, training)


@custom_op("patnet_triton::channel_attention_apply", mutates_args=())
@on_tensor_device
def _apply(x: Tensor, conv_weight: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return kernels.conv3x3_affine(x, conv_kernels.forward_taps(conv_weight),
                                  empty_activation(x, x.shape), scale.contiguous(),
                                  shift.contiguous())


@custom_op("patnet_triton::channel_attention_grad_sums", mutates_args=())
@on_tensor_device
def _grad_sums(x: Tensor, grad_y: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    return kernels.channel_grad_sums(x, grad_y, mean.contiguous())


@custom_op("patnet_triton::channel_attention_input_grad", mutates_args=())
@on_tensor_device
def _input_grad(grad_y: Tensor, x: Tensor, conv_weight: Tensor, scale: Tensor, center: Tensor,
                slope: Tensor, offset: Tensor) -> Tensor:
    return kernels.conv3x3_affine(grad_y, conv_kernels.transposed_taps(conv_weight),
                                  empty_activation(x, x.shape), scale.contiguous(),
                                  offset.contiguous(), aux=x, center=center.contiguous(),
                                  slope=slope.contiguous())


register_fakes("patnet_triton", {**spec.FAKES, **spec.GATE_FAKES})
