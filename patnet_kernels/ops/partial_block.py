"""A FasterNet or PAT_ch block in inference, x + MLP(mixer(x)), for every fused backend that
has it (Triton): no op of its own, but the ops it composes so that the mixer's output is never
written whole:

1. PAT_ch only: ``channel_attention_stats`` and ``channel_attention_gate``
   (:func:`patnet_kernels.ops.channel_attention.eval_gate`): the per-(sample, channel) affine
   map (scale, shift) of X2, BN_b folded in;
2. ``partial_conv3x3`` on the view X1 = x[:, :C1]: conv3x3(X1) alone, (B, C1, H, W);
3. ``pointwise_mlp(x, head=conv3x3(X1), scale, shift, ..., residual=x)``: the MLP reads its
   input as [conv3x3(X1) | X2 * scale + shift] (PConv: X2 as it is), keeps the hidden
   activation on chip and adds x back.

So the block moves X once for the statistics (X2), X1 twice and Y1 twice for the conv half, X
and the output once for the MLP, where the mixer op then the MLP op would also write and read
the whole mixer output. The launches: 2 per FasterNet block, 4 per PAT_ch block.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import BatchNormParams
from .channel_attention import eval_gate

Tensor = torch.Tensor

# (no op of its own: the ops it composes have their fakes in their modules)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.partial_block` over ``ops``."""

    def partial_block(x: Tensor, conv_weight: Tensor, cfc_weight: Optional[Tensor],
                      cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: Optional[BatchNormParams], w1: Tensor, b1: Optional[Tensor],
                      w2: Tensor, b2: Optional[Tensor], activation: str) -> Tensor:
        """The block with this backend's kernels (inputs checked; no gradient taken)."""
        c1 = conv_weight.shape[0]
        scale = shift = None
        if cfc_weight is not None:
            scale, shift = eval_gate(ops, x, c1, cfc_weight, cfc_bias, bn_a, bn_b)
        head = ops.partial_conv3x3(x[:, :c1], conv_weight)
        return ops.pointwise_mlp(x, head, scale, shift, w1, b1, w2, b2, x, activation)

    return partial_block
