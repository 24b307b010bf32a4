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
        """The parameters of ``bn`` for one forward pass.

        In training mode this counts the batch in ``bn.num_batches_tracked`` (as
        ``nn.BatchNorm2d.forward`` does) and resolves ``momentum=None`` to the cumulative average.
        """
        momentum = bn.momentum
        if training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   0.0 if momentum is None else momentum, bn.eps)
