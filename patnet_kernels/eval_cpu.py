"""The CPU eval forms: the ops' reference formulas for eval mode, in fewer passes and on
oneDNN's convolutions.

The reference (:mod:`patnet_kernels.reference`) states each op as the authors' code does; on a
CPU thread some of its steps cost more than the arithmetic needs: PyTorch runs a batch of one's
1 x 1 convolutions, and 3 x 3 ones on small maps, through its slow im2col + GEMM path, where
oneDNN with a weight laid out once is about 2x faster (:mod:`patnet_kernels.cpu_conv`, which
every convolution here runs through, and PAT_sf's qkv and output projections as 1 x 1 ones;
PAT_ch's small gate GEMM stays ``F.linear``); ``Tensor.std`` over the H * W
positions is several times slower than a two-pass mean and sum of squares; BN_b applied to
``X2 * g`` makes two full passes where one per-(b, c) affine map does; the attention
materialises its scores where ``scaled_dot_product_attention`` need not; and both halves of a
mixer's output are concatenated where they can be written into one buffer. These functions
compute the same formulas (float rounding aside), each with its op's reference signature, on
any layout; oneDNN writes channels_last, in which the inference copy then runs
(:func:`patnet.optimize_for_inference`: its stem writes it).

The registry declares them (``Op.eval_form``, :func:`patnet_kernels.registry.eval_form_refusal`
says when one applies: on the CPU, float32/float64, no gradient to take) and the backend
decision (:func:`patnet_kernels.backends.choose_implementation`) runs one where the reference
would run and the caller asked for it (``eval_form=True`` of the functional API, what
``patnet.optimize_for_inference``'s copy sets), in eval (no dropout, no batch statistics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._types import BatchNormParams, SpatialAttentionParams
from .cpu_conv import conv2d
from .ops._layout import memory_format_of
from .reference.batch_norm import batch_norm, batch_norm_affine
from .reference.patch_conv import patch_output


def _with_conv_half(x: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """A new (B, C, H, W) output of x's layout holding conv3x3(X1) in its first C1 channels
    (the rest not yet written)."""
    c1 = conv_weight.shape[0]
    y = torch.empty_like(x)
    y[:, :c1] = conv2d(x[:, :c1], conv_weight, padding=1)
    return y


def partial_conv3x3(x: torch.Tensor, weight: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """PConv: [conv3x3(X1) | X2], X1 the first C1 = weight.shape[0] channels of x (B, C, H, W);
    with ``inplace`` X1 is overwritten and x returned, else a new tensor of x's layout."""
    c1 = weight.shape[0]
    y1 = conv2d(x[:, :c1], weight, padding=1)
    if inplace:
        x[:, :c1] = y1
        return x
    return torch.cat([y1, x[:, c1:]], dim=1).contiguous(memory_format=memory_format_of(x))


def pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], activation: str,
                  spatial: Optional[SpatialAttentionParams] = None) -> torch.Tensor:
    """W2 . act(W1 . x + b1) + b2 [-> PAT_sp] [+ residual], the activation in the first conv
    and the residual (without PAT_sp) in the second (oneDNN's post-ops). Shapes as
    :func:`patnet_kernels.pointwise_mlp`; in x's layout."""
    hidden = conv2d(x, w1, b1, activation=activation)
    if spatial is None:
        return conv2d(hidden, w2, b2, add=residual).contiguous(
            memory_format=memory_format_of(x))
    y = _spatial_attention(conv2d(hidden, w2, b2).contiguous(memory_format=memory_format_of(x)),
                           spatial)
    return y if residual is None else y.add_(residual)


def _spatial_attention(m: torch.Tensor, spatial: SpatialAttentionParams) -> torch.Tensor:
    """PAT_sp in eval on the MLP's output m (B, C, H, W): [BN_c(Ma * hsig(w . Ma)) |
    conv1x1(BN_d(Mb))], the reference's formula
    (:func:`patnet_kernels.reference.spatial_attention`) with its convolutions on oneDNN."""
    p = spatial.conv_weight.shape[0]
    q = m.shape[1] - p
    ma, mb = m[:, :q], m[:, q:]
    gated = batch_norm(ma * F.hardsigmoid(conv2d(ma, spatial.gate_weight)), spatial.bn_c, False)
    if spatial.bn_d is not None:
        mb = batch_norm(mb, spatial.bn_d, False)
    y = torch.cat([gated, conv2d(mb, spatial.conv_weight, spatial.conv_bias)], dim=1)
    return y.contiguous(memory_format=memory_format_of(m))


