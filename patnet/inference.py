"""The inference path: ``optimize_for_inference(model)``, the fastest correct way to run a model.

It returns an eval-mode copy of a PATNet or FasterNet (the model itself is not changed) that

1. has every foldable BatchNorm folded (:func:`patnet.fuse_for_inference`);
2. runs each fused op on the fastest backend usable for the input's device (``"auto"``: the CUDA
   kernels, then Triton, on a GPU; ``model.backend_plan()`` tells which), unless ``backend``
   names one;
3. on the CPU, runs PAT_ch in its eval form (:func:`patnet_kernels.eval_cpu.channel_attention_eval`:
   two-pass statistics, BN_b folded into one affine pass, no concatenation) where the reference
   would run it;
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
from patnet_kernels.eval_cpu import channel_attention_eval

from .fuse import fuse_for_inference
from .layers import FasterNetBlock, PATChannelMixer, PATNetBlock, bn_params
from .model import set_backend

# Activation dtypes the CPU eval form of PAT_ch serves (its statistics run in the input dtype).
_EVAL_CPU_DTYPES = (torch.float32, torch.float64)


class InferencePATChannelMixer(PATChannelMixer):
    """PAT_ch for the inference path: the CPU eval form where the reference would run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training and x.dtype in _EVAL_CPU_DTYPES and x.is_contiguous()
                and not torch.is_autocast_enabled(x.device.type)
                and pk.resolve_backend(self.backend, x.device, "channel_attention") == "torch"):
            return channel_attention_eval(x, self.partial_conv3.weight, self.attn.cfc1.weight,
                                          self.attn.cfc1.bias, bn_params(self.norm, False))
        return super().forward(x)


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


_INFERENCE_CLASSES = {PATChannelMixer: InferencePATChannelMixer,
                      FasterNetBlock: InferenceFasterNetBlock,
                      PATNetBlock: InferencePATNetBlock}


@torch.no_grad()
def optimize_for_inference(model: nn.Module, backend: str = "auto") -> nn.Module:
    """An eval-mode copy of a PATNet or FasterNet for the fastest inference (see module doc).

    model: a PATNet or FasterNet (trained or not, any device and dtype; already folded is fine).
    backend: "auto" (default: per op the fastest backend usable on the input's device),
    "torch", "triton" or "cuda" for every fused op. Returns the copy; ``model`` is unchanged.
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
        if isinstance(module, nn.Sequential) and len(module) >= 3 \
                and isinstance(module[2], nn.ReLU):  # the MLP's ReLU: its input is the MLP's own
            module[2].inplace = True
    optimized.optimized_for_inference = True
    return optimized
