"""The CPU eval forms: three ops' reference formulas for eval mode, in fewer passes.

The reference (:mod:`patnet_kernels.reference`) states each op as the authors' code does; on a
CPU thread some of its steps cost more than the arithmetic needs: ``Tensor.std`` over the H * W
positions is several times slower than a two-pass mean and sum of squares, BN_b applied to
``X2 * g`` makes two full passes where one per-(b, c) affine map does, the attention
materialises its scores where ``scaled_dot_product_attention`` need not, and both halves of a
mixer's output are concatenated where they can be written into one buffer. These functions
compute the same formulas (float rounding aside), each with its op's reference signature.

The registry declares them (``Op.eval_form``, :func:`patnet_kernels.registry.eval_form_refusal`
says when one applies: on the CPU, float32/float64, NCHW-contiguous, no gradient to take) and
the backend decision (:func:`patnet_kernels.backends.choose_implementation`) runs one where the
reference would run and the caller asked for it (``eval_form=True`` of the functional API, what
``patnet.optimize_for_inference`` sets), in eval (no dropout, no batch statistics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._types import BatchNormParams
from .reference.batch_norm import batch_norm_affine


def _with_conv_half(x: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """A new (B, C, H, W) output of x's layout holding conv3x3(X1) in its first C1 channels
    (the rest not yet written)."""
    c1 = conv_weight.shape[0]
    y = torch.empty_like(x)
    y[:, :c1] = F.conv2d(x[:, :c1], conv_weight, padding=1)
    return y


def channel_attention(x: torch.Tensor, conv_weight: torch.Tensor, cfc_weight: torch.Tensor,
                      cfc_bias: Optional[torch.Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: BatchNormParams, training: bool = False) -> torch.Tensor:
    """PAT_ch in eval mode: [conv3x3(X1) | X2 * a + d] (``training`` must be False).

    x: (B, C, H, W), NCHW-contiguous; the rest as :func:`patnet_kernels.channel_attention`.
    The gate g = hsig(BN_a(W_ch . [mu, sigma] + bias)) is (B, C2) (BN_a, if not folded into
    W_ch, an affine map of the logits); a = g * gamma / sqrt(var + eps) and
    d = beta - mean * gamma / sqrt(var + eps) fold BN_b. sigma is the unbiased std: with
    H * W = 1 it is NaN, as in the reference. Returns (B, C, H, W).
    """
    y = _with_conv_half(x, conv_weight)
    b, c, h, w = x.shape
    c1 = conv_weight.shape[0]
    c2, hw = c - c1, h * w
    x2 = x[:, c1:].reshape(b, c2, hw)  # a view: the channels after C1 are contiguous per sample
    mean = x2.mean(-1, keepdim=True)  # (B, C2, 1)
    std = (x2 - mean).square_().sum(-1, keepdim=True).div_(hw - 1).sqrt_()
    # W_ch . [mu, sigma]: cfc_weight[o, i, 0, j] pairs with (mu, sigma)[j] of channel i.
    z = F.linear(torch.cat([mean, std], -1).view(b, 2 * c2), cfc_weight.reshape(c2, 2 * c2),
                 cfc_bias)
    if bn_a is not None:
        scale_a, shift_a = batch_norm_affine(bn_a, bn_a.running_mean, bn_a.running_var)
        z = torch.addcmul(shift_a, z, scale_a)
    scale, shift = batch_norm_affine(bn_b, bn_b.running_mean, bn_b.running_var)
    torch.addcmul(shift.view(1, c2, 1), x2, (F.hardsigmoid(z) * scale).view(b, c2, 1),
                  out=y[:, c1:].view(b, c2, hw))
    return y


def rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                  bucket: torch.Tensor, scale: Optional[float] = None,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q k^T + table[h, bucket]) v without dropout (``dropout_p`` must be 0),
    by ``F.scaled_dot_product_attention`` with the gathered (heads, N, N) bias as its additive
    mask. Shapes as :func:`patnet_kernels.rpe_attention`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=table[:, bucket], scale=scale)


def self_mixer_output(x: torch.Tensor, conv_weight: torch.Tensor, tokens: torch.Tensor,
                      proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
                      keep: Optional[torch.Tensor] = None,
                      residual: bool = False) -> torch.Tensor:
    """[conv3x3(X1) | proj(tokens) as a map] (+ x with ``residual``) without dropout (``keep``
    must be None), the projection written channel-major straight into the output (no
    concatenation).

    x: (B, C, H, W), NCHW-contiguous; tokens (B, N, C2); proj_weight (C2, C2), proj_bias (C2,)
    or None. Returns (B, C, H, W).
    """
    y = _with_conv_half(x, conv_weight)
    b, c, h, w = x.shape
    c1 = conv_weight.shape[0]
    c2, n = c - c1, h * w
    out = y[:, c1:].view(b, c2, n)  # (B, C2, N) = proj_weight @ tokens^T + proj_bias
    if proj_bias is None:
        torch.matmul(proj_weight, tokens.transpose(1, 2), out=out)
    else:
        torch.baddbmm(proj_bias.view(1, c2, 1), proj_weight.expand(b, c2, c2),
                      tokens.transpose(1, 2), out=out)
    return y.add_(x) if residual else y
