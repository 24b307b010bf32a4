"""The block's MLP for inference: its op, for every fused backend that has it.

The op (registered as ``patnet_triton::pointwise_mlp`` by
:mod:`patnet_kernels.ops.triton.pointwise_mlp`), with the fake below so that torch.compile
traces through it:

* ``pointwise_mlp(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation) -> y``:
  W2 . act(W1 . M + b1) + b2 [+ R] in one pass, y in x's memory format, where the MLP's input
  M is x, or, given a (C_HEAD, C_HEAD, 3, 3) ``conv_weight`` and/or a (B, C - C_HEAD) fp32
  ``scale`` and ``shift``, [conv3x3(x[:, :C_HEAD]) | x[:, C_HEAD:] * scale + shift]: a
  FasterNet or PAT_ch block's mixer computed as the MLP reads it (its conv half, and X2 with
  PAT_ch's gate applied; see :mod:`patnet_kernels.ops.partial_block`).
* Triton's ``pointwise_mlp_stats`` and ``pointwise_mlp_spatial`` (with the statistics of the
  output for the next PAT_ch block; with PAT_sp on the MLP's output before the residual): see
  :mod:`patnet_kernels.ops.triton.pointwise_mlp`.

An inference op (its BatchNorm folded into W1 and b1): it has no backward, and the registry
refuses a call through which a gradient may be taken (:func:`patnet_kernels.registry.refusals`),
so autograd never meets it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import SpatialAttentionParams
from ._layout import empty_activation

Tensor = torch.Tensor


def output_shape(x: Tensor, w2: Tensor):
    """(B, C_OUT, H, W): the shape of the MLP's output."""
    return (x.shape[0], w2.shape[0], x.shape[2], x.shape[3])


def _forward_fake(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation):
    return empty_activation(x, output_shape(x, w2))


# The op's fake (shape, dtype and strides of its output), shared by every backend that
# registers the op under its own namespace.
FAKES = {"pointwise_mlp": _forward_fake}


def spatial_arguments(spatial: SpatialAttentionParams) -> tuple:
    """PAT_sp's arguments of the ``pointwise_mlp_spatial`` op, after ``stats_first``: the gate
    and conv tensors, then BN_c's (weight, bias, running mean, running var, eps) and BN_d's
    (all None and eps 0 where it is folded)."""
    bn_c, bn_d = spatial.bn_c, spatial.bn_d
    d = ((bn_d.weight, bn_d.bias, bn_d.running_mean, bn_d.running_var, bn_d.eps)
         if bn_d is not None else (None,) * 4 + (0.0,))
    return (spatial.gate_weight, spatial.conv_weight, spatial.conv_bias, bn_c.weight,
            bn_c.bias, bn_c.running_mean, bn_c.running_var, bn_c.eps) + d


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.pointwise_mlp` over ``ops``."""

    def pointwise_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], residual: Optional[Tensor], activation: str,
                      spatial: Optional[SpatialAttentionParams] = None) -> Tensor:
        """The MLP with this backend's kernel (inputs checked; no gradient taken)."""
        if spatial is not None:  # (stats_first -1: no statistics)
            return ops.pointwise_mlp_spatial(x, None, None, None, w1, b1, w2, b2, residual,
                                             activation, -1, *spatial_arguments(spatial))[0]
        return ops.pointwise_mlp(x, None, None, None, w1, b1, w2, b2, residual, activation)

    return pointwise_mlp
