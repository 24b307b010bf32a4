"""BatchNorm2d from a :class:`~patnet_kernels.BatchNormParams` (reference), and its per-channel
affine form, the one formula every BatchNorm fold of the package uses."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .._types import BatchNormParams


def batch_norm(x: torch.Tensor, bn: BatchNormParams, training: bool) -> torch.Tensor:
    """``F.batch_norm`` of x (B, C, H, W) with ``bn``; updates running statistics in training."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training, bn.momentum, bn.eps)


def batch_norm_affine(bn, mean: torch.Tensor, var: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,), with BN(x) = scale * x + shift per channel when ``bn``
    (anything with ``weight``, ``bias`` (None: no affine) and ``eps``: a BatchNormParams or an
    ``nn.BatchNorm2d``) normalises with the statistics ``mean`` and (biased) ``var``, e.g. its
    running ones in eval: scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
