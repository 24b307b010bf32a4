"""PAT_sp's ops and autograd Function (the ops: ``patnet_triton::*`` from
:mod:`patnet_kernels.ops.triton.spatial_attention`; the CUDA backend has none).

Y = [BN_c(Ma * hsig(w . Ma)) | conv1x1(BN_d(Mb)) + bias], written into one output: the gate
kernels fill y[:, :Q], the pointwise GEMM kernel (BN_d applied to its input tile as it is loaded,
the bias in its epilogue) fills y[:, Q:]. No concatenation copy, no BN_d output tensor.

The ops, each with a fake so torch.compile traces through them:

* ``spatial_attention(m, gate_weight, conv_weight, conv_bias, bn_c..., bn_d..., has_bn_d,
  training, residual, stats_first) -> (y, z, c_stats, d_stats, mean, m2)``: y (+ residual,
  when one is given); with ``stats_first`` >= 0 (mean, m2) the statistics of y[:, stats_first:]
  for a following PAT_ch block (``partial_block``'s ``statistics`` form, chunks of the
  backend's choosing), else both empty;
  z = w . Ma (B, H*W) fp32, kept for the backward; in training c_stats (2, Q) and d_stats
  (2, P, or 2, 0 without BN_d) fp32 are the batch's [mean; biased variance] each BatchNorm
  normalised with; in eval both are (2, 0) (the running statistics were used: the autograd
  Function hands those to the backward). Running statistics are not touched by the op:
  :func:`spatial_attention` updates them from the returned batch statistics, as
  ``F.batch_norm`` would.
* ``spatial_attention_backward(grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, c_eps,
  d_stats, d_weight, d_bias, d_eps, has_bn_d, training) -> (grad_m, grad_gate_weight,
  grad_conv_weight, grad_conv_bias, grad_c_weight, grad_c_bias, grad_d_weight, grad_d_bias)``,
  grad_m in m's dtype, every parameter gradient fp32 (the autograd Function returns each in its
  parameter's dtype); the BN_d gradients are empty (0,) without BN_d.

Passes over M: training forward 2 (statistics of U = Ma * s and of Mb; then both halves of Y),
eval forward 1 (one kernel, and no torch op with BN_d folded); training backward 2 per half (a
reduction, then dM), eval backward: 1 for the Ma half, 2 for the Mb half (the conv weight
gradient, then dMb).

The autograd Function is made by :func:`make_functions` over a ``torch.ops`` namespace, so that
another backend registering the same schemas reuses it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._types import BatchNormParams, update_running_statistics
from . import backward_without_autocast, in_input_dtypes, tensor_dtypes
from ._layout import empty_activation

Tensor = torch.Tensor


def statistics_buffers(m: Tensor, stats_first: int, chunks: int) -> Tuple[Tensor, Tensor]:
    """The forward op's (mean, m2) outputs, empty: (B, chunks, C - stats_first) fp32 each, or
    (B, 0, 0) when stats_first < 0."""
    b, c = m.shape[:2]
    shape = (b, chunks, c - stats_first) if stats_first >= 0 else (b, 0, 0)
    return m.new_empty(shape, dtype=torch.float32), m.new_empty(shape, dtype=torch.float32)


def forward_fake(m, conv_weight, has_bn_d, training, stats_first, chunks):
    """The forward op's outputs (see the module doc) as empty tensors, its statistics in
    ``chunks`` chunks (the backend's): its fake."""
    b, c, h, w = m.shape
    p = conv_weight.shape[0]
    f32 = torch.float32
    return (empty_activation(m, m.shape), m.new_empty((b, h * w), dtype=f32),
            m.new_empty((2, c - p if training else 0), dtype=f32),
            m.new_empty((2, p if has_bn_d and training else 0), dtype=f32),
            *statistics_buffers(m, stats_first, chunks))


def _backward_fake(grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, c_eps, d_stats,
                   d_weight, d_bias, d_eps, has_bn_d, training):
    p = conv_weight.shape[0]
    q = m.shape[1] - p
    pd = p if has_bn_d else 0
    shapes = ((1, q, 1, 1), (p, p, 1, 1), (p,), (q,), (q,), (pd,), (pd,))
    return (empty_activation(m, m.shape),
            *(m.new_empty(shape, dtype=torch.float32) for shape in shapes))


# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace (the forward's: :func:`forward_fake` with the
# backend's statistics chunks).
FAKES = {
    "spatial_attention_backward": _backward_fake,
}


def make_functions(ops):
    """The autograd Function of PAT_sp over the ops of one backend namespace.

    ``ops`` is a ``torch.ops`` namespace with the two ops above (same schemas); returns
    SpatialAttention, whose ``apply(m, gate_weight, conv_weight, conv_bias, c_weight, c_bias,
    c_running_mean, c_running_var, d_weight, d_bias, d_running_mean, d_running_var, residual,
    c_eps, d_eps, has_bn_d, training, stats_first)`` returns (y, c_stats, d_stats, mean, m2),
    the statistics not differentiable (see the forward op).
    """

    class SpatialAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, m, gate_weight, conv_weight, conv_bias, c_weight, c_bias,
                    c_running_mean, c_running_var, d_weight, d_bias, d_running_mean,
                    d_running_var, residual, c_eps, d_eps, has_bn_d, training, stats_first):
            y, z, c_stats, d_stats, mean, m2 = ops.spatial_attention(
                m, gate_weight, conv_weight, conv_bias, c_weight, c_bias, c_running_mean,
                c_running_var, c_eps, d_weight, d_bias, d_running_mean, d_running_var, d_eps,
                has_bn_d, training, residual, stats_first)
            # The statistics the BatchNorms normalised with, for the backward: the batch's
            # [mean; var], or in eval the running mean and variance (stacked there).
            moments = ((c_stats, d_stats) if training else
                       (c_running_mean, c_running_var, d_running_mean, d_running_var))
            ctx.save_for_backward(m, z, gate_weight, conv_weight, c_weight, d_weight, d_bias,
                                  *moments)
            ctx.c_eps, ctx.d_eps = c_eps, d_eps
            ctx.has_bn_d, ctx.training = has_bn_d, training
            ctx.dtypes = tensor_dtypes((m, gate_weight, conv_weight, conv_bias, c_weight, c_bias,
                                        c_running_mean, c_running_var, d_weight, d_bias,
                                        d_running_mean, d_running_var, residual))
            ctx.mark_non_differentiable(c_stats, d_stats, mean, m2)
            ctx.set_materialize_grads(False)  # (no zero gradients made for the statistics)
            return y, c_stats, d_stats, mean, m2

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y, *_):  # (the statistics' gradients: none)
            if grad_y is None:
                return (None,) * 18
            m, z, gate_weight, conv_weight, c_weight, d_weight, d_bias, *moments = \
                ctx.saved_tensors
            if ctx.training:
                c_stats, d_stats = moments
            else:
                c_stats = _stacked(*moments[:2])
                d_stats = _stacked(*moments[2:]) if ctx.has_bn_d else c_stats.new_empty((2, 0))
            grads = ops.spatial_attention_backward(
                grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, ctx.c_eps, d_stats,
                d_weight, d_bias, ctx.d_eps, ctx.has_bn_d, ctx.training)
            gm, gg, gw, gb, gcw, gcb, gdw, gdb = grads
            return in_input_dtypes((gm, gg, gw, gb, gcw, gcb, None, None, gdw, gdb, None, None,
                                    grad_y), ctx.dtypes, ctx.needs_input_grad)

    return SpatialAttention


