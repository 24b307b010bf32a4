"""Helpers for parity checks: give a freshly built model non-trivial normalisation state.

A new model's BatchNorms are identities (mean 0, var 1, weight 1, bias 0), its LayerNorms too and
its RPE tables zero, so a check of folding or of a kernel against the reference would not
exercise them. ``randomize_norms`` fills them with seeded random values.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random BN statistics and affines, LN affines and RPE tables; returns the model."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, scale, offset=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(rand(c, 0.5))
            module.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            if module.affine:
                module.weight.copy_(rand(c, 0.3, 1.0))
                module.bias.copy_(rand(c, 0.2))
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.copy_(rand(module.weight.shape, 0.3, 1.0))
            module.bias.copy_(rand(module.bias.shape, 0.2))
        elif hasattr(module, "lookup_table_bias"):
            module.lookup_table_bias.copy_(rand(module.lookup_table_bias.shape, 1.0))
    return model
