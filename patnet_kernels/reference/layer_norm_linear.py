"""PAT_sf's LayerNorm and qkv projection in inference (reference): the map's pixels as tokens,
each normalised over its channels (the LayerNorm's affine folded into the projection, as
:func:`patnet.fuse_for_inference` folds it), then a linear layer. SPEC.md section 4, steps 2-4."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      eps: float = 1e-5) -> torch.Tensor:
    """Linear(LayerNorm(tokens)): x (B, C_IN, H, W) as tokens (B, N = H * W, C_IN) in
    row-major pixel order, each normalised over its C_IN values (no affine) in float32
    (float64 for a float64 x), as autocast runs layer_norm, then converted to the weight's
    dtype; weight (C_OUT, C_IN), bias (C_OUT,) or None. Returns (B, N, C_OUT) in the weight's
    dtype. An x already in the weight's float16 or bfloat16 is normalised by ``layer_norm``
    in its dtype, which computes in float32 and rounds to that dtype (the same values up to a
    last-bit rounding), without a cast of the tokens to float32 and one back."""
    tokens = x.flatten(2).transpose(1, 2)
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16):
        tokens = tokens.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    normed = F.layer_norm(tokens, (x.shape[1],), eps=eps)
    return F.linear(normed.to(weight.dtype), weight, bias)