def _stacked(mean: Tensor, var: Tensor) -> Tensor:
    """[mean; var] as one fp32 (2, C) tensor, as the backward op takes them."""
    return torch.stack([mean, var]).float()


_NO_BN = BatchNormParams(None, None, None, None, 0.0, 0.0)


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.spatial_attention` over ``ops``."""
    SpatialAttention = make_functions(ops)

    def spatial_attention(m: Tensor, gate_weight: Tensor, conv_weight: Tensor,
                          conv_bias: Optional[Tensor], bn_c: BatchNormParams,
                          bn_d: Optional[BatchNormParams], training: bool,
                          residual: Optional[Tensor] = None,
                          statistics_of: Optional[int] = None):
        """PAT_sp with this backend's kernels (inputs already checked by the functional API):
        y, or with ``statistics_of`` (y, the statistics of y[:, statistics_of:])."""
        b, c, h, w = m.shape
        n = b * h * w
        has_bn_d = bn_d is not None
        d = bn_d if has_bn_d else _NO_BN
        y, c_stats, d_stats, mean, m2 = SpatialAttention.apply(
            m, gate_weight, conv_weight, conv_bias, bn_c.weight, bn_c.bias, bn_c.running_mean,
            bn_c.running_var, d.weight, d.bias, d.running_mean, d.running_var, residual,
            float(bn_c.eps), float(d.eps), has_bn_d, training,
            -1 if statistics_of is None else statistics_of)
        if training:  # (the kernels' variances are biased; the running ones take unbiased)
            update_running_statistics(
                (bn_c, c_stats[0], c_stats[1] * (n / (n - 1))),
                *([(d, d_stats[0], d_stats[1] * (n / (n - 1)))] if has_bn_d else []))
        return y if statistics_of is None else (y, (mean, m2))

    return spatial_attention
