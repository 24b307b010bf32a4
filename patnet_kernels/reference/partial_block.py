"""A FasterNet block or a PATNet PAT_ch block (stages 1-3) in inference (reference).
SPEC.md section 5.

Y = X + MLP(mixer(X)): the mixer is PConv, [conv3x3(X1) | X2] (FasterNet), or PAT_ch in eval
(PATNet); the MLP has its BatchNorm folded (:func:`patnet.fuse_for_inference`) and no
DropPath (eval). The composition of the ops' references.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._types import BatchNormParams, SpatialAttentionParams
from .channel_attention import channel_attention, output_statistics
from .partial_conv import partial_conv3x3
from .pointwise_mlp import pointwise_mlp


def partial_block(x: torch.Tensor, conv_weight: torch.Tensor, cfc_weight: Optional[torch.Tensor],
                  cfc_bias: Optional[torch.Tensor], bn_a: Optional[BatchNormParams],
                  bn_b: Optional[BatchNormParams], w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str,
                  statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  return_statistics: bool = False, residual: bool = True,
                  spatial: Optional[SpatialAttentionParams] = None):
    """x: (B, C, H, W); conv_weight: (C1, C1, 3, 3); cfc_weight (C2, C2, 1, 2), cfc_bias,
    bn_a, bn_b: PAT_ch's (see :func:`channel_attention`), or cfc_weight None for PConv;
    w1, b1, w2, b2, activation: the MLP's (see :func:`pointwise_mlp`, C_out = C). Returns a new
    (B, C, H, W) tensor, or with ``return_statistics`` (y, :func:`output_statistics` of y).
    ``statistics`` (those of x's X2, from the previous block) are a cache the fused kernels
    read; the reference computes its own. ``residual`` False: MLP(mixer(x)) without x added.
    ``spatial``: PAT_sp in eval on the MLP's output, before the residual (PATNet-T1's block:
    x + PAT_sp(MLP(mixer(x))))."""
    if cfc_weight is None:
        mixed = partial_conv3x3(x, conv_weight)
    else:
        mixed = channel_attention(x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, False)
    y = pointwise_mlp(mixed, w1, b1, w2, b2, x if residual else None, activation, spatial)
    return (y, output_statistics(y, conv_weight.shape[0])) if return_statistics else y
