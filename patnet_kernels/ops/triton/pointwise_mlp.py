"""The MLP's op in the Triton backend (``patnet_triton``): a body that launches the kernel of
:mod:`patnet_kernels.triton.pointwise_mlp`; the fake in :mod:`..pointwise_mlp`."""
from __future__ import annotations

from typing import Optional

import torch

from ...triton import pointwise_mlp as kernels
from ...triton._common import on_tensor_device
from ...triton.partial_conv import forward_taps
from .. import pointwise_mlp as spec, register_fakes
from .._layout import empty_activation, memory_format_of

Tensor = torch.Tensor


def _with_pixel_stride(t: Tensor) -> Tensor:
    """t, or a copy in its memory format where H and W do not merge into one pixel stride
    (the kernel addresses pixels as h * W + w)."""
    if t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3):
        return t
    return t.contiguous(memory_format=memory_format_of(t))


def _matrix(weight: Tensor) -> Tensor:
    """A (out, in, 1, 1) conv weight as the contiguous (out, in) matrix the kernel reads."""
    return weight.reshape(weight.shape[0], weight.shape[1]).contiguous()


@torch.library.custom_op("patnet_triton::pointwise_mlp", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, conv_weight: Optional[Tensor], scale: Optional[Tensor],
             shift: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
             b2: Optional[Tensor], residual: Optional[Tensor], activation: str) -> Tensor:
    x = _with_pixel_stride(x)
    y = empty_activation(x, spec.output_shape(x, w2))

    def optional(t, make):
        return None if t is None else make(t)

    return kernels.pointwise_mlp(
        x, _matrix(w1), b1, _matrix(w2), b2, optional(residual, _with_pixel_stride), activation,
        y, conv_taps=optional(conv_weight, forward_taps), scale=optional(scale, Tensor.contiguous),
        shift=optional(shift, Tensor.contiguous))


register_fakes("patnet_triton", spec.FAKES)
