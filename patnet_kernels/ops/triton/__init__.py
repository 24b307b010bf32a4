"""The Triton backend's registered ops (``patnet_triton``), one module per op module of
:mod:`patnet_kernels.ops`: bodies that launch the kernels of :mod:`patnet_kernels.triton`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def fp32_vector(t: Optional[torch.Tensor], fill: float, n: int, like: torch.Tensor
                ) -> torch.Tensor:
    """t (n,) as fp32 (itself when it is), or an fp32 vector of ``fill`` on ``like``'s device
    when t is None (a BatchNorm without affine, a conv without bias): what the kernels read."""
    if t is not None:
        return t.float()
    return torch.full((n,), fill, dtype=torch.float32, device=like.device)


def fp32_affine(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], n: int,
                like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) fp32 (n,): a BatchNorm's affine, or 1 and 0 where it has none."""
    return fp32_vector(weight, 1.0, n, like), fp32_vector(bias, 0.0, n, like)
