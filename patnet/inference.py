"""The inference path: ``optimize_for_inference(model)``, the fastest correct way to run a model.

It returns an eval-mode copy of a PATNet or FasterNet (the model itself is not changed) that

1. has every foldable BatchNorm folded (:func:`patnet.fuse_for_inference`);
2. runs each fused op on the backend ``backend`` names (``"auto"``: on a GPU, a fused backend
   only where measured faster than the reference for that call, see
   :mod:`patnet_kernels.auto_rule`; ``model.backend_plan(device, input_shape)`` tells which);
3. on the CPU, where the reference would run, runs PAT_ch and PAT_sf's ops in their eval forms
   (its mixers' ``eval_forms`` policy, see :mod:`patnet_kernels.eval_cpu`: PAT_ch's statistics
   in two cheap passes instead of ``Tensor.std``, BN_b folded into one affine pass; PAT_sf's
   attention by ``scaled_dot_product_attention``; both halves written into one buffer);
4. switches FasterNet's PConv to the in-place passthrough: inside the network a block's input is
   an intermediate that nothing else reads (the stem's, a merging layer's or the previous
   block's output), so the block may overwrite X1 with conv3x3(X1), provided the residual gets
   the original X1: the block keeps that copy (a quarter of the channels) and adds it back;
5. writes residual sums and the MLP's activation into buffers it already owns (no new tensor).

Its outputs equal the eval model's within float rounding (tests/test_inference.py checks every
variant). The copy is for inference only: it refuses ``train()``, and its blocks overwrite their
input (call the whole model, not a block on a tensor you still need).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import patnet_kernels as pk

from .fuse import fuse_for_inference
from .layers import FasterNetBlock, PATNetBlock
from .model import set_backend

class InferenceFasterNetBlock(FasterNetBlock):
    """X + MLP(PConv(X)) with PConv in place on X and the residual from the saved X1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.spatial_mixing
        c1 = conv.dim_conv3
        x1 = x[:, :c1].clone()
        y = pk.partial_conv3x3(x, conv.partial_conv3.weight, inplace=True, backend=conv.backend)
        out = self.mlp(y)  # (y is x, now [conv3x3(X1) | X2])
        out[:, c1:] += y[:, c1:]
        out[:, :c1] += x1
        return out


class InferencePATNetBlock(PATNetBlock):
    """The PATNet block with its residual sums written into the branch outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_attention:
            x = self.spatial_mixing(x).add_(x)
            return self.mlp(x).add_(x)
        return self.mlp(self.spatial_mixing(x)).add_(x)


_INFERENCE_CLASSES = {FasterNetBlock: InferenceFasterNetBlock,
                      PATNetBlock: InferencePATNetBlock}


@torch.no_grad()
def optimize_for_inference(model: nn.Module, backend: str = "auto") -> nn.Module:
    """An eval-mode copy of a PATNet or FasterNet for the fastest inference (see module doc).

    model: a PATNet or FasterNet (trained or not, any device and dtype; already folded is fine).
    backend: "auto" (default: per call, a fused backend only where measured faster than the
    reference on this kind of GPU, else the reference), "torch", "triton" or "cuda" for every
    fused op. Returns the copy; ``model`` is unchanged.
    The copy's parameters do not require gradients.
    """
    optimized = (copy.deepcopy(model).eval() if getattr(model, "fused_for_inference", False)
                 else fuse_for_inference(model))
    optimized.requires_grad_(False)
    set_backend(optimized, backend)
    for module in optimized.modules():
        inference_class = _INFERENCE_CLASSES.get(type(module))
        if inference_class is not None:
            module.__class__ = inference_class
        if hasattr(module, "eval_forms"):
            module.eval_forms = True
        if isinstance(module, nn.Sequential) and len(module) >= 3 \
                and isinstance(module[2], nn.ReLU):  # the MLP's ReLU: its input is the MLP's own
            module[2].inplace = True
    optimized.optimized_for_inference = True
    return optimized
