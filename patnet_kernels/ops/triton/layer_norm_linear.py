"""PAT_sf's LayerNorm + qkv op in the Triton backend (``patnet_triton``, see
:mod:`..layer_norm_linear`): ``layer_norm_linear(x, weight, bias, eps) -> y``, a body that launches the patch conv's kernel (:mod:`patnet_kernels.triton.patch_conv`)
with k = 1 and its LayerNorm prologue, writing the tokens as a channels_last map, and its
fake."""
from __future__ import annotations

from typing import Optional

import torch

from ...triton import patch_conv as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, layer_norm_linear as spec

Tensor = torch.Tensor


@custom_op("patnet_triton::layer_norm_linear", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    bsz, _, h, w = x.shape
    y = torch.empty(spec.output_shape(x, weight), device=x.device, dtype=weight.dtype)
    # (the tokens (B, N, C_OUT) are the channels_last map (B, C_OUT, H, W); the weight a 1 x 1
    # conv's)
    kernels.patch_conv(x, weight[:, :, None, None], bias,
                       y.view(bsz, h, w, weight.shape[0]).permute(0, 3, 1, 2),
                       eps=eps)
    return y


@_forward.register_fake
def _forward_fake(x, weight, bias, eps):
    return x.new_empty(spec.output_shape(x, weight), dtype=weight.dtype)
