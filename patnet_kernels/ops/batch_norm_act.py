"""The ops and autograd Function of a BatchNorm followed by an activation, act(BN(x)) (the ops:
``patnet_triton::*`` from :mod:`patnet_kernels.ops.triton.batch_norm_act`; the CUDA backend has
none).

The BN output Z is never stored: the forward writes Y = act(Z) only, and the backward
recomputes Z from X and the statistics. The ops, each with a fake so torch.compile traces
through them:

* ``batch_norm_act(x, weight, bias, running_mean, running_var, momentum, eps, activation,
  training) -> (y, mean, var)``: in training mean and var (C,) fp32 are the batch's mean and
  biased variance, normalised with, and the running statistics (where given) are updated in
  place as ``F.batch_norm`` does (momentum, the unbiased variance; a mutating op); in eval
  both outputs are empty (0,) (the running statistics were used: the autograd Function hands
  those to the backward).
* ``batch_norm_act_backward(grad_y, x, mean, var, weight, bias, eps, activation, training)
  -> (grad_x, grad_affine)``, grad_affine = [grad_bias; grad_weight] fp32 (2, C).

Passes over the activation: training forward 2 (the statistics; then Y), eval forward 1;
backward 2 (the two sums; then dX).

The autograd Function is made by :func:`make_function` over a ``torch.ops`` namespace, so that
another backend registering the same schemas reuses it.
"""
from __future__ import annotations

import torch

from .._types import BatchNormParams
from . import backward_without_autocast, in_input_dtypes, tensor_dtypes
from ._layout import empty_activation

Tensor = torch.Tensor


def _forward_fake(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                  training):
    c = x.shape[1] if training else 0
    return (empty_activation(x, x.shape), x.new_empty((c,), dtype=torch.float32),
            x.new_empty((c,), dtype=torch.float32))


def _backward_fake(grad_y, x, mean, var, weight, bias, eps, activation, training):
    return empty_activation(x, x.shape), x.new_empty((2, x.shape[1]), dtype=torch.float32)


# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "batch_norm_act": _forward_fake,
    "batch_norm_act_backward": _backward_fake,
}


def make_function(ops):
    """The autograd Function over ``ops``, a ``torch.ops`` namespace with the two ops above:
    ``apply(x, weight, bias, running_mean, running_var, momentum, eps, activation,
    training)`` returns (y, mean, var), the statistics not differentiable (see the forward
    op)."""

    class BatchNormAct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, activation,
                    training):
            y, mean, var = ops.batch_norm_act(x, weight, bias, running_mean, running_var,
                                              momentum, eps, activation, training)
            # (normalised with: the batch's statistics, or in eval the running ones)
            moments = (mean, var) if training else (running_mean, running_var)
            ctx.save_for_backward(x, weight, bias, *moments)
            ctx.eps, ctx.activation, ctx.training = eps, activation, training
            ctx.mark_non_differentiable(mean, var)
            ctx.set_materialize_grads(False)  # (no zero gradients made for the statistics)
            return y, mean, var

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y, *_):  # (the statistics' gradients: none)
            if grad_y is None:
                return (None,) * 9
            x, weight, bias, mean, var = ctx.saved_tensors
            grad_x, grad_affine = ops.batch_norm_act_backward(
                grad_y, x, mean.float(), var.float(), weight, bias, ctx.eps, ctx.activation,
                ctx.training)
            return in_input_dtypes((grad_x, grad_affine[1], grad_affine[0]),
                                   tensor_dtypes((x, weight, bias)), ctx.needs_input_grad)

    return BatchNormAct


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.batch_norm_act` over ``ops``."""
    BatchNormAct = make_function(ops)

    def batch_norm_act(x: Tensor, bn: BatchNormParams, activation: str,
                       training: bool) -> Tensor:
        """act(BN(x)) with this backend's kernels (inputs already checked by the functional
        API); the op updates the running statistics in training."""
        y, _, _ = BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                     float(bn.momentum), float(bn.eps), activation, training)
        return y

    return batch_norm_act
