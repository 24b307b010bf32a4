"""The MLP's ops in the Triton backend (``patnet_triton``): bodies that launch the kernel of
:mod:`patnet_kernels.triton.pointwise_mlp`; the fake of ``pointwise_mlp`` in
:mod:`..pointwise_mlp`. Triton's own, ``pointwise_mlp_stats(..., stats_first) -> (y, mean,
m2)``: the same with the statistics of y[:, stats_first:] per tile of pixels, each (B, T,
C_OUT - stats_first) fp32 (T from :func:`patnet_kernels.triton.pointwise_mlp.stats_chunks`;
what the next PAT_ch block's gate reads, see :mod:`..partial_block`); and
``pointwise_mlp_spatial(..., stats_first, gate_weight, sp_conv_weight, sp_conv_bias, bn_c...,
bn_d...) -> (y, mean, m2)``: that with PAT_sp in eval on the MLP's output before the residual
(PATNet-T1's blocks; BN_d's tensors all None where it is folded into the conv; stats_first < 0:
no statistics, both (B, 0, 0))."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...triton import pointwise_mlp as kernels
from ...triton._common import on_tensor_device
from ...triton.partial_conv import forward_taps
from .. import custom_op, register_fakes, pointwise_mlp as spec
from .._layout import empty_activation, with_pixel_stride
from . import fp32_affine

Tensor = torch.Tensor


def _matrix(weight: Tensor) -> Tensor:
    """A (out, in, 1, 1) conv weight as the contiguous (out, in) matrix the kernel reads."""
    return weight.reshape(weight.shape[0], weight.shape[1]).contiguous()


def _run(x: Tensor, conv_weight: Optional[Tensor], scale: Optional[Tensor],
         shift: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
         b2: Optional[Tensor], residual: Optional[Tensor], activation: str,
         statistics: Optional[Tuple[Tensor, Tensor]] = None, stats_first: int = 0,
         spatial: Optional[kernels.SpatialAttention] = None) -> Tensor:
    x = with_pixel_stride(x)
    y = empty_activation(x, spec.output_shape(x, w2))

    def optional(t, make):
        return None if t is None else make(t)

    return kernels.pointwise_mlp(
        x, _matrix(w1), b1, _matrix(w2), b2, optional(residual, with_pixel_stride), activation,
        y, conv_taps=optional(conv_weight, forward_taps), scale=optional(scale, Tensor.contiguous),
        shift=optional(shift, Tensor.contiguous), statistics=statistics, stats_first=stats_first,
        spatial=spatial)


@custom_op("patnet_triton::pointwise_mlp", mutates_args=())
@on_tensor_device
def _forward(x: Tensor, conv_weight: Optional[Tensor], scale: Optional[Tensor],
             shift: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
             b2: Optional[Tensor], residual: Optional[Tensor], activation: str) -> Tensor:
    return _run(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation)


def _stats_shape(x: Tensor, conv_weight: Optional[Tensor], w1: Tensor, w2: Tensor,
                 residual: Optional[Tensor], stats_first: int, spatial_half: int = 0):
    conv_channels = 0 if conv_weight is None else conv_weight.shape[0]
    return (x.shape[0], kernels.stats_chunks(x, w1, w2, conv_channels, spatial_half,
                                             residual=residual), w2.shape[0] - stats_first)


@custom_op("patnet_triton::pointwise_mlp_stats", mutates_args=())
@on_tensor_device
def _forward_stats(x: Tensor, conv_weight: Optional[Tensor], scale: Optional[Tensor],
                   shift: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor], residual: Optional[Tensor], activation: str,
                   stats_first: int) -> Tuple[Tensor, Tensor, Tensor]:
    shape = _stats_shape(x, conv_weight, w1, w2, residual, stats_first)
    mean = torch.empty(shape, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    y = _run(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation, (mean, m2),
             stats_first)
    return y, mean, m2


@_forward_stats.register_fake
def _forward_stats_fake(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation,
                        stats_first):
    shape = _stats_shape(x, conv_weight, w1, w2, residual, stats_first)
    return (empty_activation(x, spec.output_shape(x, w2)),
            x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32))


@custom_op("patnet_triton::pointwise_mlp_spatial", mutates_args=())
@on_tensor_device
def _forward_spatial(x: Tensor, conv_weight: Optional[Tensor], scale: Optional[Tensor],
                     shift: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                     b2: Optional[Tensor], residual: Optional[Tensor], activation: str,
                     stats_first: int, gate_weight: Tensor, sp_conv_weight: Tensor,
                     sp_conv_bias: Optional[Tensor], c_weight: Optional[Tensor],
                     c_bias: Optional[Tensor], c_running_mean: Tensor, c_running_var: Tensor,
                     c_eps: float, d_weight: Optional[Tensor], d_bias: Optional[Tensor],
                     d_running_mean: Optional[Tensor], d_running_var: Optional[Tensor],
                     d_eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    p = sp_conv_weight.shape[0]
    q = w2.shape[0] - p
    shape = _spatial_stats_shape(x, conv_weight, w1, w2, residual, stats_first, max(q, p))
    mean = torch.empty(shape, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)

    def bn(running_mean, running_var, weight, bias, n):  # (what the kernel reads: fp32)
        return (running_mean.float(), running_var.float()) + fp32_affine(weight, bias, n, x)

    spatial = kernels.SpatialAttention(
        gate_weight.reshape(q).contiguous(), sp_conv_weight.reshape(p, p).contiguous(),
        sp_conv_bias, bn(c_running_mean, c_running_var, c_weight, c_bias, q), c_eps,
        None if d_running_mean is None else bn(d_running_mean, d_running_var, d_weight, d_bias,
                                                p), d_eps)
    y = _run(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation,
             (mean, m2) if stats_first >= 0 else None, max(stats_first, 0), spatial)
    return y, mean, m2


def _spatial_stats_shape(x, conv_weight, w1, w2, residual, stats_first: int,
                         spatial_half: int):
    """The statistics' shape of ``pointwise_mlp_spatial``: (B, 0, 0) without (stats_first <
    0)."""
    if stats_first < 0:
        return (x.shape[0], 0, 0)
    return _stats_shape(x, conv_weight, w1, w2, residual, stats_first, spatial_half)


@_forward_spatial.register_fake
def _forward_spatial_fake(x, conv_weight, scale, shift, w1, b1, w2, b2, residual, activation,
                          stats_first, gate_weight, sp_conv_weight, *_):
    p = sp_conv_weight.shape[0]
    shape = _spatial_stats_shape(x, conv_weight, w1, w2, residual, stats_first,
                                 max(w2.shape[0] - p, p))
    return (empty_activation(x, spec.output_shape(x, w2)),
            x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32))


register_fakes("patnet_triton", spec.FAKES)
