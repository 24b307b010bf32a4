"""BatchNorm2d from a :class:`~patnet_kernels.BatchNormParams` (reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._types import BatchNormParams


def batch_norm(x: torch.Tensor, bn: BatchNormParams, training: bool) -> torch.Tensor:
    """``F.batch_norm`` of x (B, C, H, W) with ``bn``; updates running statistics in training."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training, bn.momentum, bn.eps)
