"""Eval-mode forms of the partial ops for the CPU inference path.

The reference (:mod:`patnet_kernels.reference`) states each op as the authors' code does; on a
CPU thread some of its steps cost more than the arithmetic needs: ``Tensor.std`` over the H * W
positions is several times slower than a two-pass mean and sum of squares, and BN_b applied to
``X2 * g`` makes two full passes where one per-(b, c) affine map does. These functions compute
the same formulas (float rounding aside) in fewer passes, for NCHW-contiguous inputs in eval
mode, and write both halves of the output into one buffer (no concatenation). They are what
``patnet.optimize_for_inference`` runs on the CPU; every other case goes through the
functional API.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._types import BatchNormParams


def _with_conv_half(x: torch.Tensor, conv_weight: torch.Tensor, instead: str) -> torch.Tensor:
    """A new (B, C, H, W) output holding conv3x3(X1) in its first C1 channels (the rest not
    yet written); x must be NCHW-contiguous, else the error names ``instead``."""
    if not x.is_contiguous():
        raise ValueError(f"the CPU eval forms take NCHW-contiguous input; use {instead} for "
                         "other layouts")
    c1 = conv_weight.shape[0]
    y = torch.empty_like(x)
    y[:, :c1] = F.conv2d(x[:, :c1], conv_weight, padding=1)
    return y


def channel_attention_eval(x: torch.Tensor, conv_weight: torch.Tensor,
                           cfc_weight: torch.Tensor, cfc_bias: Optional[torch.Tensor],
                           bn_b: BatchNormParams) -> torch.Tensor:
    """PAT_ch in eval mode with BN_a folded into W_ch: [conv3x3(X1) | X2 * a + d].

    x: (B, C, H, W), NCHW-contiguous; conv_weight: (C1, C1, 3, 3); cfc_weight: (C2, C2, 1, 2);
    cfc_bias: (C2,) or None (BN_a folded in); bn_b: BN_b with running statistics. The gate
    g = hsig(W_ch . [mu, sigma] + bias) is (B, C2); a = g * gamma / sqrt(var + eps) and
    d = beta - mean * gamma / sqrt(var + eps) fold BN_b. sigma is the unbiased std: with
    H * W = 1 it is NaN, as in the reference. Returns (B, C, H, W).
    """
    y = _with_conv_half(x, conv_weight, "patnet_kernels.channel_attention")
    b, c, h, w = x.shape
    c1 = conv_weight.shape[0]
    c2, hw = c - c1, h * w
    x2 = x[:, c1:].reshape(b, c2, hw)  # a view: the channels after C1 are contiguous per sample
    mean = x2.mean(-1, keepdim=True)  # (B, C2, 1)
    std = (x2 - mean).square_().sum(-1, keepdim=True).div_(hw - 1).sqrt_()
    # W_ch . [mu, sigma]: cfc_weight[o, i, 0, j] pairs with (mu, sigma)[j] of channel i.
    z = F.linear(torch.cat([mean, std], -1).view(b, 2 * c2), cfc_weight.reshape(c2, 2 * c2),
                 cfc_bias)
    inv = torch.rsqrt(bn_b.running_var + bn_b.eps)
    scale = inv if bn_b.weight is None else inv * bn_b.weight
    shift = -bn_b.running_mean * scale
    if bn_b.bias is not None:
        shift = shift + bn_b.bias
    torch.addcmul(shift.view(1, c2, 1), x2, (F.hardsigmoid(z) * scale).view(b, c2, 1),
                  out=y[:, c1:].view(b, c2, hw))
    return y


def self_mixer_eval(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
                    norm_bias: Optional[torch.Tensor], norm_eps: float, qkv_weight: torch.Tensor,
                    qkv_bias: Optional[torch.Tensor], table: torch.Tensor, bucket: torch.Tensor,
                    num_heads: int, scale: float, proj_weight: torch.Tensor,
                    proj_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """PAT_sf in eval mode: [conv3x3(X1) | proj(Attn(LN(X2)))], no dropout.

    x: (B, C, H, W), NCHW-contiguous; conv_weight: (C1, C1, 3, 3); the LayerNorm over the C2
    channels of each pixel (norm_weight / norm_bias (C2,) or None, eps); qkv_weight (3 C2, C2),
    qkv_bias (3 C2,) or None; table (heads, num_buckets) and bucket (N, N) ids, N = H * W
    in row-major order; scale multiplies q k^T; proj_weight (C2, C2), proj_bias (C2,) or None.
    The reference's steps, with the LayerNorm taken on the (B, N, C2) tokens directly (no
    round trip through the map layout), the attention by ``F.scaled_dot_product_attention``
    with the gathered bias as its additive mask, and the projection written channel-major
    into the output. Returns (B, C, H, W).
    """
    y = _with_conv_half(x, conv_weight, "the functional API (patnet_kernels.rpe_attention, "
                        "self_mixer_output)")
    b, c, h, w = x.shape
    c1 = conv_weight.shape[0]
    c2, n = c - c1, h * w
    tokens = F.layer_norm(x[:, c1:].flatten(2).transpose(1, 2), (c2,), norm_weight, norm_bias,
                          norm_eps)  # (B, N, C2)
    qkv = F.linear(tokens, qkv_weight, qkv_bias).view(b, n, 3, num_heads, c2 // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
    heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=table[:, bucket].to(q.dtype),
                                               scale=scale)  # (B, heads, N, d)
    merged = heads_out.transpose(1, 2).reshape(b, n, c2)
    # (B, C2, N) = proj_weight @ merged^T + proj_bias, straight into y[:, C1:].
    out = y[:, c1:].view(b, c2, n)
    if proj_bias is None:
        torch.matmul(proj_weight, merged.transpose(1, 2), out=out)
    else:
        torch.baddbmm(proj_bias.view(1, c2, 1), proj_weight.expand(b, c2, c2),
                      merged.transpose(1, 2), out=out)
    return y
