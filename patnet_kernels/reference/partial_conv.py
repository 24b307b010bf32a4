"""PConv, the partial 3x3 convolution with channel passthrough (reference). SPEC.md section 1."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_conv3x3(x: torch.Tensor, weight: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Y = [conv3x3(X1) | X2] with X1 = x[:, :C1], C1 = weight.shape[0].

    x: (B, C, H, W), any memory format. weight: (C1, C1, 3, 3). Stride 1, zero padding 1, no bias.
    Out of place, returns a new (B, C, H, W) tensor. In place, writes conv3x3(X1) into
    x[:, :C1] and returns x; X1 is copied first, so autograd still sees the original X1 for the
    weight gradient (the naive slicing form corrupts it, FasterNet issue #23).
    """
    c1 = weight.shape[0]
    if inplace:
        x1 = x[:, :c1].clone()
        x[:, :c1] = F.conv2d(x1, weight, padding=1)
        return x
    return torch.cat([F.conv2d(x[:, :c1], weight, padding=1), x[:, c1:]], dim=1)
