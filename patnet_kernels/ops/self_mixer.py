"""The PAT_sf output, [conv3x3(X1) | proj(tokens)]: ops and autograd Function for every fused
backend (the ops: ``patnet_triton::*`` from :mod:`patnet_kernels.ops.triton.self_mixer`,
``patnet_cuda::*`` from csrc/).

Both halves are written straight into one output buffer (no concatenation copy). Triton: one
kernel whose programs compute either conv3x3(X1) or the projection for their channels
(:func:`patnet_kernels.triton.partial_conv.self_mixer_output`); CUDA: the conv kernel fills
y[:, :C1], and one batched GEMM (``torch.baddbmm`` with ``out=``) writes the projection into
y[:, C1:] seen as a (B, N, C2) view, whose strides the BLAS takes as they are (NCHW: column-major
per sample; channels_last: row-major with leading dimension C). With ``residual`` the op returns
x + the output (PAT_sf's first residual sum: on Triton in the same pass).

The ops:

* ``self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, keep, residual) -> y``
* ``self_mixer_output_backward(grad_y, x, conv_weight, tokens, proj_weight, keep)
  -> (grad_x, grad_conv_weight, grad_tokens, grad_proj_weight, grad_proj_bias)``;
  grad_x is [conv3x3^T(dY1) | 0] (the X2 half reaches the mixer output only through the
  attention, whose own backward adds its part).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backward_without_autocast
from ._layout import empty_activation

Tensor = torch.Tensor


def _forward_fake(x, conv_weight, tokens, proj_weight, proj_bias, keep, residual):
    return empty_activation(x, x.shape)


def _backward_fake(grad_y, x, conv_weight, tokens, proj_weight, keep):
    c2 = proj_weight.shape[0]
    return (empty_activation(x, x.shape), torch.empty_like(conv_weight),
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
        (C2, C2), proj_bias (C2,) or None, keep (B, N, C2) or None, residual (add x) ->
        (B, C, H, W)."""

        @staticmethod
        def forward(ctx, x, conv_weight, tokens, proj_weight, proj_bias, keep, residual):
            ctx.save_for_backward(x, conv_weight, tokens, proj_weight, keep)
            ctx.has_bias, ctx.residual = proj_bias is not None, residual
            return ops.self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, keep,
                                         residual)

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y):
            x, conv_weight, tokens, proj_weight, keep = ctx.saved_tensors
            grads = ops.self_mixer_output_backward(grad_y, x, conv_weight, tokens, proj_weight,
                                                   keep)
            grad_x, grad_conv, grad_tokens, grad_proj, grad_bias = grads
            if ctx.residual:
                grad_x = grad_x.add_(grad_y)
            return (grad_x, grad_conv, grad_tokens, grad_proj,
                    grad_bias if ctx.has_bias else None, None, None)

    return SelfMixerOutput


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.self_mixer_output` over ``ops``."""
    SelfMixerOutput = make_function(ops)

    def self_mixer_output(x: Tensor, conv_weight: Tensor, tokens: Tensor, proj_weight: Tensor,
                          proj_bias: Optional[Tensor], keep: Optional[Tensor],
                          residual: bool = False) -> Tensor:
        """The PAT_sf output with this backend's kernels (inputs checked)."""
        return SelfMixerOutput.apply(x, conv_weight, tokens, proj_weight, proj_bias, keep,
                                     residual)

    return self_mixer_output

