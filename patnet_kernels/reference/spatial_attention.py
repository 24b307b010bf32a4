"""PAT_sp: partial spatial attention appended to the MLP (reference). SPEC.md section 3."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._types import BatchNormParams
from .batch_norm import batch_norm
from .channel_attention import output_statistics


def spatial_attention(m: torch.Tensor, gate_weight: torch.Tensor, conv_weight: torch.Tensor,
                      conv_bias: Optional[torch.Tensor], bn_c: BatchNormParams,
                      bn_d: Optional[BatchNormParams], training: bool,
                      residual: Optional[torch.Tensor] = None,
                      statistics_of: Optional[int] = None):
    """[BN_c(Ma * hsig(w . Ma)) | conv1x1(BN_d(Mb))] (+ residual) with Ma = m[:, :Q],
    Mb = m[:, Q:].

    m: (B, C, H, W); gate_weight: (1, Q, 1, 1), the per-pixel gate w; conv_weight: (P, P, 1, 1)
    with P = C - Q; conv_bias: (P,) or None (a bias appears once BN_d is folded into the conv);
    bn_c over Q channels; bn_d over P channels, or None once folded; residual: (B, C, H, W) or
    None. Returns (B, C, H, W), or with ``statistics_of`` = C1 (y, the statistics of y[:, C1:]
    that a following PAT_ch block reads: :func:`.channel_attention.output_statistics`).
    """
    p = conv_weight.shape[0]
    q = m.shape[1] - p
    ma, mb = m[:, :q], m[:, q:]
    s = F.hardsigmoid(F.conv2d(ma, gate_weight))  # (B, 1, H, W)
    ya = batch_norm(ma * s, bn_c, training)
    if bn_d is not None:
        mb = batch_norm(mb, bn_d, training)
    yb = F.conv2d(mb, conv_weight, conv_bias)
    y = torch.cat([ya, yb], dim=1)
    if residual is not None:
        y = y + residual
    return y if statistics_of is None else (y, output_statistics(y, statistics_of))
