"""PAT_sf's LayerNorm and qkv projection in inference, for every fused backend that has them
(Triton: the patch conv's kernel with k = 1 and a LayerNorm prologue).

The op (registered as ``patnet_triton::layer_norm_linear`` by
:mod:`patnet_kernels.ops.triton.layer_norm_linear`, with its fake there):

* ``layer_norm_linear(x, weight, bias, eps) -> y``: y (B, H * W, C_OUT) contiguous in the
  weight's dtype, the tokens of x (B, C_IN, H, W), any strides and float dtype, each
  normalised over its C_IN values in float32 (no affine) then projected by weight (C_OUT,
  C_IN) and bias (C_OUT,) or None.

An inference op: it has no backward, and the registry refuses a call through which a gradient
may be taken (:func:`patnet_kernels.registry.refusals`).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def output_shape(x: Tensor, weight: Tensor):
    """(B, H * W, C_OUT): the shape of the output."""
    return (x.shape[0], x.shape[2] * x.shape[3], weight.shape[0])


# (its one op's fake lives beside its body, as the patch conv's)
FAKES = {}


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.layer_norm_linear` over ``ops``."""

    def layer_norm_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          eps: float = 1e-5) -> Tensor:
        """The LayerNorm and projection with this backend's kernel (inputs checked; no
        gradient taken)."""
        return ops.layer_norm_linear(x, weight, bias, float(eps))

    return layer_norm_linear
