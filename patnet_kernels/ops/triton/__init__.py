"""The Triton backend's registered ops (``patnet_triton``), one module per op module of
:mod:`patnet_kernels.ops`: bodies that launch the kernels of :mod:`patnet_kernels.triton`."""
from __future__ import annotations

from typing import Optional

import torch


def fp32_vector(t: Optional[torch.Tensor], fill: float, n: int, like: torch.Tensor
                ) -> torch.Tensor:
    """t (n,) as fp32 (itself when it is), or an fp32 vector of ``fill`` on ``like``'s device
    when t is None (a BatchNorm without affine, a conv without bias): what the kernels read."""
    if t is not None:
        return t.float()
    return torch.full((n,), fill, dtype=torch.float32, device=like.device)
