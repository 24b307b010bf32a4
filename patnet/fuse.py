"""Folding for inference: every BatchNorm that can be merged exactly into a neighbour is.

``fuse_for_inference(model)`` returns a folded copy (the model itself is not changed) whose
outputs equal the eval-mode model's up to float rounding. What is folded:

- conv -> BN pairs: stem, patch merging, the first MLP conv (its BN), into conv weight and bias;
- PAT_ch: BN_a into W_ch (the (1, 2) ``cfc1`` conv gets a bias); BN_b stays an eval-mode affine,
  which the channel-attention op applies in the same pass as the gate;
- PAT_sp: BN_d into the 1x1 conv that follows it (exact for a 1x1 conv: BN before a conv);
- PAT_sf: the LayerNorm's affine and the attention scale d^-0.5 into the qkv projection.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from patnet_kernels._types import outside_inference_mode
from patnet_kernels.reference.batch_norm import batch_norm_affine

from .layers import (LayerNorm2d, PartialSpatialAttention, PATChannelMixer, PatchEmbed,
                     PatchMerging, PATSelfMixer)
from .model import check_model


def _bn_scale_shift(bn: nn.BatchNorm2d):
    """Eval-mode BN(x) = scale * x + shift, per channel."""
    return batch_norm_affine(bn, bn.running_mean, bn.running_var)


def _with_bias(weight: torch.Tensor, bias: torch.Tensor, like: nn.Module) -> nn.Module:
    """A copy of conv or linear ``like`` with the given weight and a bias."""
    if isinstance(like, nn.Conv2d):
        new = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride,
                        like.padding, like.dilation, like.groups, bias=True,
                        device=weight.device, dtype=weight.dtype)
    else:
        new = nn.Linear(like.in_features, like.out_features, bias=True,
                        device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    new.bias.copy_(bias)
    return new


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """BN(conv(x)) as one conv with a bias."""
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return _with_bias(weight, bias, conv)


def _fold_bn_conv1x1(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """conv1x1(BN(x)) as one conv with a bias (exact only for an unpadded, unstrided,
    ungrouped 1x1 conv: every output pixel reads one BN-normalised input pixel)."""
    if (conv.kernel_size, conv.padding, conv.stride, conv.groups) != ((1, 1), (0, 0), (1, 1), 1):
        raise ValueError(f"a BatchNorm folds into a following conv only where it is 1x1, "
                         f"unpadded, unstrided and ungrouped, got {conv}")
    scale, shift = _bn_scale_shift(bn)
    w2d = conv.weight[:, :, 0, 0]
    bias = w2d @ shift if conv.bias is None else conv.bias + w2d @ shift
    return _with_bias(conv.weight * scale.view(1, -1, 1, 1), bias, conv)


def _fold_self_attention(mixer: PATSelfMixer) -> None:
    """LN affine and the q scale into qkv: qkv(g * n + b) = (W g) n + W b."""
    attn, norm = mixer.attn, mixer.norm
    weight = attn.qkv.weight
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias.clone()
    if norm.elementwise_affine:
        bias = bias + weight @ norm.bias
        weight = weight * norm.weight.view(1, -1)
    dim = weight.shape[1]
    q_scale = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    q_scale[:dim] = attn.scale
    attn.qkv = _with_bias(weight * q_scale.view(-1, 1), bias * q_scale, attn.qkv)
    attn.scale = 1.0
    mixer.norm = LayerNorm2d(dim, eps=norm.eps, affine=False)


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable BatchNorm folded (see module doc).

    The copy cannot be put back in training mode. Works on PATNet and FasterNet, classification
    or features mode, on any device and dtype; a model already folded is copied as it is.
    """
    check_model(model, "fuse_for_inference")
    with outside_inference_mode():  # (the copy is used in any mode afterwards)
        return _folded_copy(model)


def _folded_copy(model: nn.Module) -> nn.Module:
    fused = copy.deepcopy(model).eval()
    if getattr(model, "fused_for_inference", False):
        return fused
    for module in list(fused.modules()):
        if isinstance(module, PatchEmbed):
            module.proj, module.norm = _fold_conv_bn(module.proj, module.norm), nn.Identity()
        elif isinstance(module, PatchMerging):
            module.reduction = _fold_conv_bn(module.reduction, module.norm)
            module.norm = nn.Identity()
        elif isinstance(module, nn.Sequential) and len(module) >= 2 \
                and isinstance(module[0], nn.Conv2d) \
                and isinstance(module[1], (nn.BatchNorm2d, nn.SyncBatchNorm)):
            module[0], module[1] = _fold_conv_bn(module[0], module[1]), nn.Identity()
        elif isinstance(module, PATChannelMixer) and not isinstance(module.attn.bn, nn.Identity):
            module.attn.cfc1 = _fold_conv_bn(module.attn.cfc1, module.attn.bn)
            module.attn.bn = nn.Identity()
        elif isinstance(module, PartialSpatialAttention) \
                and not isinstance(module.norm2, nn.Identity):
            module.conv = _fold_bn_conv1x1(module.norm2, module.conv)
            module.norm2 = nn.Identity()
        elif isinstance(module, PATSelfMixer):
            _fold_self_attention(module)
    fused.fused_for_inference = True
    return fused
