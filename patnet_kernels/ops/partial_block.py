"""A FasterNet or PAT_ch block in inference, x + MLP(mixer(x)), for every fused backend that
has it (Triton): the mixer is computed by the MLP's kernel as it reads its input, so its output
is never written:

1. PAT_ch only: ``channel_attention_chunk_stats(x, C1) -> (mean, m2)`` (Triton's own, see
   :mod:`patnet_kernels.ops.triton.partial_block`), the statistics of X2 split over H x W;
2. PAT_ch only: ``channel_attention_gate`` (:func:`patnet_kernels.ops.channel_attention.
   eval_gate`) merges them and gives the per-(sample, channel) affine map (scale, shift) of X2,
   BN_b folded in;
3. ``pointwise_mlp(x, conv_weight, scale, shift, ..., residual=x)``: the MLP's kernel computes
   conv3x3(X1) for its pixel tile (one-pixel halo of X1 re-read from cache), keeps it on chip
   with the 2C hidden activation, reads X2 (applying the gate) and adds x back (unless
   ``residual`` is False); with PAT_sp after the MLP (PATNet-T1's blocks),
   ``pointwise_mlp_spatial(...)`` instead: the same kernel also runs PAT_sp on the MLP's
   output before adding x back, so that output is never written either. Past 256 output
   channels (no PAT_sp) the MLP runs in two launches, the first computing the mixer and
   writing act(W1 . M + b1), the second reading it back (:mod:`patnet_kernels.triton.
   pointwise_mlp`'s two-pass form).

So a FasterNet block is one launch that reads X once and writes the output once; a PAT_ch
block three, reading X2 once more for the statistics, or two where the previous block of the
stage gave them: with ``return_statistics`` the MLP's kernel also writes the statistics of its
output's last C2 channels per pixel tile (``pointwise_mlp_stats``), which the next PAT_ch
block's gate merges instead of reading X2 again.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._types import BatchNormParams, SpatialAttentionParams
from .channel_attention import eval_gate
from .pointwise_mlp import spatial_arguments

Tensor = torch.Tensor

# (no op that every backend with the block registers: the ops it composes have their fakes in
# their modules, and channel_attention_chunk_stats, Triton's own, in ops/triton/partial_block.py)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.partial_block` over ``ops``."""

    def partial_block(x: Tensor, conv_weight: Tensor, cfc_weight: Optional[Tensor],
                      cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: Optional[BatchNormParams], w1: Tensor, b1: Optional[Tensor],
                      w2: Tensor, b2: Optional[Tensor], activation: str,
                      statistics: Optional[Tuple[Tensor, Tensor]] = None,
                      return_statistics: bool = False, residual: bool = True,
                      spatial: Optional[SpatialAttentionParams] = None):
        """The block with this backend's kernels (inputs checked; no gradient taken)."""
        c1 = conv_weight.shape[0]
        scale = shift = None
        if cfc_weight is not None:
            mean, m2 = (statistics if statistics is not None
                        else ops.channel_attention_chunk_stats(x, c1))
            scale, shift = eval_gate(ops, mean, m2, x.shape[2] * x.shape[3], cfc_weight,
                                     cfc_bias, bn_a, bn_b)
        residual_input = x if residual else None
        if spatial is not None:  # (its statistics always taken, as a PAT_ch block's below)
            y, mean, m2 = ops.pointwise_mlp_spatial(
                x, conv_weight, scale, shift, w1, b1, w2, b2, residual_input, activation, c1,
                *spatial_arguments(spatial))
            return (y, (mean, m2)) if return_statistics else y
        if return_statistics or cfc_weight is not None:
            # (a PAT_ch block's kernel always takes its output's statistics, the last block of
            # a stage dropping them: one kernel variant fewer to ship, for about 2% more
            # traffic in those blocks)
            y, mean, m2 = ops.pointwise_mlp_stats(x, conv_weight, scale, shift, w1, b1, w2, b2,
                                                  residual_input, activation, c1)
            return (y, (mean, m2)) if return_statistics else y
        return ops.pointwise_mlp(x, conv_weight, scale, shift, w1, b1, w2, b2, residual_input,
                                 activation)

    return partial_block
