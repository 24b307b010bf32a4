"""A BatchNorm followed by the block MLP's activation, act(BN(x)) (reference). SPEC.md section 5:
the MLP's BN and act between its two 1x1 convs, as the authors' ``nn.Sequential`` runs them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._types import BatchNormParams
from .batch_norm import batch_norm


def batch_norm_act(x: torch.Tensor, bn: BatchNormParams, activation: str,
                   training: bool) -> torch.Tensor:
    """x: (B, C, H, W); bn over C channels (running statistics updated in training);
    activation: "relu" or "gelu" (exact). Returns a new (B, C, H, W) tensor."""
    z = batch_norm(x, bn, training)
    return F.relu_(z) if activation == "relu" else F.gelu(z)
