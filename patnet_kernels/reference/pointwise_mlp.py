"""The block's MLP with its BatchNorm folded, for inference (reference). SPEC.md section 5.

Y = W2 . act(W1 . X + b1) + b2 [+ R]: the two 1x1 convolutions of a FasterNet or PATNet block
(C -> hidden -> C_out), the first with its BatchNorm folded into W1 and b1
(:func:`patnet.fuse_for_inference`), and the block's residual R added last (after PAT_sp,
PATNet-T1's, where there is one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._types import SpatialAttentionParams
from .spatial_attention import spatial_attention

# The activations of the released models: the exact (erf) GELU and ReLU, by their names here.
ACTIVATIONS = ("relu", "gelu")


def pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], activation: str,
                  spatial: Optional[SpatialAttentionParams] = None) -> torch.Tensor:
    """x: (B, C, H, W), any memory format; w1: (hidden, C, 1, 1); b1: (hidden,) or None;
    w2: (C_out, hidden, 1, 1); b2: (C_out,) or None; residual: (B, C_out, H, W) or None;
    activation: "relu" or "gelu"; spatial: PAT_sp in eval on the MLP's output, before the
    residual (PATNet-T1), or None. Returns a new (B, C_out, H, W) tensor."""
    hidden = F.conv2d(x, w1, b1)
    hidden = F.relu_(hidden) if activation == "relu" else F.gelu(hidden)
    y = F.conv2d(hidden, w2, b2)
    if spatial is not None:
        return spatial_attention(y, spatial.gate_weight, spatial.conv_weight, spatial.conv_bias,
                                 spatial.bn_c, spatial.bn_d, False, residual)
    return y if residual is None else y.add_(residual)
