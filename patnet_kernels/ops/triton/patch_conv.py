"""The stem's and merging layers' op in the Triton backend (``patnet_triton``, see
:mod:`..patch_conv`): ``patch_conv(x, weight, bias, stats_first) -> (y, mean, m2)``, a body
that launches the kernel of :mod:`patnet_kernels.triton.patch_conv`, and its fake."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...triton import patch_conv as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, patch_conv as spec

Tensor = torch.Tensor


def _stats_shape(x: Tensor, weight: Tensor, stats_first: int):
    """(B, T, C_OUT - stats_first), or (B, 0, 0) without statistics (stats_first < 0)."""
    if stats_first < 0:
        return (x.shape[0], 0, 0)
    return (x.shape[0], kernels.stats_chunks(x, weight), weight.shape[0] - stats_first)


@custom_op("patnet_triton::patch_conv", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stats_first: int,
             channels_last: bool) -> Tuple[Tensor, Tensor, Tensor]:
    shape = _stats_shape(x, weight, stats_first)
    mean = torch.empty(shape, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    y = kernels.patch_conv(x, weight, bias, spec.output(x, weight, channels_last),
                           (mean, m2) if stats_first >= 0 else None, max(stats_first, 0))
    return y, mean, m2


@_forward.register_fake
def _forward_fake(x, weight, bias, stats_first, channels_last):
    shape = _stats_shape(x, weight, stats_first)
    return (spec.output(x, weight, channels_last), x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.float32))
