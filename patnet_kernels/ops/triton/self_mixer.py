"""The PAT_sf output's ops in the Triton backend (``patnet_triton``): the forward is one kernel
of :mod:`patnet_kernels.triton.partial_conv` (conv and projection); the backward its conv
kernels and torch GEMMs; fakes and autograd in :mod:`..self_mixer`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...triton import partial_conv as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, self_mixer as spec
from .._layout import empty_activation

Tensor = torch.Tensor


def _tokens_view(y: Tensor, c1: int) -> Tensor:
    """y[:, C1:] of a (B, C, H, W) tensor as (B, N, C2): token n = h * W + w, no copy."""
    return y[:, c1:].flatten(2).transpose(1, 2)


@custom_op("patnet_triton::self_mixer_output", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, conv_weight: Tensor, tokens: Tensor, proj_weight: Tensor,
             proj_bias: Optional[Tensor], keep: Optional[Tensor], residual: bool) -> Tensor:
    return kernels.self_mixer_output(
        x, kernels.forward_taps(conv_weight), tokens, proj_weight.contiguous(),
        None if proj_bias is None else proj_bias.contiguous(),
        None if keep is None else keep.contiguous(), empty_activation(x, x.shape), residual)


@custom_op("patnet_triton::self_mixer_output_backward", mutates_args=())
@on_tensor_device
def _backward(grad_y: Tensor, x: Tensor, conv_weight: Tensor, tokens: Tensor,
              proj_weight: Tensor, keep: Optional[Tensor]
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    c1 = conv_weight.shape[0]
    grad_x = empty_activation(x, x.shape)
    kernels.conv3x3_passthrough(grad_y, kernels.transposed_taps(conv_weight), grad_x,
                                copy_rest=False)
    grad_x[:, c1:].zero_()
    grad_conv_weight = kernels.conv3x3_weight_grad(x[:, :c1], grad_y,
                                                   torch.empty_like(conv_weight))
    grad_proj_out = _tokens_view(grad_y, c1)  # (B, N, C2)
    if keep is not None:
        grad_proj_out = grad_proj_out * keep
    # As GEMMs over all B * N tokens (no per-sample (C2, C2) products to sum): the tokens are
    # (B * N, C2) views; dY's are a view in channels_last, one copy of them in NCHW.
    b, n, c2 = grad_proj_out.shape
    grad_rows = grad_proj_out.reshape(b * n, c2)
    grad_tokens = torch.mm(grad_rows, proj_weight).view(b, n, c2)
    grad_proj_weight = torch.mm(grad_rows.t(), tokens.reshape(b * n, c2))
    grad_proj_bias = grad_rows.sum(0)
    return grad_x, grad_conv_weight, grad_tokens, grad_proj_weight, grad_proj_bias


register_fakes("patnet_triton", spec.FAKES)
