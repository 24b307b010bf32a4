"""The PAT_sf output, [conv3x3(X1) | proj(tokens)], as registered ops (Triton backend).

Both halves are written straight into one output buffer: the Triton conv kernel fills
y[:, :C1], and one batched GEMM (``torch.baddbmm`` with ``out=``) writes the projection into
y[:, C1:] seen as a (B, N, C2) view, whose strides the BLAS takes as they are (NCHW: column-major
per sample; channels_last: row-major with leading dimension C). No concatenation copy.

Ops in the ``patnet_triton`` namespace:

* ``self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, keep) -> y``
* ``self_mixer_output_backward(grad_y, x, conv_weight, tokens, proj_weight, keep)
  -> (grad_x, grad_conv_weight, grad_tokens, grad_proj_weight, grad_proj_bias)``;
  grad_x is [conv3x3^T(dY1) | 0] (the X2 half reaches the mixer output only through the
  attention, whose own backward adds its part).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..triton import partial_conv as kernels
from ..triton._common import on_tensor_device
from ._layout import empty_activation

Tensor = torch.Tensor


def _tokens_view(y: Tensor, c1: int) -> Tensor:
    """y[:, C1:] of a (B, C, H, W) tensor as (B, N, C2): token n = h * W + w, no copy."""
    return y[:, c1:].flatten(2).transpose(1, 2)


@torch.library.custom_op("patnet_triton::self_mixer_output", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, conv_weight: Tensor, tokens: Tensor, proj_weight: Tensor,
             proj_bias: Optional[Tensor], keep: Optional[Tensor]) -> Tensor:
    c1 = conv_weight.shape[0]
    y = empty_activation(x, x.shape)
    kernels.conv3x3_passthrough(x, kernels.forward_taps(conv_weight), y, copy_rest=False)
    y2 = _tokens_view(y, c1)
    b, n, c2 = y2.shape
    weight_t = proj_weight.t().expand(b, c2, c2)
    if proj_bias is None:
        torch.bmm(tokens, weight_t, out=y2)
    else:
        torch.baddbmm(proj_bias.expand(b, n, c2), tokens, weight_t, out=y2)
    if keep is not None:
        y2.mul_(keep)
    return y


@_forward.register_fake
def _forward_fake(x, conv_weight, tokens, proj_weight, proj_bias, keep):
    return empty_activation(x, x.shape)


@torch.library.custom_op("patnet_triton::self_mixer_output_backward", mutates_args=())
@on_tensor_device
def _backward(grad_y: Tensor, x: Tensor, conv_weight: Tensor, tokens: Tensor,
              proj_weight: Tensor, keep: Optional[Tensor]
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    c1 = conv_weight.shape[0]
    grad_x = empty_activation(x, x.shape)
    kernels.conv3x3_passthrough(grad_y, kernels.transposed_taps(conv_weight), grad_x,
                                copy_rest=False)
    grad_x[:, c1:].zero_()
    grad_conv_weight = kernels.conv3x3_weight_grad(x[:, :c1], grad_y)
    grad_proj_out = _tokens_view(grad_y, c1)  # (B, N, C2)
    if keep is not None:
        grad_proj_out = grad_proj_out * keep
    grad_tokens = torch.matmul(grad_proj_out, proj_weight)
    grad_proj_weight = torch.bmm(grad_proj_out.transpose(1, 2), tokens).sum(0)
    grad_proj_bias = grad_proj_out.sum((0, 1))
    return grad_x, grad_conv_weight, grad_tokens, grad_proj_weight, grad_proj_bias


@_backward.register_fake
def _backward_fake(grad_y, x, conv_weight, tokens, proj_weight, keep):
    c1, c2 = conv_weight.shape[0], proj_weight.shape[0]
    return (empty_activation(x, x.shape), conv_weight.new_empty((c1, c1, 3, 3)),
            tokens.new_empty(tokens.shape), proj_weight.new_empty((c2, c2)),
            proj_weight.new_empty((c2,)))



# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "self_mixer_output": _forward_fake,
    "self_mixer_output_backward": _backward_fake,
}


def make_function(ops):
    """The autograd Function of the PAT_sf output over a ``torch.ops`` namespace with the two
    ops above (same schemas)."""

    class SelfMixerOutput(torch.autograd.Function):
        """x (B, C, H, W), conv_weight (C1, C1, 3, 3), tokens (B, N, C2), proj_weight
        (C2, C2), proj_bias (C2,) or None, keep (B, N, C2) or None -> (B, C, H, W)."""

        @staticmethod
        def forward(ctx, x, conv_weight, tokens, proj_weight, proj_bias, keep):
            ctx.save_for_backward(x, conv_weight, tokens, proj_weight, keep)
            ctx.has_bias = proj_bias is not None
            return ops.self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, keep)

        @staticmethod
        def backward(ctx, grad_y):
            x, conv_weight, tokens, proj_weight, keep = ctx.saved_tensors
            grads = ops.self_mixer_output_backward(grad_y, x, conv_weight, tokens, proj_weight,
                                                   keep)
            grad_x, grad_conv, grad_tokens, grad_proj, grad_bias = grads
            return (grad_x, grad_conv, grad_tokens, grad_proj,
                    grad_bias if ctx.has_bias else None, None)

    return SelfMixerOutput


def make_self_mixer_output(ops):
    """The backend function of :func:`patnet_kernels.self_mixer_output` over ``ops``."""
    SelfMixerOutput = make_function(ops)

    def self_mixer_output(x: Tensor, conv_weight: Tensor, tokens: Tensor, proj_weight: Tensor,
                          proj_bias: Optional[Tensor], keep: Optional[Tensor]) -> Tensor:
        """The PAT_sf output with this backend's kernels (inputs checked)."""
        return SelfMixerOutput.apply(x, conv_weight, tokens, proj_weight, proj_bias, keep)

    return self_mixer_output


self_mixer_output = make_self_mixer_output(torch.ops.patnet_triton)
