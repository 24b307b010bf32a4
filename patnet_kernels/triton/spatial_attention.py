"""Triton kernels of PAT_sp, the partial spatial attention (SPEC.md section 3).

Y = [BN_c(Ma * s) | conv1x1(BN_d(Mb)) + bias], s = hsig(w . Ma) per pixel, Ma = M[:, :Q],
Mb = M[:, Q:]. Activations may be NCHW, channels_last or a channel slice of either: every kernel
takes each tensor's batch, channel and *pixel* stride, where pixel p = h * W + w (a tensor whose
(h, w) do not flatten to one stride, as after a crop of H or W, is copied first by the op). All
arithmetic is fp32: loads are upcast, stores cast to the output's dtype; tl.dot operands are in
the input dtype on a GPU for fp16/bf16 (fp32 accumulate), fp32 otherwise.

Kernels (program = one pixel tile of one sample unless said otherwise):

* :func:`gate_stats` (training forward) -- z = w . Ma per pixel (stored, fp32) and, per tile,
  the mean and centred sum of squares of U = Ma * hsig(z) (channels [0, Q)) and of Mb (channels
  [Q, C), when BN_d has batch statistics). The tiles are combined with Chan's formula in a fixed
  order (deterministic, no atomics).
* :func:`apply` -- the forward's output in one launch: the programs of each pixel tile write
  either Ya = (Ma * s - mean) * gamma * rstd + beta into y[:, :Q] (in eval computing z first:
  one kernel for the whole eval forward) or a block of Yb = conv1x1(BN_d(Mb)) + bias into
  y[:, Q:] (BN_d applied to the GEMM's input tile as it is loaded), either with an optional
  residual added.
* :func:`pointwise_gemm` (backward) -- out[p, n] = sum_k A'[p, k] W[k, n], A' = (A - pm) * ps +
  ph per input channel, epilogue acc * ea + eb (+ (X - em) * ec): the input gradient of the
  conv through BN_d (its batch-statistics terms in the epilogue) written straight into
  grad_m[:, Q:].
* :func:`pointwise_weight_grad` -- G[o, i] = sum dYb[o] * xhat_d[i] and sum dYb[o] over (b, h,
  w), as per-split fp32 partials summed in a fixed order; dW, d_bias and BN_d's parameter and
  reduction terms all follow from G and the sum: :func:`conv_grad_finish` (one program per
  block of input channels) sums the partials and writes them all, and the dMb GEMM's epilogue
  vectors.
* :func:`gate_grad_reduce` (training) -- per channel sums of dYa and dYa * xhat_c (BN_c).
* :func:`gate_grad_apply` -- dU (BN_c backward), dMa = dU * s + hsig'(z) (dU . Ma) w into
  grad_m[:, :Q], and per-tile partials of dw (and, in eval, of BN_c's two sums).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      batch_norm_tile, block, cdiv, dot, hardsigmoid, hardsigmoid_grad,
                      pixel_strides, program_of_sample, reduction_splits, store_tile_moments,
                      upcast_dot)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gate_logits(m_pix, m_sc, g_ptr, p_ok, Q, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = w . Ma for a tile of pixels, fp32 (BLOCK_P,): ``m_pix`` (BLOCK_P, 1) pointers to
    channel 0 of each pixel of M (channel stride ``m_sc``), the gate weight w (Q,) at g_ptr."""
    z = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, Q, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < Q
        x = tl.load(m_pix + offs_c[None, :] * m_sc, mask=p_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        wv = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        z += tl.sum(x * wv[None, :], axis=1)
    return z


@triton.jit
def _gate_stats_kernel(
    m_ptr,  # (B, C, H, W) M, any strides with flattenable pixels; Ma = channels [0, Q)
    g_ptr,  # (Q,) gate weight w, M's dtype, contiguous
    z_ptr,  # (B, H * W) fp32 contiguous, out: z = w . Ma per pixel
    mean_ptr,  # (B * TILES, CS) fp32 contiguous, out: per (sample, tile) channel means
    m2_ptr,  # (B * TILES, CS) fp32 contiguous, out: per (sample, tile) centred sums of squares
    Q, CS, HW, TILES,  # gated channels; channels with statistics (Q, or C with Mb); H * W; tiles
    m_sb, m_sc, m_sp,  # strides of M: batch, channel, pixel (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per step
):
    # grid: (TILES * B,), a sample's tiles in turn. Statistics of U = Ma * hsig(z) for channels
    # [0, Q), of Mb for [Q, CS).
    pid_t, pid_b = program_of_sample(TILES)
    offs_p = pid_t * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    m_pix = m_ptr + pid_b * m_sb + offs_p[:, None] * m_sp
    z = _gate_logits(m_pix, m_sc, g_ptr, p_ok, Q, BLOCK_P, BLOCK_C)
    tl.store(z_ptr + pid_b * HW + offs_p, z, mask=p_ok)
    s = hardsigmoid(z)
    count = tl.minimum(HW - pid_t * BLOCK_P, BLOCK_P).to(tl.float32)
    row = pid_b * TILES + pid_t
    for c0 in range(0, CS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < CS
        ok = p_ok[:, None] & c_ok[None, :]
        x = tl.load(m_pix + offs_c[None, :] * m_sc, mask=ok, other=0.0).to(tl.float32)
        u = tl.where((offs_c < Q)[None, :], x * s[:, None], x)  # 0 outside the tile
        mean = tl.sum(u, axis=0) / count
        d = tl.where(ok, u - mean[None, :], 0.0)
        tl.store(mean_ptr + row * CS + offs_c, mean, mask=c_ok)
        tl.store(m2_ptr + row * CS + offs_c, tl.sum(d * d, axis=0), mask=c_ok)


@triton.jit
def _apply_kernel(
    m_ptr,  # (B, C, H, W) M, any strides with flattenable pixels
    g_ptr,  # (Q,) gate weight w, M's dtype, contiguous (read only if COMPUTE_Z)
    z_ptr,  # (B, H * W) fp32 contiguous: z = w . Ma, written if COMPUTE_Z, else read
    w_ptr,  # (P, P) conv weight [out, in], M's dtype, any strides (w_so, w_si)
    bias_ptr,  # (P,) conv bias, M's dtype (read only if HAS_BIAS)
    cm_ptr, cv_ptr,  # (Q,) fp32 each: BN_c mean and variance (the batch's or the running)
    cw_ptr, cb_ptr,  # (Q,) fp32 each: BN_c weight and bias
    dm_ptr, dv_ptr,  # (P,) fp32 each: BN_d mean and variance (read only if HAS_BN_D)
    dw_ptr, db_ptr,  # (P,) fp32 each: BN_d weight and bias (read only if HAS_BN_D)
    r_ptr,  # (B, C, H, W) residual, any strides with flattenable pixels (read if RESIDUAL)
    y_ptr,  # (B, C, H, W) output Y, any strides with flattenable pixels
    mean_ptr, m2_ptr,  # (B, TILES, C - STATS_FIRST) fp32 contiguous, written if STATS: per
                       # pixel tile the mean and sum of squared deviations of Y[:, STATS_FIRST:]
    c_eps, d_eps,  # the BatchNorms' eps (fp32)
    Q, P, HW,  # gated channels Q; conv channels P = C - Q; pixels H * W
    STATS_FIRST,  # the first channel of Y whose statistics are taken (if STATS)
    m_sb, m_sc, m_sp,  # strides of M (elements)
    r_sb, r_sc, r_sp,  # strides of the residual (elements)
    y_sb, y_sc, y_sp,  # strides of Y (elements)
    w_so, w_si,  # strides of the conv weight (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # gate half: channels per step
    BLOCK_K: tl.constexpr,  # conv half: input channels per tl.dot
    BLOCK_N: tl.constexpr,  # conv half: output channels per program
    COMPUTE_Z: tl.constexpr,  # compute z here (eval) instead of loading it (training)
    HAS_BN_D: tl.constexpr,  # BN_d on the conv's input tile as it is loaded (else folded)
    HAS_BIAS: tl.constexpr,  # the conv has a bias
    RESIDUAL: tl.constexpr,  # add the residual to Y
    STATS: tl.constexpr,  # write the statistics of Y's channels [STATS_FIRST, C) per tile
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (TILES * B, 1, 1 + cdiv(P, BLOCK_N)), a sample's tiles in turn (TILES = cdiv(HW,
    # BLOCK_P)). Program 0 of axis 2 writes Y[:, :Q] =
    # BN_c(Ma * hsig(z)); program n > 0 writes the output channels Q + (n - 1) * BLOCK_N ... of
    # Y[:, Q:] = conv1x1(BN_d(Mb)) + bias. Each adds the residual where there is one, and
    # takes the statistics of what it stored (for a following PAT_ch block's gate).
    pid_t, pid_b = program_of_sample(tl.cdiv(HW, BLOCK_P))
    stats_row = tl.program_id(0).to(tl.int64)  # (pid_b * TILES + pid_t)
    pid_n = tl.program_id(2)
    offs_p = pid_t * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    m_pix = m_ptr + pid_b * m_sb + offs_p[:, None] * m_sp
    r_pix = r_ptr + pid_b * r_sb + offs_p[:, None] * r_sp
    y_pix = y_ptr + pid_b * y_sb + offs_p[:, None] * y_sp
    if pid_n == 0:
        if COMPUTE_Z:
            z = _gate_logits(m_pix, m_sc, g_ptr, p_ok, Q, BLOCK_P, BLOCK_C)
            tl.store(z_ptr + pid_b * HW + offs_p, z, mask=p_ok)
        else:
            z = tl.load(z_ptr + pid_b * HW + offs_p, mask=p_ok, other=0.0)
        s = hardsigmoid(z)
        for c0 in range(0, Q, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < Q
            ok = p_ok[:, None] & c_ok[None, :]
            x = tl.load(m_pix + offs_c[None, :] * m_sc, mask=ok, other=0.0).to(tl.float32)
            y = batch_norm_tile(x * s[:, None], offs_c, c_ok, cm_ptr, cv_ptr, cw_ptr, cb_ptr,
                                c_eps)
            if RESIDUAL:
                y += tl.load(r_pix + offs_c[None, :] * r_sc, mask=ok, other=0.0).to(tl.float32)
            out = y.to(y_ptr.dtype.element_ty)
            tl.store(y_pix + offs_c[None, :] * y_sc, out, mask=ok)
            if STATS:
                store_tile_moments(out.to(tl.float32), p_ok, offs_c, c_ok, mean_ptr, m2_ptr,
                                   stats_row, STATS_FIRST, Q + P)
    else:
        offs_n = (pid_n - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, P, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < P
            a = tl.load(m_pix + (Q + offs_k[None, :]) * m_sc, mask=p_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if HAS_BN_D:  # 0 for k >= P (the weight tile's rows there are 0 too)
                a = batch_norm_tile(a.to(tl.float32), offs_k, k_ok, dm_ptr, dv_ptr, dw_ptr,
                                    db_ptr, d_eps).to(m_ptr.dtype.element_ty)
            wt = tl.load(w_ptr + offs_k[:, None] * w_si + offs_n[None, :] * w_so,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot(a, wt, acc, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ok = p_ok[:, None] & n_ok[None, :]
        out_c = Q + offs_n[None, :]
        if RESIDUAL:
            acc += tl.load(r_pix + out_c * r_sc, mask=ok, other=0.0).to(tl.float32)
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_pix + out_c * y_sc, out, mask=ok)
        if STATS:
            store_tile_moments(out.to(tl.float32), p_ok, Q + offs_n, n_ok, mean_ptr, m2_ptr,
                               stats_row, STATS_FIRST, Q + P)


@triton.jit
def _gate_grad_reduce_kernel(
    m_ptr,  # (B, C, H, W) M, any strides with flattenable pixels; channels [0, Q) read
    gy_ptr,  # (B, C, H, W) dY, any strides with flattenable pixels; channels [0, Q) read
    z_ptr,  # (B, H * W) fp32 contiguous: z saved by the forward
    mean_ptr,  # (Q,) fp32: BN_c batch mean
    rstd_ptr,  # (Q,) fp32: BN_c 1 / sqrt(var + eps)
    sdy_ptr,  # (B * TILES, Q) fp32 contiguous, out: per-tile sums of dYa
    sdyx_ptr,  # (B * TILES, Q) fp32 contiguous, out: per-tile sums of dYa * xhat_c
    Q, HW, TILES,
    m_sb, m_sc, m_sp,  # strides of M (elements)
    g_sb, g_sc, g_sp,  # strides of dY (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per step
):
    # grid: (TILES * B,), a sample's tiles in turn
    pid_t, pid_b = program_of_sample(TILES)
    offs_p = pid_t * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    s = hardsigmoid(tl.load(z_ptr + pid_b * HW + offs_p, mask=p_ok, other=0.0))
    m_pix = m_ptr + pid_b * m_sb + offs_p[:, None] * m_sp
    g_pix = gy_ptr + pid_b * g_sb + offs_p[:, None] * g_sp
    row = pid_b * TILES + pid_t
    for c0 in range(0, Q, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < Q
        ok = p_ok[:, None] & c_ok[None, :]
        x = tl.load(m_pix + offs_c[None, :] * m_sc, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(g_pix + offs_c[None, :] * g_sc, mask=ok, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
        rs = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
        xhat = (x * s[:, None] - mu[None, :]) * rs[None, :]
        tl.store(sdy_ptr + row * Q + offs_c, tl.sum(dy, axis=0), mask=c_ok)
        tl.store(sdyx_ptr + row * Q + offs_c, tl.sum(dy * xhat, axis=0), mask=c_ok)


@triton.jit
def _gate_grad_block(m_pix, g_pix, m_sc, g_sc, mean_ptr, rstd_ptr, a_ptr, k1_ptr, k2_ptr, s,
                     offs_c, c_ok, ok, TRAIN: tl.constexpr):
    """Load one (pixels x channels) block of Ma and dYa and return (Ma, dYa, xhat, dU) in fp32:
    xhat the BN_c-normalised Ma * s, dU the gradient at U = Ma * s: a * dY (eval) or
    a * dY + k1 + xhat * k2 (training)."""
    x = tl.load(m_pix + offs_c[None, :] * m_sc, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(g_pix + offs_c[None, :] * g_sc, mask=ok, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    rs = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
    a = tl.load(a_ptr + offs_c, mask=c_ok, other=0.0)
    xhat = (x * s[:, None] - mu[None, :]) * rs[None, :]
    du = a[None, :] * dy
    if TRAIN:
        k1 = tl.load(k1_ptr + offs_c, mask=c_ok, other=0.0)
        k2 = tl.load(k2_ptr + offs_c, mask=c_ok, other=0.0)
        du = du + k1[None, :] + xhat * k2[None, :]
    return x, dy, xhat, du


@triton.jit
def _gate_grad_apply_kernel(
    m_ptr,  # (B, C, H, W) M, any strides with flattenable pixels; channels [0, Q) read
    gy_ptr,  # (B, C, H, W) dY, any strides with flattenable pixels; channels [0, Q) read
    z_ptr,  # (B, H * W) fp32 contiguous: z saved by the forward
    g_ptr,  # (Q,) gate weight w, M's dtype, contiguous
    gm_ptr,  # (B, C, H, W) dM, any strides with flattenable pixels; channels [0, Q) written
    mean_ptr,  # (Q,) fp32: BN_c mean (batch or running)
    rstd_ptr,  # (Q,) fp32: BN_c 1 / sqrt(var + eps)
    a_ptr,  # (Q,) fp32: gamma_c * rstd_c
    k1_ptr,  # (Q,) fp32: -a * sum(dYa) / N (read if TRAIN)
    k2_ptr,  # (Q,) fp32: -a * sum(dYa * xhat) / N (read if TRAIN)
    dw_ptr,  # (B * TILES, Q) fp32 contiguous, out: per-tile partial dw
    sdy_ptr,  # (B * TILES, Q) fp32 contiguous, out unless TRAIN: per-tile sums of dYa
    sdyx_ptr,  # (B * TILES, Q) fp32 contiguous, out unless TRAIN: sums of dYa * xhat_c
    Q, HW, TILES,
    m_sb, m_sc, m_sp,  # strides of M (elements)
    g_sb, g_sc, g_sp,  # strides of dY (elements)
    o_sb, o_sc, o_sp,  # strides of dM (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per step
    TRAIN: tl.constexpr,  # BN_c used batch statistics (else running ones: dU = a * dY)
):
    # grid: (TILES * B,), a sample's tiles in turn. dMa = dU * s + hsig'(z) * (dU . Ma) * w;
    # dw = sum hsig'(z) (dU . Ma) Ma.
    pid_t, pid_b = program_of_sample(TILES)
    offs_p = pid_t * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    z = tl.load(z_ptr + pid_b * HW + offs_p, mask=p_ok, other=0.0)
    s = hardsigmoid(z)
    m_pix = m_ptr + pid_b * m_sb + offs_p[:, None] * m_sp
    g_pix = gy_ptr + pid_b * g_sb + offs_p[:, None] * g_sp
    o_pix = gm_ptr + pid_b * o_sb + offs_p[:, None] * o_sp
    row = pid_b * TILES + pid_t
    r = tl.zeros((BLOCK_P,), dtype=tl.float32)  # dU . Ma per pixel
    for c0 in range(0, Q, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < Q
        ok = p_ok[:, None] & c_ok[None, :]
        x, dy, xhat, du = _gate_grad_block(m_pix, g_pix, m_sc, g_sc, mean_ptr, rstd_ptr, a_ptr,
                                           k1_ptr, k2_ptr, s, offs_c, c_ok, ok, TRAIN)
        if not TRAIN:
            tl.store(sdy_ptr + row * Q + offs_c, tl.sum(dy, axis=0), mask=c_ok)
            tl.store(sdyx_ptr + row * Q + offs_c, tl.sum(dy * xhat, axis=0), mask=c_ok)
        r += tl.sum(du * x, axis=1)  # x is 0 outside the tile
    gp = hardsigmoid_grad(z) * r
    for c0 in range(0, Q, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < Q
        ok = p_ok[:, None] & c_ok[None, :]
        x, dy, xhat, du = _gate_grad_block(m_pix, g_pix, m_sc, g_sc, mean_ptr, rstd_ptr, a_ptr,
                                           k1_ptr, k2_ptr, s, offs_c, c_ok, ok, TRAIN)
        wv = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        dma = du * s[:, None] + gp[:, None] * wv[None, :]
        tl.store(o_pix + offs_c[None, :] * o_sc, dma.to(gm_ptr.dtype.element_ty), mask=ok)
        tl.store(dw_ptr + row * Q + offs_c, tl.sum(gp[:, None] * x, axis=0), mask=c_ok)


@triton.jit
def _pointwise_gemm_kernel(
    a_ptr,  # (B, K, H, W) input A, any strides with flattenable pixels (a channel slice of M/dY)
    w_ptr,  # (K, N) weight, A's dtype, any strides (w_sk, w_sn)
    out_ptr,  # (B, N, H, W) output, any strides with flattenable pixels (a slice of Y / dM)
    x_ptr,  # (B, N, H, W) epilogue input X (read only if EPI_X), any flattenable strides
    pm_ptr, ps_ptr, ph_ptr,  # (K,) fp32 each: prologue A' = (A - pm) * ps + ph
    ea_ptr, eb_ptr,  # (N,) fp32 each: epilogue acc * ea + eb
    em_ptr, ec_ptr,  # (N,) fp32 each: epilogue term (X - em) * ec (read only if EPI_X)
    K, N, HW,
    a_sb, a_sc, a_sp,  # strides of A (elements)
    w_sk, w_sn,  # strides of the weight (elements)
    o_sb, o_sc, o_sp,  # strides of the output (elements)
    x_sb, x_sc, x_sp,  # strides of X (elements)
    BLOCK_P: tl.constexpr,  # pixels per program (GEMM rows)
    BLOCK_K: tl.constexpr,  # reduction channels per tl.dot
    BLOCK_N: tl.constexpr,  # output channels per program
    EPI_X: tl.constexpr,  # add (X - em) * ec in the epilogue
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (TILES * B, 1, cdiv(N, BLOCK_N)), a sample's tiles in turn (TILES = cdiv(HW,
    # BLOCK_P)). out[p, n] = sum_k A'[p, k] W[k, n] * ea[n] + eb[n] ...
    pid_p, pid_b = program_of_sample(tl.cdiv(HW, BLOCK_P))
    pid_n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    a_pix = a_ptr + pid_b * a_sb + offs_p[:, None] * a_sp
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        av = tl.load(a_pix + offs_k[None, :] * a_sc, mask=p_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        pm = tl.load(pm_ptr + offs_k, mask=k_ok, other=0.0)
        ps = tl.load(ps_ptr + offs_k, mask=k_ok, other=0.0)
        ph = tl.load(ph_ptr + offs_k, mask=k_ok, other=0.0)
        av = (av - pm[None, :]) * ps[None, :] + ph[None, :]  # 0 for k >= K
        wt = tl.load(w_ptr + offs_k[:, None] * w_sk + offs_n[None, :] * w_sn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(av, wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(av.to(w_ptr.dtype.element_ty), wt, acc)
    ea = tl.load(ea_ptr + offs_n, mask=n_ok, other=0.0)
    eb = tl.load(eb_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc * ea[None, :] + eb[None, :]
    ok = p_ok[:, None] & n_ok[None, :]
    if EPI_X:
        xv = tl.load(x_ptr + pid_b * x_sb + offs_p[:, None] * x_sp + offs_n[None, :] * x_sc,
                     mask=ok, other=0.0).to(tl.float32)
        em = tl.load(em_ptr + offs_n, mask=n_ok, other=0.0)
        ec = tl.load(ec_ptr + offs_n, mask=n_ok, other=0.0)
        out += (xv - em[None, :]) * ec[None, :]
    tl.store(out_ptr + pid_b * o_sb + offs_p[:, None] * o_sp + offs_n[None, :] * o_sc,
             out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pointwise_weight_grad_kernel(
    gy_ptr,  # (B, N, H, W) dYb, any strides with flattenable pixels (a channel slice of dY)
    x_ptr,  # (B, K, H, W) conv input before BN_d (Mb), any flattenable strides
    pm_ptr, ps_ptr,  # (K,) fp32 each: xhat = (X - pm) * ps
    g_ptr,  # (SPLITS, N, K) fp32 contiguous, out: partial sums of dYb[o] * xhat[i]
    bsum_ptr,  # (SPLITS, N) fp32 contiguous, out: partial sums of dYb[o]
    B, N, K, HW, TILES,
    g_sb, g_sc, g_sp,  # strides of dYb (elements)
    x_sb, x_sc, x_sp,  # strides of X (elements)
    BLOCK_P: tl.constexpr,  # pixels per step (the reduction)
    BLOCK_O: tl.constexpr,  # output channels (rows of G) per program
    BLOCK_I: tl.constexpr,  # input channels (columns of G) per program
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (SPLITS, cdiv(N, BLOCK_O), cdiv(K, BLOCK_I)). Split s sums the work items
    # (sample, pixel tile) s, s + SPLITS, ... in order.
    pid_s = tl.program_id(0)
    splits = tl.num_programs(0)
    pid_o = tl.program_id(1)
    pid_i = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = offs_o < N
    i_ok = offs_i < K
    pm = tl.load(pm_ptr + offs_i, mask=i_ok, other=0.0)
    ps = tl.load(ps_ptr + offs_i, mask=i_ok, other=0.0)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for item in range(pid_s, B * TILES, splits):
        b = (item // TILES).to(tl.int64)
        offs_p = (item % TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < HW
        g = tl.load(gy_ptr + b * g_sb + offs_o[:, None] * g_sc + offs_p[None, :] * g_sp,
                    mask=o_ok[:, None] & p_ok[None, :], other=0.0)  # (O, P)
        ok = p_ok[:, None] & i_ok[None, :]
        xv = tl.load(x_ptr + b * x_sb + offs_p[:, None] * x_sp + offs_i[None, :] * x_sc,
                     mask=ok, other=0.0).to(tl.float32)  # (P, I)
        xh = tl.where(ok, (xv - pm[None, :]) * ps[None, :], 0.0)
        if UPCAST:
            acc = tl.dot(g.to(tl.float32), xh, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, xh.to(gy_ptr.dtype.element_ty), acc)
        bsum += tl.sum(g.to(tl.float32), axis=1)
    out = g_ptr + (pid_s * N + offs_o[:, None]) * K + offs_i[None, :]
    tl.store(out, acc, mask=o_ok[:, None] & i_ok[None, :])
    if pid_i == 0:
        tl.store(bsum_ptr + pid_s * N + offs_o, bsum, mask=o_ok)


@triton.jit
def _conv_grad_finish_kernel(
    gp_ptr,  # (S, P, P) fp32 contiguous: per-split partials of G[o, i] = sum dYb[o] xhat_d[i]
    bp_ptr,  # (S, P) fp32 contiguous: per-split partials of sum dYb[o]
    w_ptr,  # (P, P) the conv weight [out o, in i], M's dtype, any strides (w_so, w_si)
    gamma_ptr, beta_ptr, rstd_ptr,  # (P,) fp32 each: BN_d's affine and 1 / sqrt(var + eps)
    gw_ptr,  # (P, P) fp32 contiguous, out: dW[o, i] = G[o, i] gamma[i] + sum dYb[o] beta[i]
    sb_ptr,  # (P,) fp32, out: sum dYb, the conv bias's gradient (written by program 0)
    gg_ptr, gb_ptr,  # (P,) fp32 each, out: BN_d's weight and bias gradients, sum_o W G and
                     # sum_o W sum dYb (the sums over pixels of dX xhat_d and of dX, dX = W^T dYb)
    ea_ptr, eb_ptr, ec_ptr,  # (P,) fp32 each, out: the dMb GEMM's epilogue, ea = gamma rstd,
                             # eb = -ea gb / N and ec = -ea rstd gg / N (TRAINING; else eb = 0,
                             # ec not written)
    P, S,  # channels of Mb; splits of the partials
    inv_n,  # 1 / (B H W)
    w_so, w_si,  # strides of the weight (elements)
    BLOCK_S: tl.constexpr,  # splits loaded per step (one memory round trip a step)
    BLOCK_O: tl.constexpr,  # output channels o per step
    BLOCK_I: tl.constexpr,  # input channels i per program
    TRAINING: tl.constexpr,  # BN_d normalised with the batch's statistics
):
    # grid: (cdiv(P, BLOCK_I),). Partials summed in blocks of splits, in order (deterministic,
    # no atomics).
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < P
    gamma = tl.load(gamma_ptr + offs_i, mask=i_ok, other=0.0)
    beta = tl.load(beta_ptr + offs_i, mask=i_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_i, mask=i_ok, other=0.0)
    grad_gamma = tl.zeros((BLOCK_I,), dtype=tl.float32)
    grad_beta = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for o0 in range(0, P, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < P
        ok = o_ok[:, None] & i_ok[None, :]
        g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        bsum = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            split = s0 + tl.arange(0, BLOCK_S)
            s_ok = split < S
            at = (split[:, None, None] * P + offs_o[None, :, None]) * P + offs_i[None, None, :]
            g += tl.sum(tl.load(gp_ptr + at, mask=s_ok[:, None, None] & ok[None, :, :],
                                other=0.0), axis=0)
            bsum += tl.sum(tl.load(bp_ptr + split[:, None] * P + offs_o[None, :],
                                   mask=s_ok[:, None] & o_ok[None, :], other=0.0), axis=0)
        tl.store(gw_ptr + offs_o[:, None] * P + offs_i[None, :],
                 g * gamma[None, :] + bsum[:, None] * beta[None, :], mask=ok)
        if pid == 0:
            tl.store(sb_ptr + offs_o, bsum, mask=o_ok)
        w = tl.load(w_ptr + offs_o[:, None] * w_so + offs_i[None, :] * w_si, mask=ok,
                    other=0.0).to(tl.float32)
        grad_gamma += tl.sum(w * g, axis=0)
        grad_beta += tl.sum(w * bsum[:, None], axis=0)
    tl.store(gg_ptr + offs_i, grad_gamma, mask=i_ok)
    tl.store(gb_ptr + offs_i, grad_beta, mask=i_ok)
    ea = gamma * rstd
    tl.store(ea_ptr + offs_i, ea, mask=i_ok)
    if TRAINING:
        tl.store(eb_ptr + offs_i, -ea * grad_beta * inv_n, mask=i_ok)
        tl.store(ec_ptr + offs_i, -ea * rstd * grad_gamma * inv_n, mask=i_ok)
    else:
        tl.store(eb_ptr + offs_i, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=i_ok)


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------
def _gate_blocks(q: int, interpret: bool = INTERPRET) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the gate kernels."""
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return 256, block(q, high=64), 4
    return 64, 32, 4


def _apply_blocks(q: int, p: int, interpret: bool = INTERPRET
                  ) -> Tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, BLOCK_N, num_warps) of the forward's one kernel (the gate
    half's pixels and channel step, the conv half's reduction and output blocks)."""
    if interpret:
        return 256, block(q, high=64), block(p, high=64), block(p, high=64), 4
    return 64, 32, 32, 64, 8  # (4 warps spill in fp32 on sm_80)


def _gemm_blocks(k: int, n: int, interpret: bool = INTERPRET) -> Tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_N, num_warps) of the pointwise GEMM."""
    if interpret:
        return 256, block(k, high=64), block(n, high=64), 4
    return 64, 32, 64, 4


def _wgrad_blocks(n: int, k: int, dtype: torch.dtype, interpret: bool = INTERPRET
                  ) -> Tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_O, BLOCK_I, num_warps) of the pointwise weight gradient: fp32 (IEEE
    FMAs) in 32-pixel steps and 8 warps (64 pixels in 4 warps kept 5.4 KB of stack per thread,
    read off the AOT machine code)."""
    if interpret:
        return 256, block(n, high=64), block(k, high=64), 4
    if upcast_dot(dtype, interpret=False):
        return 32, 64, 64, 8
    return 64, 64, 64, 4


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# (imported here, below the jit functions: a line added above them changes their cache keys)
import functools  # noqa: E402
from .._types import outside_inference_mode  # noqa: E402


@functools.lru_cache(maxsize=None)
def _tile_counts(hw: int, block_p: int, device: torch.device) -> torch.Tensor:
    """Pixels in each tile of a map of ``hw`` pixels, (TILES, 1) fp32 (made once per map size
    and device: a training step's calls share it)."""
    with outside_inference_mode():  # (kept for later calls)
        starts = torch.arange(0, hw, block_p, device=device, dtype=torch.float32)
        return (hw - starts).clamp(max=block_p)[:, None]


def gate_stats(m: torch.Tensor, gate_weight: torch.Tensor, q: int, with_mb: bool
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training statistics: (z (B, H*W) fp32, mean (CS,) fp32, biased var (CS,) fp32).

    Channels [0, Q) are those of U = Ma * hsig(z); with ``with_mb`` the Mb channels follow
    (CS = C), else CS = Q. Per-tile means and M2 are combined with Chan's formula by torch ops
    over all tiles at once (a merge kernel walks the rows in sequence: B * H * W / BLOCK_P of
    them, 6272 at 56 x 56 and batch 128, too long a chain).
    """
    b, c, h, w = m.shape
    hw = h * w
    cs = c if with_mb else q
    block_p, block_c, warps = _gate_blocks(q)
    tiles = cdiv(hw, block_p)
    z = torch.empty((b, hw), device=m.device, dtype=torch.float32)
    part = torch.empty((2, b * tiles, cs), device=m.device, dtype=torch.float32)
    _gate_stats_kernel[(tiles * b,)](
        m, gate_weight, z, part[0], part[1], q, cs, hw, tiles, *pixel_strides(m),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    counts = _tile_counts(hw, block_p, m.device)
    n = float(b * hw)
    means, m2s = part.view(2, b, tiles, cs)
    mean = (means * counts).sum((0, 1)).div_(n)
    # the sum over (sample, tile) of M2 + count (tile mean - mean)^2: Chan's formula
    var = torch.addcmul(m2s, counts, (means - mean).square_()).sum((0, 1)).div_(n)
    return z, mean, var


def apply(m: torch.Tensor, gate_weight: torch.Tensor, z: Optional[torch.Tensor],
          conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], y: torch.Tensor,
          bn_c: Tuple[torch.Tensor, ...], c_eps: float,
          bn_d: Optional[Tuple[torch.Tensor, ...]], d_eps: float,
          residual: Optional[torch.Tensor],
          statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
          stats_first: int = 0) -> torch.Tensor:
    """y = [BN_c(Ma * hsig(z)) | conv1x1(BN_d(Mb)) + bias] (+ residual) in one launch.

    m, y, residual: (B, C, H, W), any flattenable strides; gate_weight: (Q,) contiguous;
    conv_weight: (P, P) [out, in], any strides; conv_bias: (P,) or None; bn_c: (mean, var,
    weight, bias), fp32 (Q,) each; bn_d: the same over P, or None (folded into the conv).
    ``z``: (B, H*W) fp32 from :func:`gate_stats` (training), or None: computed here, and
    returned either way. ``statistics``: (mean, m2), each (B, :func:`statistics_chunks`,
    C - ``stats_first``) fp32 contiguous, filled with the mean and sum of squared deviations of
    y[:, stats_first:] (as stored) per pixel tile, or None.
    """
    b, c, h, w = m.shape
    p = conv_weight.shape[0]
    q = c - p
    compute_z = z is None
    if compute_z:
        z = torch.empty((b, h * w), device=m.device, dtype=torch.float32)
    block_p, block_c, block_k, block_n, warps = _apply_blocks(q, p)
    residual_arg = y if residual is None else residual  # (not read without RESIDUAL)
    mean, m2 = statistics if statistics is not None else (z, z)  # (not written without STATS)
    grid = (cdiv(h * w, block_p) * b, 1, 1 + cdiv(p, block_n))
    _apply_kernel[grid](
        m, gate_weight, z, conv_weight, conv_weight if conv_bias is None else conv_bias,
        *bn_c, *(bn_c if bn_d is None else bn_d), residual_arg, y, mean, m2, c_eps, d_eps, q, p,
        h * w, stats_first, *pixel_strides(m), *pixel_strides(residual_arg), *pixel_strides(y),
        conv_weight.stride(0),
        conv_weight.stride(1), BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
        BLOCK_N=block_n, COMPUTE_Z=compute_z, HAS_BN_D=bn_d is not None,
        HAS_BIAS=conv_bias is not None, RESIDUAL=residual is not None,
        STATS=statistics is not None, UPCAST=upcast_dot(m.dtype), num_warps=warps)
    return z


def statistics_chunks(pixels: int) -> int:
    """T, the pixel tiles of :func:`apply` on a map of ``pixels`` = H * W: the chunks of the
    statistics it takes (BLOCK_P pixels each, a power of two, as
    :func:`patnet_kernels._types.chunk_pixels` assumes)."""
    return cdiv(pixels, _apply_blocks(0, 0)[0])


def gate_grad_reduce(m: torch.Tensor, grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum dYa, sum dYa * xhat_c) per channel of Ma, fp32 (Q,) each."""
    b, _, h, w = m.shape
    q = mean.shape[0]
    block_p, block_c, warps = _gate_blocks(q)
    tiles = cdiv(h * w, block_p)
    part = torch.empty((2, b * tiles, q), device=m.device, dtype=torch.float32)
    _gate_grad_reduce_kernel[(tiles * b,)](
        m, grad_y, z, mean, rstd, part[0], part[1], q, h * w, tiles, *pixel_strides(m),
        *pixel_strides(grad_y), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return part[0].sum(0), part[1].sum(0)


def gate_grad_apply(m: torch.Tensor, grad_y: torch.Tensor, z: torch.Tensor,
                    gate_weight: torch.Tensor, grad_m: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, a: torch.Tensor, k1: Optional[torch.Tensor],
                    k2: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """grad_m[:, :Q] = dMa; returns (dw (Q,), sum dYa, sum dYa * xhat_c) in fp32.

    Training (``k1``, ``k2`` given): dU = a dY + k1 + xhat k2 and the two sums are None (the
    reduction pass gave them); eval: dU = a dY and the sums are computed here.
    """
    b, _, h, w = m.shape
    q = mean.shape[0]
    train = k1 is not None
    block_p, block_c, warps = _gate_blocks(q)
    tiles = cdiv(h * w, block_p)
    part = torch.empty((1 if train else 3, b * tiles, q), device=m.device, dtype=torch.float32)
    k1 = a if k1 is None else k1
    k2 = a if k2 is None else k2
    sums = (part[0], part[0]) if train else (part[1], part[2])
    _gate_grad_apply_kernel[(tiles * b,)](
        m, grad_y, z, gate_weight, grad_m, mean, rstd, a, k1, k2, part[0], *sums,
        q, h * w, tiles, *pixel_strides(m), *pixel_strides(grad_y), *pixel_strides(grad_m),
        BLOCK_P=block_p, BLOCK_C=block_c, TRAIN=train, num_warps=warps)
    if train:
        return part[0].sum(0), None, None
    return part[0].sum(0), part[1].sum(0), part[2].sum(0)  # three tensors, no shared storage


def pointwise_gemm(a: torch.Tensor, weight_kn: torch.Tensor, out: torch.Tensor,
                   pm: torch.Tensor, ps: torch.Tensor, ph: torch.Tensor,
                   ea: torch.Tensor, eb: torch.Tensor, x: Optional[torch.Tensor] = None,
                   em: Optional[torch.Tensor] = None, ec: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """out[b, n, h, w] = sum_k ((a - pm) * ps + ph)[b, k, h, w] W[k, n] * ea[n] + eb[n]
    (+ (x - em)[b, n, h, w] * ec[n] when ``x`` is given).

    a: (B, K, H, W), out and x: (B, N, H, W), any flattenable strides (channel slices of bigger
    tensors are written in place); weight_kn: (K, N) any strides, a's dtype; the vectors fp32.
    """
    b, k, h, w = a.shape
    n = out.shape[1]
    block_p, block_k, block_n, warps = _gemm_blocks(k, n)
    epi_x = x is not None
    if not epi_x:
        x, em, ec = out, ea, ea  # not read
    grid = (cdiv(h * w, block_p) * b, 1, cdiv(n, block_n))
    _pointwise_gemm_kernel[grid](
        a, weight_kn, out, x, pm, ps, ph, ea, eb, em, ec, k, n, h * w, *pixel_strides(a),
        weight_kn.stride(0), weight_kn.stride(1), *pixel_strides(out), *pixel_strides(x),
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_N=block_n, EPI_X=epi_x,
        UPCAST=upcast_dot(a.dtype), num_warps=warps)
    return out


def pointwise_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, pm: torch.Tensor,
                          ps: torch.Tensor, partials: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(G (N, K), s (N,)) fp32: G[o, i] = sum dY[o] (x[i] - pm[i]) ps[i], s[o] = sum dY[o]
    over (b, h, w). grad_y: (B, N, H, W), x: (B, K, H, W), any flattenable strides. With
    ``partials``, their per-split partials (S, N, K) and (S, N), for :func:`conv_grad_finish`
    to sum."""
    b, n, h, w = grad_y.shape
    k = x.shape[1]
    block_p, block_o, block_i, warps = _wgrad_blocks(n, k, x.dtype)
    tiles = cdiv(h * w, block_p)
    n_o, n_i = cdiv(n, block_o), cdiv(k, block_i)
    splits = reduction_splits(b * tiles, n_o * n_i, 4)
    g = torch.empty((splits, n, k), device=x.device, dtype=torch.float32)
    bsum = torch.empty((splits, n), device=x.device, dtype=torch.float32)
    _pointwise_weight_grad_kernel[(splits, n_o, n_i)](
        grad_y, x, pm, ps, g, bsum, b, n, k, h * w, tiles, *pixel_strides(grad_y),
        *pixel_strides(x),
        BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_I=block_i, UPCAST=upcast_dot(x.dtype),
        num_warps=warps)
    return (g, bsum) if partials else (g.sum(0), bsum.sum(0))


def _finish_blocks(interpret: bool = INTERPRET) -> Tuple[int, int, int]:
    """(BLOCK_S, BLOCK_O, BLOCK_I) of the conv gradient's finish: narrow column blocks, so that
    a stage-4 PAT_sp (P = 192) spreads its partials' sums over 12 programs; 16 splits a step
    (P = 24 at PATNet-T1's stage 1 has 528 splits on 132 multiprocessors, one at a time a
    chain of 528 memory round trips; 33 now). Under the interpreter 4 (its 2 splits then take
    a partial step)."""
    return (4, 64, 64) if interpret else (16, 32, 16)


def conv_grad_finish(g_part: torch.Tensor, bsum_part: torch.Tensor, weight: torch.Tensor,
                     gamma: torch.Tensor, beta: torch.Tensor, rstd: torch.Tensor, pixels: int,
                     training: bool) -> Tuple[torch.Tensor, ...]:
    """PAT_sp's conv half's parameter gradients and dMb epilogue in one launch, from the
    partials of :func:`pointwise_weight_grad` (``partials=True``; x_hat = BN_d's normalised
    input): (dW (P, P), the conv bias's gradient (P,), BN_d's weight and bias gradients (P,),
    ea, eb, ec (P,)), fp32, with dMb = ea (W^T dYb) + eb + (Mb - mean) ec in training (eb = 0,
    no ec term in eval). weight: (P, P) [out, in], any strides; gamma, beta, rstd: BN_d's,
    fp32 (P,); ``pixels``: B H W."""
    splits, p, _ = g_part.shape

    def empty(*shape):
        return torch.empty(shape, device=g_part.device, dtype=torch.float32)

    # (the gradients each their own tensor: an op's outputs must not share storage)
    grads = (empty(p, p), empty(p), empty(p), empty(p))
    epilogue = empty(3, p)  # (ea, eb, ec)
    block_s, block_o, block_i = _finish_blocks()
    _conv_grad_finish_kernel[(cdiv(p, block_i),)](
        g_part, bsum_part, weight, gamma, beta, rstd, *grads, *epilogue, p, splits,
        1.0 / pixels, weight.stride(0), weight.stride(1), BLOCK_S=block_s, BLOCK_O=block_o,
        BLOCK_I=block_i, TRAINING=training)
    return (*grads, *epilogue)


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# --------------------------------------------------------------------------------------------
def _tiled_launches(*tensors: str) -> dict:
    """``AotKernel.launches`` of a kernel over per-tile partials: NCHW and channels_last, each
    also with one tile a sample (TILES = 1 becomes a constexpr: a 7 x 7 map, stage 4)."""
    return {**activation_launches(*tensors, pixel="sp"),
            **activation_launches(*tensors, pixel="sp", **{"one tile": ("TILES",)})}


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check.

    Block sizes do not depend on the channel counts on a GPU (the kernels loop over channel
    blocks), so there is one configuration per kernel, dtype and constexpr flag.
    """
    kernels = []
    block_p, block_c, gate_warps = _gate_blocks(0, interpret=False)
    gemm_p, gemm_k, gemm_n, gemm_warps = _gemm_blocks(0, 0, interpret=False)
    apply_p, apply_c, apply_k, apply_n, apply_warps = _apply_blocks(0, 0, interpret=False)
    finish_s, finish_o, finish_i = _finish_blocks(interpret=False)
    gate = dict(BLOCK_P=block_p, BLOCK_C=block_c)
    f32 = "*fp32"
    for dtype, tname in TRITON_DTYPE.items():
        ptr, upcast = "*" + tname, upcast_dot(dtype, interpret=False)
        wg_p, wg_o, wg_i, wg_warps = _wgrad_blocks(0, 0, dtype, interpret=False)
        fn = _gate_stats_kernel
        kernels.append(AotKernel(
            f"sa_gate_stats[{tname}]", fn,
            aot_signature(fn, {"m_ptr": ptr, "g_ptr": ptr, "z_ptr": f32, "mean_ptr": f32,
                               "m2_ptr": f32}), dict(gate), num_warps=gate_warps,
            launches=_tiled_launches("m")))
        fn = _apply_kernel
        # (COMPUTE_Z, HAS_BN_D, HAS_BIAS, RESIDUAL, STATS) of the models' calls: eval's and
        # training's (the inference copy runs PAT_sp inside its MLP kernels, see
        # pointwise_mlp.py; its residual, folded BN_d and statistics forms of this kernel are
        # for direct calls of pk.spatial_attention, compiled as launched)
        for compute_z, bn_d, bias, residual, stats in ((True, True, False, False, False),
                                                       (False, True, False, False, False)):
            kernels.append(AotKernel(
                f"sa_apply[{tname}, compute_z={compute_z}, bn_d={bn_d}, bias={bias}, "
                f"residual={residual}, stats={stats}]", fn,
                aot_signature(fn, dict({name: f32 for name in (
                    "z_ptr", "cm_ptr", "cv_ptr", "cw_ptr", "cb_ptr", "dm_ptr", "dv_ptr",
                    "dw_ptr", "db_ptr", "mean_ptr", "m2_ptr")}, m_ptr=ptr, g_ptr=ptr, w_ptr=ptr,
                    bias_ptr=ptr, r_ptr=ptr, y_ptr=ptr), {"c_eps": "fp32", "d_eps": "fp32"}),
                dict(BLOCK_P=apply_p, BLOCK_C=apply_c, BLOCK_K=apply_k, BLOCK_N=apply_n,
                     COMPUTE_Z=compute_z, HAS_BN_D=bn_d, HAS_BIAS=bias, RESIDUAL=residual,
                     STATS=stats, UPCAST=upcast), num_warps=apply_warps,
                launches=activation_launches("m", "r", "y", pixel="sp", conv=("w_si",))))
        fn = _gate_grad_reduce_kernel
        kernels.append(AotKernel(
            f"sa_gate_grad_reduce[{tname}]", fn,
            aot_signature(fn, {"m_ptr": ptr, "gy_ptr": ptr, "z_ptr": f32, "mean_ptr": f32,
                               "rstd_ptr": f32, "sdy_ptr": f32, "sdyx_ptr": f32}),
            dict(gate), num_warps=gate_warps, launches=_tiled_launches("m", "g")))
        fn = _gate_grad_apply_kernel
        for train in (True, False):
            kernels.append(AotKernel(
                f"sa_gate_grad_apply[{tname}, train={train}]", fn,
                aot_signature(fn, {"m_ptr": ptr, "gy_ptr": ptr, "z_ptr": f32, "g_ptr": ptr,
                                   "gm_ptr": ptr, "mean_ptr": f32, "rstd_ptr": f32,
                                   "a_ptr": f32, "k1_ptr": f32, "k2_ptr": f32, "dw_ptr": f32,
                                   "sdy_ptr": f32, "sdyx_ptr": f32}),
                dict(gate, TRAIN=train), num_warps=gate_warps,
                launches=_tiled_launches("m", "g", "o")))
        fn = _pointwise_gemm_kernel
        vectors = {name: f32 for name in ("pm_ptr", "ps_ptr", "ph_ptr", "ea_ptr", "eb_ptr",
                                          "em_ptr", "ec_ptr")}
        for epi_x in (False, True):
            # (the backward's: the weight is W itself, (K, N) with w_sn = 1)
            kernels.append(AotKernel(
                f"sa_pointwise_gemm[{tname}, epi_x={epi_x}]", fn,
                aot_signature(fn, dict(vectors, a_ptr=ptr, w_ptr=ptr, out_ptr=ptr, x_ptr=ptr)),
                dict(BLOCK_P=gemm_p, BLOCK_K=gemm_k, BLOCK_N=gemm_n, EPI_X=epi_x,
                     UPCAST=upcast), num_warps=gemm_warps,
                launches=activation_launches("a", "o", "x", pixel="sp", bwd=("w_sn",))))
        fn = _pointwise_weight_grad_kernel
        kernels.append(AotKernel(
            f"sa_pointwise_weight_grad[{tname}]", fn,
            aot_signature(fn, {"gy_ptr": ptr, "x_ptr": ptr, "pm_ptr": f32, "ps_ptr": f32,
                               "g_ptr": f32, "bsum_ptr": f32}),
            dict(BLOCK_P=wg_p, BLOCK_O=wg_o, BLOCK_I=wg_i, UPCAST=upcast),
            num_warps=wg_warps, launches=_tiled_launches("g", "x")))
        fn = _conv_grad_finish_kernel
        for training in (True, False):
            kernels.append(AotKernel(
                f"sa_conv_grad_finish[{tname}, training={training}]", fn,
                aot_signature(fn, {name: ptr if name == "w_ptr" else f32
                                   for name in fn.arg_names if name.endswith("_ptr")},
                              {"inv_n": "fp32"}),
                dict(BLOCK_S=finish_s, BLOCK_O=finish_o, BLOCK_I=finish_i, TRAINING=training),
                launches={"weight (P, P, 1, 1) contiguous": ("w_si",)}))
    return kernels
