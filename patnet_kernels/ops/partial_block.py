"""A FasterNet or PAT_ch block in inference, x + MLP(mixer(x)), for every fused backend that
has it (Triton): composed of ops so that the mixer's output is never written whole:

1. the conv half alone: ``partial_conv3x3`` on the view X1 = x[:, :C1] (PConv), or, for
   PAT_ch, ``partial_conv3x3_stats(x, conv_weight) -> (y1, mean, m2)`` (Triton only, see
   :mod:`patnet_kernels.ops.triton.partial_block`), which in the same launch takes the
   statistics of X2 per pixel chunk;
2. PAT_ch only: ``channel_attention_gate`` (:func:`patnet_kernels.ops.channel_attention.
   eval_gate`) merges them and gives the per-(sample, channel) affine map (scale, shift) of X2,
   BN_b folded in;
3. ``pointwise_mlp(x, head=conv3x3(X1), scale, shift, ..., residual=x)``: the MLP reads its
   input as [conv3x3(X1) | X2 * scale + shift] (PConv: X2 as it is), keeps the hidden
   activation on chip and adds x back.

So the block reads X once for the conv and the statistics, writes and reads conv3x3(X1) (a
quarter of the channels), and reads X and writes the output once in the MLP, where the mixer
op then the MLP op would also write and read the whole mixer output. The launches: 2 per
FasterNet block, 3 per PAT_ch block.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import BatchNormParams
from .channel_attention import eval_gate

Tensor = torch.Tensor

# (no op that every backend with the block registers: the ops it composes have their fakes in
# their modules, and partial_conv3x3_stats, Triton's own, in ops/triton/partial_block.py)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.partial_block` over ``ops``."""

    def partial_block(x: Tensor, conv_weight: Tensor, cfc_weight: Optional[Tensor],
                      cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: Optional[BatchNormParams], w1: Tensor, b1: Optional[Tensor],
                      w2: Tensor, b2: Optional[Tensor], activation: str) -> Tensor:
        """The block with this backend's kernels (inputs checked; no gradient taken)."""
        scale = shift = None
        if cfc_weight is None:
            head = ops.partial_conv3x3(x[:, :conv_weight.shape[0]], conv_weight)
        else:
            head, mean, m2 = ops.partial_conv3x3_stats(x, conv_weight)
            scale, shift = eval_gate(ops, mean, m2, x.shape[2] * x.shape[3], cfc_weight,
                                     cfc_bias, bn_a, bn_b)
        return ops.pointwise_mlp(x, head, scale, shift, w1, b1, w2, b2, x, activation)

    return partial_block
