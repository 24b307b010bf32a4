"""PAT_sp's ops in the Triton backend (``patnet_triton``): bodies that launch the kernels of
:mod:`patnet_kernels.triton.spatial_attention`; fakes and autograd in
:mod:`..spatial_attention`."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..._types import outside_inference_mode
from ...triton import spatial_attention as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, spatial_attention as spec
from . import fp32_affine, fp32_vector
from .._layout import empty_activation, with_pixel_stride

Tensor = torch.Tensor


@custom_op("patnet_triton::spatial_attention", mutates_args=())
@on_tensor_device
def _forward(m: Tensor, gate_weight: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
             c_weight: Optional[Tensor], c_bias: Optional[Tensor],
             c_running_mean: Optional[Tensor], c_running_var: Optional[Tensor], c_eps: float,
             d_weight: Optional[Tensor], d_bias: Optional[Tensor],
             d_running_mean: Optional[Tensor], d_running_var: Optional[Tensor], d_eps: float,
             has_bn_d: bool, training: bool, residual: Optional[Tensor], stats_first: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y = empty_activation(m, m.shape)
    m = with_pixel_stride(m)
    p = conv_weight.shape[0]
    q = m.shape[1] - p
    gate = gate_weight.reshape(q).contiguous()
    if training:
        z, mean, var = kernels.gate_stats(m, gate, q, with_mb=has_bn_d)
        c_moments, d_moments = (mean[:q], var[:q]), (mean[q:], var[q:])
        c_stats = torch.stack(c_moments)
        d_stats = torch.stack(d_moments) if has_bn_d else mean.new_empty((2, 0))
    else:  # (the backward takes the running statistics from the autograd Function)
        z = None
        c_moments = (c_running_mean.float(), c_running_var.float())
        d_moments = (d_running_mean.float(), d_running_var.float()) if has_bn_d else None
        c_stats, d_stats = (m.new_empty((2, 0), dtype=torch.float32) for _ in range(2))
    bn_c = c_moments + fp32_affine(c_weight, c_bias, q, m)
    bn_d = d_moments + fp32_affine(d_weight, d_bias, p, m) if has_bn_d else None
    mean, m2 = spec.statistics_buffers(m, stats_first,
                                       kernels.statistics_chunks(m.shape[2] * m.shape[3]))
    z = kernels.apply(m, gate, z, conv_weight.reshape(p, p), conv_bias, y, bn_c, c_eps, bn_d,
                      d_eps, None if residual is None else with_pixel_stride(residual),
                      (mean, m2) if stats_first >= 0 else None, stats_first)
    return y, z, c_stats, d_stats, mean, m2


@_forward.register_fake
def _forward_fake(m, gate_weight, conv_weight, conv_bias, c_weight, c_bias, c_running_mean,
                  c_running_var, c_eps, d_weight, d_bias, d_running_mean, d_running_var, d_eps,
                  has_bn_d, training, residual, stats_first):
    chunks = kernels.statistics_chunks(m.shape[2] * m.shape[3])
    return spec.forward_fake(m, conv_weight, has_bn_d, training, stats_first, chunks)


@custom_op("patnet_triton::spatial_attention_backward", mutates_args=())
@on_tensor_device
def _backward(grad_y: Tensor, m: Tensor, z: Tensor, gate_weight: Tensor, conv_weight: Tensor,
              c_stats: Tensor, c_weight: Optional[Tensor], c_eps: float, d_stats: Tensor,
              d_weight: Optional[Tensor], d_bias: Optional[Tensor], d_eps: float,
              has_bn_d: bool, training: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_m = empty_activation(m, m.shape)
    m, grad_y = with_pixel_stride(m), with_pixel_stride(grad_y)
    b, c, h, w = m.shape
    p = conv_weight.shape[0]
    q = c - p
    n = float(b * h * w)

    # Ma half: BN_c, the product Ma * s and the gate.
    mean_c = c_stats[0]
    rstd_c = torch.rsqrt(c_stats[1] + c_eps)
    a = fp32_vector(c_weight, 1.0, q, m) * rstd_c
    gate = gate_weight.reshape(q).contiguous()
    if training:
        sum_dy, sum_dyx = kernels.gate_grad_reduce(m, grad_y, z, mean_c, rstd_c)
        k = torch.stack([sum_dy, sum_dyx]) * (a * (-1.0 / n))  # -a sum dY / N, -a sum dY xhat / N
        dw, _, _ = kernels.gate_grad_apply(m, grad_y, z, gate, grad_m, mean_c, rstd_c, a, k[0],
                                           k[1])
    else:
        dw, sum_dy, sum_dyx = kernels.gate_grad_apply(m, grad_y, z, gate, grad_m, mean_c,
                                                      rstd_c, a, None, None)

    # Mb half: G[o, i] = sum dYb[o] xhat_d[i] and sum dYb give every parameter gradient.
    weight = conv_weight.reshape(p, p)
    zeros, ones = _identity(p, m.device)
    if has_bn_d:
        mean_d = d_stats[0]
        rstd_d = torch.rsqrt(d_stats[1] + d_eps)
        gamma_d, beta_d = fp32_affine(d_weight, d_bias, p, m)
    else:
        mean_d, rstd_d = zeros, ones
    g, sum_dyb = kernels.pointwise_weight_grad(grad_y[:, q:], m[:, q:], mean_d, rstd_d,
                                               partials=has_bn_d)
    if has_bn_d:  # dW, the bias's and BN_d's gradients, and dMb's epilogue: one launch
        grad_w, sum_dyb, grad_gamma_d, grad_beta_d, ea, eb, ec = kernels.conv_grad_finish(
            g, sum_dyb, weight, gamma_d, beta_d, rstd_d, b * h * w, training)
        if training:  # dMb = ea (dX - sum dX / N - xhat sum dX xhat / N), dX = W^T dYb
            kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], zeros, ones, zeros, ea,
                                   eb, x=m[:, q:], em=mean_d, ec=ec)
        else:
            kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], zeros, ones, zeros, ea,
                                   eb)
        grad_d = (grad_gamma_d, grad_beta_d)
    else:
        grad_w = g
        kernels.pointwise_gemm(grad_y[:, q:], weight, grad_m[:, q:], zeros, ones, zeros, ones,
                               zeros)
        grad_d = tuple(m.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return (grad_m, dw.reshape(1, q, 1, 1), grad_w.reshape(p, p, 1, 1), sum_dyb, sum_dyx,
            sum_dy) + grad_d


@functools.lru_cache(maxsize=None)
def _identity(p: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(zeros, ones), fp32 (p,) on ``device``, made once per width and device (only ever
    read): the prologue vectors (pm, ps, ph) = (zeros, ones, zeros) of a GEMM that takes its
    input as it is, and an epilogue's plain scale and shift."""
    with outside_inference_mode():  # (kept for later calls)
        return (torch.zeros((p,), dtype=torch.float32, device=device),
                torch.ones((p,), dtype=torch.float32, device=device))


register_fakes("patnet_triton", spec.FAKES)
