"""PConv's ops and autograd Functions, for every fused backend.

The ops (registered as ``patnet_triton::*`` by :mod:`patnet_kernels.ops.triton.partial_conv`
and as ``patnet_cuda::*`` by csrc/bindings.cpp, same schemas), each with the fake below so that
torch.compile traces through them:

* ``partial_conv3x3(x, weight) -> y``: [conv3x3(X1) | X2], one pass.
* ``partial_conv3x3_(x!, weight) -> x1``: writes conv3x3(X1) into x[:, :C1] in place and
  returns the original X1 (the copy the conv reads from, kept for the weight gradient).
* ``partial_conv3x3_input_grad(grad_y, weight) -> grad_x``: [conv3x3^T(dY1) | dY2].
* ``conv3x3_weight_grad(x1, grad_y, weight) -> grad_weight``, shaped, typed and strided as
  ``weight`` (``empty_like``): autograd accumulates a gradient of its parameter's strides
  without a copy (a channels_last model's weights are channels_last).

The autograd Functions are made by :func:`make_functions` over a backend's ``torch.ops``
namespace; :func:`backend_function` is the op with the reference's signature.
"""
from __future__ import annotations

import torch

from . import backward_without_autocast
from ._layout import empty_activation

Tensor = torch.Tensor


def _forward_fake(x, weight):
    return empty_activation(x, x.shape)


def _x1_shape(x: Tensor, weight: Tensor):
    """(B, C1, H, W): the shape of X1."""
    return (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


def _forward_inplace_fake(x, weight):
    return empty_activation(x, _x1_shape(x, weight))


def _input_grad_fake(grad_y, weight):
    return empty_activation(grad_y, grad_y.shape)


def _weight_grad_fake(x1, grad_y, weight):
    return torch.empty_like(weight)


# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "partial_conv3x3": _forward_fake,
    "partial_conv3x3_": _forward_inplace_fake,
    "partial_conv3x3_input_grad": _input_grad_fake,
    "conv3x3_weight_grad": _weight_grad_fake,
}


def make_functions(ops):
    """The autograd Functions of PConv over the ops of one backend namespace.

    ``ops`` is a ``torch.ops`` namespace with the four ops above (same schemas); returns
    (PartialConv3x3, PartialConv3x3Inplace).
    """

    class PartialConv3x3(torch.autograd.Function):
        """Y = [conv3x3(X1) | X2]; x (B, C, H, W), weight (C1, C1, 3, 3) -> (B, C, H, W)."""

        @staticmethod
        def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
            ctx.save_for_backward(x, weight)
            return ops.partial_conv3x3(x, weight)

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y: Tensor):
            x, weight = ctx.saved_tensors
            return backward(ctx, grad_y, x[:, :weight.shape[0]], weight)

    class PartialConv3x3Inplace(torch.autograd.Function):
        """x[:, :C1] = conv3x3(X1) in place; returns x (passthrough channels untouched)."""

        @staticmethod
        def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
            x1 = ops.partial_conv3x3_(x, weight)
            ctx.mark_dirty(x)
            ctx.save_for_backward(x1, weight)
            return x

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y: Tensor):
            x1, weight = ctx.saved_tensors
            return backward(ctx, grad_y, x1, weight)

    def backward(ctx, grad_y: Tensor, x1: Tensor, weight: Tensor):
        needs_x, needs_w = ctx.needs_input_grad[:2]
        grad_x = ops.partial_conv3x3_input_grad(grad_y, weight) if needs_x else None
        grad_w = ops.conv3x3_weight_grad(x1, grad_y, weight) if needs_w else None
        return grad_x, grad_w

    return PartialConv3x3, PartialConv3x3Inplace


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.partial_conv3x3` over ``ops``."""
    PartialConv3x3, PartialConv3x3Inplace = make_functions(ops)

    def partial_conv3x3(x: Tensor, weight: Tensor, inplace: bool = False) -> Tensor:
        """PConv with this backend's kernels (inputs already checked by the functional API).

        In place without autograd, the mutating op runs alone (torch.compile functionalizes
        it); in place with autograd it runs inside an autograd.Function that marks x dirty,
        which torch.compile does not trace (a graph break): compile training with inplace=False.
        """
        if not inplace:
            return PartialConv3x3.apply(x, weight)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return PartialConv3x3Inplace.apply(x, weight)
        ops.partial_conv3x3_(x, weight)
        return x

    return partial_conv3x3

