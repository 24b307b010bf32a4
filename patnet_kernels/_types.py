"""Small value types shared by the functional API and every backend."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn


class BatchNormParams(NamedTuple):
    """The tensors and settings of one ``BatchNorm2d`` over C channels, passed to a fused op.

    Every tensor is of shape (C,). ``weight``/``bias`` may be None (no affine);
    ``running_mean``/``running_var`` may be None only in training mode (no running statistics).
    In training mode the op normalises with batch statistics and updates the running
    statistics in place with ``momentum``, exactly as ``torch.nn.functional.batch_norm``.
    """

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    momentum: float = 0.1
    eps: float = 1e-5

    @classmethod
    def of(cls, bn: nn.BatchNorm2d, training: bool) -> "BatchNormParams":
        """The parameters of ``bn`` for one forward pass, without side effects.

        ``momentum=None`` (cumulative average) resolves to 1 / (batches so far + 1), as
        ``nn.BatchNorm2d`` does; call :func:`count_batch` once the op has run.
        """
        momentum = bn.momentum
        if momentum is None:
            seen = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0
            momentum = 1.0 / (seen + 1) if training else 0.0
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)


def count_batch(bn: nn.BatchNorm2d) -> None:
    """Count one training batch in ``bn.num_batches_tracked``, as ``nn.BatchNorm2d.forward``."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