def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               statistics_of: Optional[int] = None, channels_last: Optional[bool] = None):
    """The stem or a merging layer: conv(x, weight, bias) with stride k (None for
    ``channels_last``: oneDNN's layout). Shapes as :func:`patnet_kernels.patch_conv`."""
    y = conv2d(x.to(weight.dtype), weight, bias, stride=weight.shape[-1])
    return patch_output(y, statistics_of, channels_last)


def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      eps: float = 1e-5) -> torch.Tensor:
    """Linear(LayerNorm(tokens of x)): each pixel of x (B, C_IN, H, W; a channel slice too)
    normalised over its channels, then the projection (C_OUT, C_IN) as a 1 x 1 convolution of
    the normalised map. Returns (B, N = H * W, C_OUT), contiguous."""
    b, _, h, w = x.shape
    normed = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps)  # (B, H, W, C_IN)
    y = conv2d(normed.permute(0, 3, 1, 2), weight, bias)  # (a channels_last map)
    return y.permute(0, 2, 3, 1).reshape(b, h * w, weight.shape[0])


def channel_attention(x: torch.Tensor, conv_weight: torch.Tensor, cfc_weight: torch.Tensor,
                      cfc_bias: Optional[torch.Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: BatchNormParams, training: bool = False) -> torch.Tensor:
    """PAT_ch in eval mode: [conv3x3(X1) | X2 * a + d] (``training`` must be False).

    x: (B, C, H, W), any layout; the rest as :func:`patnet_kernels.channel_attention`.
    The gate g = hsig(BN_a(W_ch . [mu, sigma] + bias)) is (B, C2) (BN_a, if not folded into
    W_ch, an affine map of the logits); a = g * gamma / sqrt(var + eps) and
    d = beta - mean * gamma / sqrt(var + eps) fold BN_b. sigma is the unbiased std: with
    H * W = 1 it is NaN, as in the reference. Returns (B, C, H, W).
    """
    y = _with_conv_half(x, conv_weight)
    b, c, h, w = x.shape
    c1 = conv_weight.shape[0]
    c2, hw = c - c1, h * w
    x2 = x[:, c1:].reshape(b, c2, hw)  # (a view of an NCHW or channels_last map)
    mean = x2.mean(-1, keepdim=True)  # (B, C2, 1)
    std = (x2 - mean).square_().sum(-1, keepdim=True).div_(hw - 1).sqrt_()
    # W_ch . [mu, sigma]: cfc_weight[o, i, 0, j] pairs with (mu, sigma)[j] of channel i.
    z = F.linear(torch.cat([mean, std], -1).view(b, 2 * c2), cfc_weight.reshape(c2, 2 * c2),
                 cfc_bias)
    if bn_a is not None:
        scale_a, shift_a = batch_norm_affine(bn_a, bn_a.running_mean, bn_a.running_var)
        z = torch.addcmul(shift_a, z, scale_a)
    scale, shift = batch_norm_affine(bn_b, bn_b.running_mean, bn_b.running_var)
    gate = (F.hardsigmoid(z) * scale).view(b, c2, 1)
    if torch.compiler.is_compiling():  # (dynamo takes no strided out=; Inductor fuses the copy)
        y[:, c1:] = torch.addcmul(shift.view(1, c2, 1), x2, gate).view(b, c2, h, w)
    else:
        torch.addcmul(shift.view(1, c2, 1), x2, gate, out=y[:, c1:].view(b, c2, hw))
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
    must be None): the projection a 1 x 1 convolution of the tokens as a map, written into the
    output's X2 channels (no concatenation).

    x: (B, C, H, W), any layout; tokens (B, N, C2); proj_weight (C2, C2), proj_bias (C2,) or
    None. Returns (B, C, H, W) in x's layout.
    """
    y = _with_conv_half(x, conv_weight)
    b, _, h, w = x.shape
    c1 = conv_weight.shape[0]
    token_map = tokens.reshape(b, h, w, tokens.shape[-1]).permute(0, 3, 1, 2)  # (B, C2, H, W)
    y[:, c1:] = conv2d(token_map, proj_weight, proj_bias)
    return y.add_(x) if residual else y
