"""act(BN(x))'s ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.batch_norm_act`; fakes and autograd in :mod:`..batch_norm_act`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...triton import batch_norm_act as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, batch_norm_act as spec
from . import fp32_affine
from .._layout import empty_activation, with_pixel_stride

Tensor = torch.Tensor


@custom_op("patnet_triton::batch_norm_act", mutates_args=("running_mean", "running_var"))
@on_tensor_device
def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
             eps: float, activation: str, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y = empty_activation(x, x.shape)
    x = with_pixel_stride(x)
    if training:  # (the running statistics updated by the same kernels)
        running = None if running_mean is None else (running_mean, running_var)
        mean, var = kernels.batch_moments(x, running, momentum)
        normalised = mean, var
    else:  # (the backward takes the running statistics from the autograd Function)
        normalised = running_mean.float(), running_var.float()
        mean, var = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))
    kernels.apply(x, y, *normalised, *fp32_affine(weight, bias, x.shape[1], x), eps, activation)
    return y, mean, var


@custom_op("patnet_triton::batch_norm_act_backward", mutates_args=())
@on_tensor_device
def _backward(grad_y: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float, activation: str, training: bool
              ) -> Tuple[Tensor, Tensor]:
    grad_x = empty_activation(x, x.shape)
    x, grad_y = with_pixel_stride(x), with_pixel_stride(grad_y)
    gamma, beta = fp32_affine(weight, bias, x.shape[1], x)
    sums = kernels.grad_sums(x, grad_y, mean, var, gamma, beta, eps, activation)
    kernels.grad_input(x, grad_y, grad_x, mean, var, gamma, beta, sums if training else None,
                       eps, activation)
    return grad_x, sums  # ([d beta; d gamma] = [sum dZ; sum dZ xhat])


register_fakes("patnet_triton", spec.FAKES)
