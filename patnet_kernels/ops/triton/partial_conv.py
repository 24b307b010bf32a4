"""PConv's ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.partial_conv`; fakes and autograd in :mod:`..partial_conv`."""
from __future__ import annotations

import torch

from ...triton import partial_conv as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, partial_conv as spec
from .._layout import empty_activation

Tensor = torch.Tensor


@custom_op("patnet_triton::partial_conv3x3", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, weight: Tensor) -> Tensor:
    return kernels.conv3x3_passthrough(x, kernels.forward_taps(weight),
                                       empty_activation(x, x.shape), copy_rest=True)


@custom_op("patnet_triton::partial_conv3x3_", mutates_args=("x",))
@on_tensor_device
def _forward_inplace(x: Tensor, weight: Tensor) -> Tensor:
    x1 = empty_activation(x, spec._x1_shape(x, weight))
    x1.copy_(x[:, :weight.shape[0]])
    # The conv reads only the copy, so no program can see a halo another has rewritten.
    kernels.conv3x3_passthrough(x1, kernels.forward_taps(weight), x, copy_rest=False)
    return x1


@custom_op("patnet_triton::partial_conv3x3_input_grad", mutates_args=())
@on_tensor_device
def _input_grad(grad_y: Tensor, weight: Tensor) -> Tensor:
    return kernels.conv3x3_passthrough(grad_y, kernels.transposed_taps(weight),
                                       empty_activation(grad_y, grad_y.shape), copy_rest=True)


@custom_op("patnet_triton::conv3x3_weight_grad", mutates_args=())
@on_tensor_device
def _weight_grad(x1: Tensor, grad_y: Tensor, weight: Tensor) -> Tensor:
    return kernels.conv3x3_weight_grad(x1, grad_y, torch.empty_like(weight))


register_fakes("patnet_triton", spec.FAKES)
