"""PAT_ch: partial 3x3 conv plus Gaussian channel attention (reference). SPEC.md section 2."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._types import BatchNormParams
from .batch_norm import batch_norm


def channel_statistics(x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel of x2 (B, C2, H, W): the mean and the **unbiased** std, each (B, C2).

    With H * W = 1 the unbiased std is NaN (0 / 0), as ``Tensor.std`` in the authors' code; the
    NaN then reaches every output channel of X2 (and, in training, the whole batch through BN_a).

    Both come from one ``torch.std_mean`` (one read of X2, where the authors' ``mean`` and
    ``std`` read it twice); its mean is the same average up to rounding (float64: 1e-16).
    ``reshape`` is a view for NCHW and channels_last slices of a map alike (H and W stay
    mergeable), so no copy of X2 is made.
    """
    b, c2, h, w = x2.shape  # (h * w, not -1: an empty batch reshapes too)
    std, mean = torch.std_mean(x2.reshape(b, c2, h * w), dim=-1)
    return mean, std


def channel_attention(x: torch.Tensor, conv_weight: torch.Tensor, cfc_weight: torch.Tensor,
                      cfc_bias: Optional[torch.Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: BatchNormParams, training: bool) -> torch.Tensor:
    """The PAT_ch token mixer: [conv3x3(X1) | BN_b(X2 * hsig(BN_a(W_ch . [mu, sigma])))].

    x: (B, C, H, W); conv_weight: (C1, C1, 3, 3); cfc_weight: (C2, C2, 1, 2), the dense mix of
    [mean, std]; cfc_bias: (C2,) or None (a bias appears only once BN_a is folded into W_ch);
    both in x's dtype or float32 (cast to x's dtype here);
    bn_a: BN over the (B, C2, 1, 1) logits, or None once folded; bn_b: BN over X2 * g.
    Returns (B, C, H, W).
    """
    c1 = conv_weight.shape[0]
    x1, x2 = x[:, :c1], x[:, c1:]
    y1 = F.conv2d(x1, conv_weight, padding=1)
    b, c2 = x2.shape[:2]
    mean, std = channel_statistics(x2)
    u = torch.cat([mean.view(b, c2, 1, 1), std.view(b, c2, 1, 1)], dim=-1)  # (B, C2, 1, 2)
    # (float32 W_ch beside half x, as autocast leaves it: cast, as autocast casts a conv's)
    z = F.conv2d(u, cfc_weight.to(x.dtype),
                 None if cfc_bias is None else cfc_bias.to(x.dtype))  # (B, C2, 1, 1)
    if bn_a is not None:
        z = batch_norm(z, bn_a, training)
    g = F.hardsigmoid(z)
    y2 = batch_norm(x2 * g, bn_b, training)
    return torch.cat([y1, y2], dim=1)


def output_statistics(y: torch.Tensor, c1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The statistics a PAT_ch block reads of its input's X2 = y[:, c1:], in the chunked form
    of ``partial_block``'s ``statistics`` with one chunk: (mean, sum of squared deviations over
    H * W), each (B, 1, C2) fp32."""
    y2 = y[:, c1:].float().flatten(2)
    mean = y2.mean(-1, keepdim=True)
    return mean.transpose(1, 2), (y2 - mean).square().sum(-1, keepdim=True).transpose(1, 2)
