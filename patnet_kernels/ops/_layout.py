"""Layouts of the registered ops' activations: output allocation shared by the ops and their
fakes (their strides must agree), and the inputs the kernels take as they are."""
from __future__ import annotations

from typing import Sequence

import torch

from .._types import pixel_stride


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else NCHW."""
    if x.dim() != 4 or x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1:
        return torch.channels_last  # (the second: a channel slice of a channels_last tensor)
    return torch.contiguous_format


def empty_activation(x: torch.Tensor, shape: Sequence[int], dtype=None) -> torch.Tensor:
    """A new (B, C', H, W) tensor on x's device in x's memory format (and dtype by default)."""
    return torch.empty(tuple(shape), dtype=dtype or x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def with_pixel_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its (h, w) flatten to one pixel stride (NCHW, channels_last, channel slices
    of those: the kernels address pixel h * W + w), else a copy in its memory format."""
    if pixel_stride(t) is not None:
        return t
    return t.contiguous(memory_format=memory_format_of(t))
