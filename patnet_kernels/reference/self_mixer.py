"""The output of PAT_sf, the stage-4 token mixer (reference). SPEC.md section 4, step 6."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def self_mixer_output(x: torch.Tensor, conv_weight: torch.Tensor, tokens: torch.Tensor,
                      proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
                      keep: Optional[torch.Tensor], residual: bool = False) -> torch.Tensor:
    """[conv3x3(X1) | proj(tokens) as a map] (+ x with ``residual``), X1 = x[:, :C1],
    C1 = conv_weight.shape[0].

    x: (B, C, H, W); conv_weight: (C1, C1, 3, 3); tokens: (B, N, C2) with N = H * W in row-major
    order and C2 = C - C1 (the merged heads of the attention); proj_weight: (C2, C2);
    proj_bias: (C2,) or None; keep: the dropout multiplier (B, N, C2) of the projection
    (0 or 1 / (1 - p)), or None. Returns (B, C, H, W).
    """
    b, _, h, w = x.shape
    c1 = conv_weight.shape[0]
    y1 = F.conv2d(x[:, :c1], conv_weight, padding=1)
    y2 = F.linear(tokens, proj_weight, proj_bias)
    if keep is not None:
        y2 = y2 * keep
    y = torch.cat([y1, y2.transpose(1, 2).reshape(b, proj_weight.shape[0], h, w)], dim=1)
    return y + x if residual else y
