"""PAT_sp as registered ops and an autograd Function (Triton backend).

Y = [BN_c(Ma * hsig(w . Ma)) | conv1x1(BN_d(Mb)) + bias], written into one output: the gate
kernels fill y[:, :Q], the pointwise GEMM kernel (BN_d applied to its input tile as it is loaded,
the bias in its epilogue) fills y[:, Q:]. No concatenation copy, no BN_d output tensor.

Ops in the ``patnet_triton`` namespace, each with a fake so torch.compile traces through them:

* ``spatial_attention(m, gate_weight, conv_weight, conv_bias, bn_c..., bn_d..., has_bn_d,
  training) -> (y, z, c_stats, d_stats)``: z = w . Ma (B, H*W) fp32, kept for the backward;
  c_stats (2, Q) and d_stats (2, P, or 2, 0 without BN_d) fp32 are the [mean; biased variance]
  each BatchNorm normalised with (the batch's in training, the running ones in eval). Running
  statistics are not touched by the op: :func:`spatial_attention` updates them from the
  returned batch statistics, as ``F.batch_norm`` would.
* ``spatial_attention_backward(grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, c_eps,
  d_stats, d_weight, d_bias, d_eps, has_bn_d, training) -> (grad_m, grad_gate_weight,
  grad_conv_weight, grad_conv_bias, grad_c_weight, grad_c_bias, grad_d_weight, grad_d_bias)``;
  the BN_d gradients are empty (0,) without BN_d.

Passes over M: training forward 2 (statistics of U = Ma * s and of Mb; then both halves of Y),
eval forward 1; training backward 2 per half (a reduction, then dM), eval backward: 1 for the
Ma half, 2 for the Mb half (the conv weight gradient, then dMb).

The autograd Function is made by :func:`make_functions` over a ``torch.ops`` namespace, so that
another backend registering the same schemas reuses it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._types import BatchNormParams
from ..triton import spatial_attention as kernels
from ..triton._common import FLOAT_DTYPES, on_tensor_device
from ._layout import empty_activation, memory_format_of

Tensor = torch.Tensor


def _flat_pixels(t: Tensor) -> Tensor:
    """t itself when its (h, w) flatten to one pixel stride (NCHW, channels_last, channel
    slices of those), else a copy in its memory format."""
    if kernels.pixel_stride(t) is not None:
        return t
    return t.contiguous(memory_format=memory_format_of(t))


def _vector(t: Optional[Tensor], fill: float, n: int, like: Tensor) -> Tensor:
    """t as fp32, or an fp32 vector of ``fill`` when t is None (no affine parameter)."""
    if t is not None:
        return t.float()
    return torch.full((n,), fill, dtype=torch.float32, device=like.device)


@torch.library.custom_op("patnet_triton::spatial_attention", mutates_args=())
@on_tensor_device
def _forward(m: Tensor, gate_weight: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
             c_weight: Optional[Tensor], c_bias: Optional[Tensor],
             c_running_mean: Optional[Tensor], c_running_var: Optional[Tensor], c_eps: float,
             d_weight: Optional[Tensor], d_bias: Optional[Tensor],
             d_running_mean: Optional[Tensor], d_running_var: Optional[Tensor], d_eps: float,
             has_bn_d: bool, training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y = empty_activation(m, m.shape)
    m = _flat_pixels(m)
    p = conv_weight.shape[0]
    q = m.shape[1] - p
    gate = gate_weight.reshape(q).contiguous()
    if training:
        z, mean, var = kernels.gate_stats(m, gate, q, with_mb=has_bn_d)
        c_stats = torch.stack([mean[:q], var[:q]])
        d_stats = torch.stack([mean[q:], var[q:]]) if has_bn_d else mean.new_empty((2, 0))
    else:
        z = None
        c_stats = torch.stack([c_running_mean, c_running_var]).float()
        d_stats = (torch.stack([d_running_mean, d_running_var]).float() if has_bn_d
                   else c_stats.new_empty((2, 0)))
    scale_c = _vector(c_weight, 1.0, q, m) * torch.rsqrt(c_stats[1] + c_eps)
    z = kernels.gate_apply(m, gate, z, y, c_stats[0], scale_c, _vector(c_bias, 0.0, q, m))
    if has_bn_d:  # BN_d on the GEMM's input tile: (Mb - mean) * gamma * rstd + beta
        pm = d_stats[0]
        ps = _vector(d_weight, 1.0, p, m) * torch.rsqrt(d_stats[1] + d_eps)
        ph = _vector(d_bias, 0.0, p, m)
    else:
        pm, ps, ph = _identity(p, m)
    kernels.pointwise_gemm(m[:, q:], conv_weight.reshape(p, p).t(), y[:, q:], pm, ps, ph,
                           _vector(None, 1.0, p, m), _vector(conv_bias, 0.0, p, m))
    return y, z, c_stats, d_stats


@_forward.register_fake
def _forward_fake(m, gate_weight, conv_weight, conv_bias, c_weight, c_bias, c_running_mean, c_running_var,
      c_eps, d_weight, d_bias, d_running_mean, d_running_var, d_eps, has_bn_d, training):
    b, c, h, w = m.shape
    p = conv_weight.shape[0]
    f32 = torch.float32
    return (empty_activation(m, m.shape), m.new_empty((b, h * w), dtype=f32),
            m.new_empty((2, c - p), dtype=f32), m.new_empty((2, p if has_bn_d else 0), dtype=f32))


@torch.library.custom_op("patnet_triton::spatial_attention_backward", mutates_args=())
@on_tensor_device
def _backward(grad_y: Tensor, m: Tensor, z: Tensor, gate_weight: Tensor, conv_weight: Tensor,
              c_stats: Tensor, c_weight: Optional[Tensor], c_eps: float, d_stats: Tensor,
              d_weight: Optional[Tensor], d_bias: Optional[Tensor], d_eps: float,
              has_bn_d: bool, training: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_m = empty_activation(m, m.shape)
    m, grad_y = _flat_pixels(m), _flat_pixels(grad_y)
    b, c, h, w = m.shape
    p = conv_weight.shape[0]
    q = c - p
    n = float(b * h * w)
    dtype = m.dtype

    # Ma half: BN_c, the product Ma * s and the gate.
    mean_c = c_stats[0]
    rstd_c = torch.rsqrt(c_stats[1] + c_eps)
    a = _vector(c_weight, 1.0, q, m) * rstd_c
    gate = gate_weight.reshape(q).contiguous()
    if training:
        sum_dy, sum_dyx = kernels.gate_grad_reduce(m, grad_y, z, mean_c, rstd_c)
        dw, _, _ = kernels.gate_grad_apply(m, grad_y, z, gate, grad_m, mean_c, rstd_c, a,
                                           -a * sum_dy / n, -a * sum_dyx / n)
    else:
        dw, sum_dy, sum_dyx = kernels.gate_grad_apply(m, grad_y, z, gate, grad_m, mean_c,
                                                      rstd_c, a, None, None)

    # Mb half: G[o, i] = sum dYb[o] xhat_d[i] and sum dYb give every parameter gradient.
    weight = conv_weight.reshape(p, p)
    if has_bn_d:
        mean_d = d_stats[0]
        rstd_d = torch.rsqrt(d_stats[1] + d_eps)
        gamma_d, beta_d = _vector(d_weight, 1.0, p, m), _vector(d_bias, 0.0, p, m)
    else:
        mean_d, rstd_d = _vector(None, 0.0, p, m), _vector(None, 1.0, p, m)
    g, sum_dyb = kernels.pointwise_weight_grad(grad_y[:, q:], m[:, q:], mean_d, rstd_d)
    if has_bn_d:
        grad_w = g * gamma_d + sum_dyb[:, None] * beta_d
        wf = weight.float()
        grad_beta_d = wf.t() @ sum_dyb  # sum over pixels of dX = W^T dYb
        grad_gamma_d = (wf * g).sum(0)  # sum over pixels of dX * xhat_d
        ea = gamma_d * rstd_d
        if training:  # dMb = ea (dX - sum dX / N - xhat sum dX xhat / N)
            kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], *_identity(p, m), ea,
                                   -ea * grad_beta_d / n, x=m[:, q:], em=mean_d,
                                   ec=-ea * rstd_d * grad_gamma_d / n)
        else:
            kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], *_identity(p, m), ea,
                                   _vector(None, 0.0, p, m))
        grad_d = (grad_gamma_d.to(dtype), grad_beta_d.to(dtype))
    else:
        grad_w = g
        kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], *_identity(p, m),
                               _vector(None, 1.0, p, m), _vector(None, 0.0, p, m))
        grad_d = (m.new_empty((0,)), m.new_empty((0,)))
    return (grad_m, dw.to(dtype).reshape(1, q, 1, 1), grad_w.to(dtype).reshape(p, p, 1, 1),
            sum_dyb.to(dtype), sum_dyx.to(dtype), sum_dy.to(dtype)) + grad_d


def _identity(p: int, like: Tensor):
    """The prologue vectors (pm, ps, ph) of a GEMM that takes its input as it is."""
    return _vector(None, 0.0, p, like), _vector(None, 1.0, p, like), _vector(None, 0.0, p, like)


@_backward.register_fake
def _backward_fake(grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, c_eps, d_stats, d_weight,
      d_bias, d_eps, has_bn_d, training):
    p = conv_weight.shape[0]
    q = m.shape[1] - p
    pd = p if has_bn_d else 0
    return (empty_activation(m, m.shape), m.new_empty((1, q, 1, 1)), m.new_empty((p, p, 1, 1)),
            m.new_empty((p,)), m.new_empty((q,)), m.new_empty((q,)), m.new_empty((pd,)),
            m.new_empty((pd,)))



# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "spatial_attention": _forward_fake,
    "spatial_attention_backward": _backward_fake,
}


def make_functions(ops):
    """The autograd Function of PAT_sp over the ops of one backend namespace.

    ``ops`` is a ``torch.ops`` namespace with the two ops above (same schemas); returns
    SpatialAttention, whose ``apply(m, gate_weight, conv_weight, conv_bias, c_weight, c_bias,
    c_running_mean, c_running_var, d_weight, d_bias, d_running_mean, d_running_var, c_eps,
    d_eps, has_bn_d, training)`` returns (y, c_stats, d_stats), the statistics not
    differentiable.
    """

    class SpatialAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, m, gate_weight, conv_weight, conv_bias, c_weight, c_bias,
                    c_running_mean, c_running_var, d_weight, d_bias, d_running_mean,
                    d_running_var, c_eps, d_eps, has_bn_d, training):
            y, z, c_stats, d_stats = ops.spatial_attention(
                m, gate_weight, conv_weight, conv_bias, c_weight, c_bias, c_running_mean,
                c_running_var, c_eps, d_weight, d_bias, d_running_mean, d_running_var, d_eps,
                has_bn_d, training)
            ctx.save_for_backward(m, z, gate_weight, conv_weight, c_stats, c_weight, d_stats,
                                  d_weight, d_bias)
            ctx.c_eps, ctx.d_eps = c_eps, d_eps
            ctx.has_bn_d, ctx.training = has_bn_d, training
            ctx.mark_non_differentiable(c_stats, d_stats)
            return y, c_stats, d_stats

        @staticmethod
        def backward(ctx, grad_y, grad_c_stats, grad_d_stats):
            m, z, gate_weight, conv_weight, c_stats, c_weight, d_stats, d_weight, d_bias = \
                ctx.saved_tensors
            grads = ops.spatial_attention_backward(
                grad_y, m, z, gate_weight, conv_weight, c_stats, c_weight, ctx.c_eps, d_stats,
                d_weight, d_bias, ctx.d_eps, ctx.has_bn_d, ctx.training)
            gm, gg, gw, gb, gcw, gcb, gdw, gdb = grads
            needs = ctx.needs_input_grad
            wanted = (gm, gg, gw, gb, gcw, gcb, None, None, gdw, gdb, None, None)
            return tuple(g if need else None for g, need in zip(wanted, needs)) + (None,) * 4

    return SpatialAttention


SpatialAttention = make_functions(torch.ops.patnet_triton)


def _update_running(bn: BatchNormParams, stats: Tensor, n: int) -> None:
    """Running statistics as ``F.batch_norm`` updates them: momentum towards the batch mean
    and the unbiased batch variance (computed in fp32, stored in the buffers' dtype)."""
    if bn.running_mean is None and bn.running_var is None:
        return
    mom = bn.momentum
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(bn.running_mean.float() * (1.0 - mom) + stats[0] * mom)
        if bn.running_var is not None:
            unbiased = stats[1] * (n / (n - 1))
            bn.running_var.copy_(bn.running_var.float() * (1.0 - mom) + unbiased * mom)


_NO_BN = BatchNormParams(None, None, None, None, 0.0, 0.0)


def spatial_attention(m: Tensor, gate_weight: Tensor, conv_weight: Tensor,
                      conv_bias: Optional[Tensor], bn_c: BatchNormParams,
                      bn_d: Optional[BatchNormParams], training: bool) -> Tensor:
    """The Triton backend of :func:`patnet_kernels.spatial_attention` (inputs already checked).

    Refuses float64 (the kernels compute in fp32; use backend='torch') and, in training, a
    batch with one value per channel (B * H * W = 1), with F.batch_norm's error, before
    anything is computed or written.
    """
    if m.dtype not in FLOAT_DTYPES:
        raise TypeError(f"backend='triton' runs float32, float16 and bfloat16, got {m.dtype}; "
                        "use backend='torch' for it")
    b, c, h, w = m.shape
    n = b * h * w
    if training and n == 1:
        q = c - conv_weight.shape[0]
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {torch.Size((b, q, h, w))}")
    has_bn_d = bn_d is not None
    d = bn_d if has_bn_d else _NO_BN
    y, c_stats, d_stats = SpatialAttention.apply(
        m, gate_weight, conv_weight, conv_bias, bn_c.weight, bn_c.bias, bn_c.running_mean,
        bn_c.running_var, d.weight, d.bias, d.running_mean, d.running_var, float(bn_c.eps),
        float(d.eps), has_bn_d, training)
    if training:
        _update_running(bn_c, c_stats, n)
        if has_bn_d:
            _update_running(d, d_stats, n)
    return y
