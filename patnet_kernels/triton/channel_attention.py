"""Triton kernels of PAT_ch, the partial conv fused with Gaussian channel attention.

Y = [conv3x3(X1) | X2 * a[b, c] + d[b, c]], X1 = X[:, :C1], X2 = X[:, C1:] (C2 channels). The
per-(sample, channel) coefficients a, d come from tiny B x C2 math (the mix W_ch, BN_a, the
hard-sigmoid gate, BN_b) done outside these kernels on the statistics computed here. Tensors may
have any strides (NCHW, channels_last): every kernel takes the four strides of each activation.

* :func:`channel_stats` -- one pass over X2: per (b, c) mean and unbiased std over H * W, in
  fp32, from per-tile means and centred sums of squares combined with Chan's formula (no
  E[x^2] - E[x]^2 cancellation). H * W = 1 gives std = 0 / 0 = NaN, as ``Tensor.std``.
  :func:`channel_chunk_stats` -- the same kernel with H * W split into chunks, for parallelism
  when the batch is small: per chunk the mean and the sum of squared deviations, which the
  gate kernel merges (Chan's formula again).
* :func:`conv3x3_affine` -- one pass over X writing the whole output: each program computes
  conv3x3 of its pixel tile for a block of output channels (the implicit GEMM of
  :func:`~patnet_kernels.triton.partial_conv.conv3x3_tile`) and the affine map of its share of
  the X2 channels. The same kernel gives the input gradient: [conv3x3^T(dY1) | dY2 * a +
  (X2 - mean) * slope + offset], where the last two terms are the gradient through the
  statistics (slope = dstd / ((HW - 1) std), offset = dmean / HW).
* :func:`channel_gate` -- the gate in eval, one small kernel on (B, C2) values: z = W_ch .
  [mu, sigma] + bias, BN_a (running statistics, unless folded into W_ch), g = hsig(z), and BN_b
  folded into the per-(b, c) affine map: a = g * gamma_b / sqrt(var_b + eps_b), d = beta_b -
  mean_b * gamma_b / sqrt(var_b + eps_b), all in fp32 (the mix on tensor cores in IEEE fp32).
* :func:`channel_grad_sums` -- one pass over (dY2, X2): per (b, c) sums over H * W of
  dY2 * (X2 - mean) and of dY2 (the gradient of d; that of a is the first plus mean times the
  second), in fp32. Centring first keeps the gate's backward well conditioned when |mean| is
  large against the std.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._types import chunk_layout, chunk_pixels
from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      block, cdiv, hardsigmoid, merge_moments, merge_rows, program_of_sample,
                      tile_moments, upcast_dot)
from .partial_conv import _conv_blocks, _strides, conv3x3_tile


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # (B, C1 + C2, H, W) any strides; channels [C1, C1 + C2) read
    mean_ptr,  # (B, T, C2) fp32 contiguous: the mean of each of T pixel chunks
    dev_ptr,  # (B, T, C2) fp32 contiguous: per chunk, the unbiased std if T = 1 and not
              # SUM_OF_SQUARES (NaN if H * W = 1), else the sum of squared deviations
    C1, C2, H, W,
    CHUNK_PIXELS,  # S: chunk t holds pixels [t S, min((t + 1) S, H W)) (T = ceil(H W / S))
    x_sb, x_sc, x_sh, x_sw,  # strides of x (elements)
    SUM_OF_SQUARES: tl.constexpr,  # write each chunk's sum of squared deviations, not std
    BLOCK_P: tl.constexpr,  # pixels per step (flattened h * W + w)
    BLOCK_C: tl.constexpr,  # channels per program
):
    # grid: (ceil(C2 / BLOCK_C) * B, 1, T), a sample's channel blocks in turn
    pid_c, pid_b = program_of_sample(tl.cdiv(C2, BLOCK_C))
    pid_t = tl.program_id(2)
    chunks = tl.num_programs(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C2
    base = x_ptr + pid_b * x_sb + (C1 + offs_c) * x_sc  # (BLOCK_C,) pointers
    n = H * W
    end = tl.minimum(n, (pid_t + 1) * CHUNK_PIXELS)
    seen = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(pid_t * CHUNK_PIXELS, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < end
        pix = (offs_p // W) * x_sh + (offs_p % W) * x_sw
        ok = p_ok[:, None] & c_ok[None, :]
        x = tl.load(base[None, :] + pix[:, None], mask=ok, other=0.0).to(tl.float32)
        count, tile_mean, tile_m2 = tile_moments(x, ok)
        seen, mean, m2 = merge_moments(seen, mean, m2, count, tile_mean, tile_m2)
    out = (pid_b * chunks + pid_t) * C2 + offs_c
    tl.store(mean_ptr + out, mean, mask=c_ok)
    if SUM_OF_SQUARES:
        tl.store(dev_ptr + out, m2, mask=c_ok)
    else:
        # H * W = 1: m2 = 0 and the divisor 0, so std = NaN (as Tensor.std with correction 1).
        tl.store(dev_ptr + out, tl.sqrt(m2 / (seen - 1.0)), mask=c_ok)


@triton.jit
def _channel_vector(ptr, offs, ok, PRESENT: tl.constexpr, default: tl.constexpr):
    """The (C2,) parameter at ``ptr`` for the channels ``offs``, as fp32; ``default`` where
    absent (not PRESENT) or not ``ok``."""
    v = offs.to(tl.float32) * 0.0 + default
    if PRESENT:
        v = tl.load(ptr + offs, mask=ok, other=default).to(tl.float32)
    return v


@triton.jit
def _merged_statistics(mean_ptr, m2_ptr, offs_b, offs_i, ok, C2, CHUNKS, PIXELS, size, shift,
                       BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr):
    """(mean, unbiased std), each (BLOCK_B, BLOCK_I) fp32 (0 where not ``ok``), of the samples
    ``offs_b`` and channels ``offs_i`` from per-chunk (mean, sum of squared deviations), each
    (B, CHUNKS, C2) contiguous, chunk t of sample b its pixels [t size - o, (t + 1) size - o) in
    [0, PIXELS), o = b shift mod size (_types.chunk_layout; empty ones not read): BLOCK_T chunks
    a step merged at once, the steps in order (Chan et al.; 56 x 56: 13 round trips, not 49)."""
    seen, mean, m2 = (ok.to(tl.float32) * 0.0,) * 3
    offset = (offs_b * shift) % size  # (BLOCK_B,) each sample's o
    for t0 in range(0, CHUNKS, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        end = tl.minimum((t[:, None] + 1) * size - offset[None, :], PIXELS)  # (T, B), and:
        count = tl.where((t < CHUNKS)[:, None], tl.maximum(  # (T, B) its pixels
            end - tl.maximum(t[:, None] * size - offset[None, :], 0), 0), 0)
        at = (offs_b[None, :, None] * CHUNKS + t[:, None, None]) * C2 + offs_i[None, None, :]
        t_b_i_ok = (count > 0)[:, :, None] & ok[None, :, :]
        chunks_count, chunks_mean, chunks_m2 = merge_rows(
            tl.broadcast_to(count.to(tl.float32)[:, :, None], (BLOCK_T, BLOCK_B, BLOCK_I)),
            tl.load(mean_ptr + at, mask=t_b_i_ok, other=0.0),
            tl.load(m2_ptr + at, mask=t_b_i_ok, other=0.0))
        seen, mean, m2 = merge_moments(seen, mean, m2, chunks_count, chunks_mean, chunks_m2)
    # H * W = 1: m2 = 0 and the divisor 0, so std = NaN (as Tensor.std with correction 1).
    return mean, tl.where(ok, tl.sqrt(m2 / (seen - 1.0)), 0.0)


@triton.jit
def _gate_mix(mean_ptr, std_ptr, w_ptr, bias_ptr, offs_b, b_ok, offs_o, o_ok, C2, CHUNKS,
              PIXELS, CHUNK_PIXELS, CHUNK_SHIFT, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """z = W_ch . [mean, std] (+ W_ch's bias) of the samples ``offs_b`` and output channels
    ``offs_o``, (BLOCK_B, BLOCK_O) fp32, on the tensor cores in IEEE fp32; the statistics
    read, or merged from CHUNKS chunks (see :func:`_channel_gate_kernel`)."""
    z = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, C2, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < C2
        bi_ok = b_ok[:, None] & i_ok[None, :]
        if CHUNKS > 0:
            mean, std = _merged_statistics(mean_ptr, std_ptr, offs_b, offs_i, bi_ok, C2,
                                           CHUNKS, PIXELS, CHUNK_PIXELS, CHUNK_SHIFT,
                                           BLOCK_T, BLOCK_B, BLOCK_I)
        else:
            bi = offs_b[:, None] * C2 + offs_i[None, :]
            mean = tl.load(mean_ptr + bi, mask=bi_ok, other=0.0)
            std = tl.load(std_ptr + bi, mask=bi_ok, other=0.0)
        io = (offs_o[None, :] * C2 + offs_i[:, None]) * 2  # (BLOCK_I, BLOCK_O): w[o, i, 0, 0]
        io_ok = i_ok[:, None] & o_ok[None, :]
        w_mean = tl.load(w_ptr + io, mask=io_ok, other=0.0).to(tl.float32)
        w_std = tl.load(w_ptr + io + 1, mask=io_ok, other=0.0).to(tl.float32)
        z = tl.dot(mean, w_mean, z, input_precision="ieee")
        z = tl.dot(std, w_std, z, input_precision="ieee")
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _gate_value(z, mu_a, inv_a, gamma_a, beta_a, HAS_BN_A: tl.constexpr):
    """(z_n, z_hat, g) of a (BLOCK_B, BLOCK_O) block of the mix z: BN_a's input normalised,
    z_hat = (z - mu_a) inv_a, its output z_n = z_hat gamma_a + beta_a (without BN_a both are
    z), and the gate g = hsig(z_n), NaN where z_n is (as torch); the rest (BLOCK_O,) vectors."""
    if HAS_BN_A:
        z_hat = (z - mu_a[None, :]) * inv_a[None, :]
        z_n = z_hat * gamma_a[None, :] + beta_a[None, :]
    else:
        z_hat = z
        z_n = z
    return z_n, z_hat, tl.where(z_n != z_n, z_n, hardsigmoid(z_n))


@triton.jit
def _channel_gate_kernel(
    mean_ptr,  # (B, C2) fp32 contiguous: per (b, c) mean of X2; with CHUNKS > 0 (B, CHUNKS,
               # C2): the mean of each of CHUNKS equal pixel chunks (channel_chunk_stats)
    std_ptr,  # (B, C2) fp32 contiguous: per (b, c) unbiased std of X2; with CHUNKS > 0
              # (B, CHUNKS, C2): each chunk's sum of squared deviations from its mean
    w_ptr,  # (C2, C2, 1, 2) W_ch, contiguous: w[o, i, 0, j] mixes (mean, std)[j] of channel i
    bias_ptr,  # (C2,) W_ch's bias (read if HAS_BIAS)
    a_w_ptr, a_b_ptr,  # (C2,) BN_a weight, bias (read if HAS_A_W / HAS_A_B)
    a_mean_ptr, a_var_ptr,  # (C2,) BN_a running mean, variance (read if HAS_BN_A, in eval)
    b_w_ptr, b_b_ptr,  # (C2,) BN_b weight, bias (read if HAS_B_W / HAS_B_B)
    b_mean_ptr, b_var_ptr,  # (C2,) BN_b running mean, variance (read in eval)
    scale_ptr,  # (B, C2) fp32 contiguous, written: a = g * gamma_b / sqrt(var_b + eps_b)
    shift_ptr,  # (B, C2) fp32 contiguous, written: d = beta_b - mean_b * gamma_b / sqrt(...)
    z_ptr,  # (B, C2) fp32 contiguous, written: the mix z = W_ch . [mean, std] + bias
    moments_ptr,  # (4, C2) fp32 contiguous, written: the mean and 1 / sqrt(var + eps) BN_a
                  # normalised with (0 and 1 without BN_a), then BN_b's
    batch_ptr,  # (4, C2) fp32 contiguous, written if TRAINING: BN_a's batch mean and unbiased
                # variance (0 and 0 without BN_a), then BN_b's (for the running statistics)
    B, C2,
    CHUNKS,  # 0, or the pixel chunks of mean_ptr / std_ptr (eval only)
    PIXELS,  # H * W
    CHUNK_PIXELS, CHUNK_SHIFT,  # the chunks' _types.chunk_layout (read with CHUNKS > 0)
    eps_a, eps_b,  # fp32: the BatchNorms' eps
    HAS_BIAS: tl.constexpr, HAS_BN_A: tl.constexpr, HAS_A_W: tl.constexpr,
    HAS_A_B: tl.constexpr, HAS_B_W: tl.constexpr, HAS_B_B: tl.constexpr,
    TRAINING: tl.constexpr,  # BN_a and BN_b normalise with the batch's statistics (taken
                             # over all samples by each program), else the running ones
    BLOCK_T: tl.constexpr,  # chunks of the statistics merged per step (CHUNKS > 0)
    BLOCK_B: tl.constexpr,  # samples per step
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK_I: tl.constexpr,  # input channels per step of the mix
):
    # grid: (ceil(C2 / BLOCK_O) * (1 if TRAINING else ceil(B / BLOCK_B)),), a block of
    # samples' channel blocks in turn
    pid_o, pid_b = program_of_sample(tl.cdiv(C2, BLOCK_O))
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < C2
    gamma_a = _channel_vector(a_w_ptr, offs_o, o_ok, HAS_A_W, 1.0)
    beta_a = _channel_vector(a_b_ptr, offs_o, o_ok, HAS_A_B, 0.0)
    gamma_b = _channel_vector(b_w_ptr, offs_o, o_ok, HAS_B_W, 1.0)
    beta_b = _channel_vector(b_b_ptr, offs_o, o_ok, HAS_B_B, 0.0)
    zero = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if TRAINING:
        # Pass 1: z of every sample (kept for the passes below and the backward) and BN_a's
        # batch moments, merged over blocks of samples.
        seen, mu_a, m2_a = zero, zero, zero
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            ok = (offs_b < B)[:, None] & o_ok[None, :]
            z = _gate_mix(mean_ptr, std_ptr, w_ptr, bias_ptr, offs_b, offs_b < B, offs_o, o_ok,
                          C2, 0, PIXELS, 0, 0, HAS_BIAS, BLOCK_T, BLOCK_B, BLOCK_O, BLOCK_I)
            tl.store(z_ptr + offs_b[:, None] * C2 + offs_o[None, :], z, mask=ok)
            # (every column over the batch's samples: those past C2 hold zeros)
            rows = tl.broadcast_to((offs_b < B)[:, None], (BLOCK_B, BLOCK_O))
            count, tile_mean, tile_m2 = tile_moments(z, rows)
            seen, mu_a, m2_a = merge_moments(seen, mu_a, m2_a, count, tile_mean, tile_m2)
        if HAS_BN_A:
            inv_a = 1.0 / tl.sqrt_rn(m2_a / seen + eps_a)
            tl.store(batch_ptr + offs_o, mu_a, mask=o_ok)
            tl.store(batch_ptr + C2 + offs_o, m2_a / (seen - 1.0), mask=o_ok)
        else:
            mu_a, inv_a = zero, zero + 1.0
            tl.store(batch_ptr + offs_o, zero, mask=o_ok)
            tl.store(batch_ptr + C2 + offs_o, zero, mask=o_ok)
        # Pass 2: BN_b's batch moments of X2 * g. Sample b's X2 * g has mean t = g mean and
        # sum of squared deviations g^2 std^2 (H W - 1); the t merged over the samples.
        seen, center_b, m2_t, m2_within = zero, zero, zero, zero
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            ok = (offs_b < B)[:, None] & o_ok[None, :]
            at = offs_b[:, None] * C2 + offs_o[None, :]
            z = tl.load(z_ptr + at, mask=ok, other=0.0)
            _, _, g = _gate_value(z, mu_a, inv_a, gamma_a, beta_a, HAS_BN_A)
            t = g * tl.load(mean_ptr + at, mask=ok, other=0.0)
            spread = tl.where(ok, g * tl.load(std_ptr + at, mask=ok, other=0.0), 0.0)
            m2_within += tl.sum(spread * spread, 0)
            rows = tl.broadcast_to((offs_b < B)[:, None], (BLOCK_B, BLOCK_O))
            count, tile_mean, tile_m2 = tile_moments(t, rows)
            seen, center_b, m2_t = merge_moments(seen, center_b, m2_t, count, tile_mean, tile_m2)
        m2_b = m2_within * (PIXELS - 1.0) + m2_t * PIXELS
        count_b = seen * PIXELS
        inv_b = 1.0 / tl.sqrt_rn(m2_b / count_b + eps_b)
        tl.store(batch_ptr + 2 * C2 + offs_o, center_b, mask=o_ok)
        tl.store(batch_ptr + 3 * C2 + offs_o, m2_b / (count_b - 1.0), mask=o_ok)
        b_first = 0
        b_stop = B
    else:
        if HAS_BN_A:
            mu_a = tl.load(a_mean_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
            inv_a = 1.0 / tl.sqrt_rn(
                tl.load(a_var_ptr + offs_o, mask=o_ok, other=1.0).to(tl.float32) + eps_a)
        else:
            mu_a, inv_a = zero, zero + 1.0
        center_b = tl.load(b_mean_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
        inv_b = 1.0 / tl.sqrt_rn(
            tl.load(b_var_ptr + offs_o, mask=o_ok, other=1.0).to(tl.float32) + eps_b)
        b_first = pid_b.to(tl.int32) * BLOCK_B
        b_stop = tl.minimum(B, b_first + BLOCK_B)
    if pid_b == 0:  # the normalisations used, for the backward
        tl.store(moments_ptr + offs_o, mu_a, mask=o_ok)
        tl.store(moments_ptr + C2 + offs_o, inv_a, mask=o_ok)
        tl.store(moments_ptr + 2 * C2 + offs_o, center_b, mask=o_ok)
        tl.store(moments_ptr + 3 * C2 + offs_o, inv_b, mask=o_ok)
    k = gamma_b * inv_b
    shift = beta_b - center_b * k
    # Pass 3 (in eval the only one, over this program's samples): Y2 = X2 * scale + shift.
    for b0 in range(b_first, b_stop, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b < b_stop)[:, None] & o_ok[None, :]
        at = offs_b[:, None] * C2 + offs_o[None, :]
        if TRAINING:
            z = tl.load(z_ptr + at, mask=ok, other=0.0)
        else:
            z = _gate_mix(mean_ptr, std_ptr, w_ptr, bias_ptr, offs_b, offs_b < b_stop, offs_o,
                          o_ok, C2, CHUNKS, PIXELS, CHUNK_PIXELS, CHUNK_SHIFT, HAS_BIAS,
                          BLOCK_T, BLOCK_B, BLOCK_O, BLOCK_I)
            tl.store(z_ptr + at, z, mask=ok)
        _, _, g = _gate_value(z, mu_a, inv_a, gamma_a, beta_a, HAS_BN_A)
        tl.store(scale_ptr + at, g * k[None, :], mask=ok)
        tl.store(shift_ptr + at, tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32) + shift[None, :],
                 mask=ok)


@triton.jit
def _channel_gate_grad_kernel(
    sum_xg_ptr,  # (B, C2) fp32 contiguous: sum over H * W of dY2 * (X2 - mean)
    sum_g_ptr,  # (B, C2) fp32 contiguous: sum over H * W of dY2
    mean_ptr, std_ptr,  # (B, C2) fp32 contiguous: the statistics of X2
    z_ptr,  # (B, C2) fp32 contiguous: the gate's mix z (written by the forward)
    moments_ptr,  # (4, C2) fp32 contiguous: the normalisations of the forward (its moments)
    a_w_ptr, a_b_ptr,  # (C2,) BN_a weight, bias (read if HAS_A_W / HAS_A_B)
    b_w_ptr,  # (C2,) BN_b weight (read if HAS_B_W)
    dz_ptr,  # (B, C2) fp32 contiguous, written: dL/dz
    d_mean_ptr, d_std_ptr,  # (B, C2) fp32 contiguous, written if TRAINING: dL/dmean and
                            # dL/dstd through BN_b's batch statistics (the mix's part follows)
    grads_ptr,  # (5, C2) fp32 contiguous, written: dL/d W_ch's bias, BN_a's weight and bias,
                # BN_b's weight and bias
    B, C2,
    PIXELS,  # H * W
    HAS_BN_A: tl.constexpr, HAS_A_W: tl.constexpr, HAS_A_B: tl.constexpr,
    HAS_B_W: tl.constexpr,
    TRAINING: tl.constexpr,  # the forward normalised with the batch's statistics
    BLOCK_B: tl.constexpr,  # samples per step
    BLOCK_O: tl.constexpr,  # channels per program
):
    # grid: (ceil(C2 / BLOCK_O),): each program over every sample of its channels (the
    # BatchNorms' gradients are sums over the batch).
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < C2
    gamma_a = _channel_vector(a_w_ptr, offs_o, o_ok, HAS_A_W, 1.0)
    beta_a = _channel_vector(a_b_ptr, offs_o, o_ok, HAS_A_B, 0.0)
    gamma_b = _channel_vector(b_w_ptr, offs_o, o_ok, HAS_B_W, 1.0)
    mu_a = tl.load(moments_ptr + offs_o, mask=o_ok, other=0.0)
    inv_a = tl.load(moments_ptr + C2 + offs_o, mask=o_ok, other=1.0)
    center_b = tl.load(moments_ptr + 2 * C2 + offs_o, mask=o_ok, other=0.0)
    inv_b = tl.load(moments_ptr + 3 * C2 + offs_o, mask=o_ok, other=1.0)
    k = gamma_b * inv_b
    n = PIXELS * 1.0
    zero = tl.zeros((BLOCK_O,), dtype=tl.float32)
    # Pass 1: the gradients of BN_b (scale = g k, shift = beta_b - center_b k), written in the
    # centred sums: dot = sum_b (sum_hw dY2 X2) g - grad_beta center_b, without the
    # cancellation of two large terms when |mean| >> std.
    grad_beta_b, dot = zero, zero
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b < B)[:, None] & o_ok[None, :]
        at = offs_b[:, None] * C2 + offs_o[None, :]
        _, _, g = _gate_value(tl.load(z_ptr + at, mask=ok, other=0.0), mu_a, inv_a, gamma_a,
                              beta_a, HAS_BN_A)
        sum_g = tl.load(sum_g_ptr + at, mask=ok, other=0.0)
        t_c = g * tl.load(mean_ptr + at, mask=ok, other=0.0) - center_b[None, :]
        grad_beta_b += tl.sum(sum_g, 0)
        dot += tl.sum(tl.where(ok, tl.load(sum_xg_ptr + at, mask=ok, other=0.0) * g
                               + t_c * sum_g, 0.0), 0)
    # (training: var_b = M2 / (B n), M2 = sum_b g^2 std^2 (n - 1) + n sum_b t_c^2, and
    # center_b = mean_b g mean: d_m2 is dL/dM2)
    d_m2 = dot * gamma_b * (-0.5) * inv_b * inv_b * inv_b / (B * n)
    # Pass 2: down to dL/dz_n and BN_a's gradients (in training, with BN_a, dz_ptr keeps dL/dz_hat
    # for pass 3).
    grad_bias, grad_gamma_a, grad_beta_a, sum_dzh, sum_dzh_zhat = zero, zero, zero, zero, zero
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b < B)[:, None] & o_ok[None, :]
        at = offs_b[:, None] * C2 + offs_o[None, :]
        z_n, z_hat, g = _gate_value(tl.load(z_ptr + at, mask=ok, other=0.0), mu_a, inv_a,
                                    gamma_a, beta_a, HAS_BN_A)
        sum_xg = tl.load(sum_xg_ptr + at, mask=ok, other=0.0)
        sum_g = tl.load(sum_g_ptr + at, mask=ok, other=0.0)
        mean = tl.load(mean_ptr + at, mask=ok, other=0.0)
        if TRAINING:
            std = tl.load(std_ptr + at, mask=ok, other=0.0)
            t_c = g * mean - center_b[None, :]
            mean_shift = (grad_beta_b * k / B)[None, :]
            d_t = d_m2[None, :] * (2.0 * n) * t_c - mean_shift
            d_g = (sum_xg * k[None, :] + mean * (sum_g * k[None, :] - mean_shift)
                   + d_m2[None, :] * (2.0 * (n - 1.0) * g * std * std + (2.0 * n) * t_c * mean))
            tl.store(d_std_ptr + at, d_m2[None, :] * 2.0 * (n - 1.0) * g * g * std, mask=ok)
            tl.store(d_mean_ptr + at, d_t * g, mask=ok)
        else:
            d_g = (sum_xg + mean * sum_g) * k[None, :]
        d_zn = tl.where(ok & (z_n > -3.0) & (z_n < 3.0), d_g / 6.0, 0.0)  # (hsig's backward)
        if HAS_BN_A:
            grad_gamma_a += tl.sum(d_zn * z_hat, 0)
            grad_beta_a += tl.sum(d_zn, 0)
            d_zh = d_zn * gamma_a[None, :]
            if TRAINING:
                sum_dzh += tl.sum(d_zh, 0)
                sum_dzh_zhat += tl.sum(d_zh * z_hat, 0)
                d_z = d_zh  # (dL/dz_hat, for pass 3)
            else:
                d_z = d_zh * inv_a[None, :]
                grad_bias += tl.sum(d_z, 0)
        else:
            d_z = d_zn
            grad_bias += tl.sum(d_z, 0)
        tl.store(dz_ptr + at, d_z, mask=ok)
    if HAS_BN_A and TRAINING:
        # Pass 3: through BN_a's batch statistics,
        # dz = inv_a (dz_hat - mean_b dz_hat - z_hat mean_b(dz_hat z_hat)).
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            ok = (offs_b < B)[:, None] & o_ok[None, :]
            at = offs_b[:, None] * C2 + offs_o[None, :]
            _, z_hat, _ = _gate_value(tl.load(z_ptr + at, mask=ok, other=0.0), mu_a, inv_a,
                                      gamma_a, beta_a, HAS_BN_A)
            d_zh = tl.load(dz_ptr + at, mask=ok, other=0.0)
            d_z = inv_a[None, :] * (d_zh - (sum_dzh / B)[None, :]
                                    - z_hat * (sum_dzh_zhat / B)[None, :])
            d_z = tl.where(ok, d_z, 0.0)
            grad_bias += tl.sum(d_z, 0)
            tl.store(dz_ptr + at, d_z, mask=ok)
    tl.store(grads_ptr + offs_o, grad_bias, mask=o_ok)
    tl.store(grads_ptr + C2 + offs_o, grad_gamma_a, mask=o_ok)
    tl.store(grads_ptr + 2 * C2 + offs_o, grad_beta_a, mask=o_ok)
    tl.store(grads_ptr + 3 * C2 + offs_o, dot * inv_b, mask=o_ok)
    tl.store(grads_ptr + 4 * C2 + offs_o, grad_beta_b, mask=o_ok)


@triton.jit
def _channel_gate_input_grad_kernel(
    dz_ptr,  # (B, C2) fp32 contiguous: dL/dz
    w_ptr,  # (C2, C2, 1, 2) W_ch, contiguous: w[o, i, 0, j] mixes (mean, std)[j] of channel i
    std_ptr,  # (B, C2) fp32 contiguous: the unbiased std of X2
    d_mean_ptr, d_std_ptr,  # (B, C2) fp32 contiguous: the gradients through BN_b's batch
                            # statistics (read if TRAINING)
    slope_ptr,  # (B, C2) fp32 contiguous, written: dstd / ((H W - 1) std), 0 where std = 0
    offset_ptr,  # (B, C2) fp32 contiguous, written: dmean / (H W)
    B, C2,
    PIXELS,  # H * W
    TRAINING: tl.constexpr,
    BLOCK_B: tl.constexpr,  # samples per program
    BLOCK_O: tl.constexpr,  # channels of z per step
    BLOCK_I: tl.constexpr,  # channels of the statistics per program
):
    # grid: (ceil(C2 / BLOCK_I) * ceil(B / BLOCK_B),), a block of samples' channel blocks in
    # turn: dL/d[mean, std] = dz . W_ch (+ the BatchNorm's part), as the input gradient's
    # per-(b, c) slope and offset.
    pid_i, pid_b = program_of_sample(tl.cdiv(C2, BLOCK_I))
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_b = pid_b.to(tl.int32) * BLOCK_B + tl.arange(0, BLOCK_B)
    i_ok = offs_i < C2
    b_ok = offs_b < B
    ok = b_ok[:, None] & i_ok[None, :]
    at = offs_b[:, None] * C2 + offs_i[None, :]
    if TRAINING:
        d_mean = tl.load(d_mean_ptr + at, mask=ok, other=0.0)
        d_std = tl.load(d_std_ptr + at, mask=ok, other=0.0)
    else:
        d_mean = tl.zeros((BLOCK_B, BLOCK_I), dtype=tl.float32)
        d_std = tl.zeros((BLOCK_B, BLOCK_I), dtype=tl.float32)
    for o0 in range(0, C2, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < C2
        d_z = tl.load(dz_ptr + offs_b[:, None] * C2 + offs_o[None, :],
                      mask=b_ok[:, None] & o_ok[None, :], other=0.0)
        oi = (offs_o[:, None] * C2 + offs_i[None, :]) * 2  # (BLOCK_O, BLOCK_I): w[o, i, 0, 0]
        oi_ok = o_ok[:, None] & i_ok[None, :]
        w_mean = tl.load(w_ptr + oi, mask=oi_ok, other=0.0).to(tl.float32)
        w_std = tl.load(w_ptr + oi + 1, mask=oi_ok, other=0.0).to(tl.float32)
        d_mean = tl.dot(d_z, w_mean, d_mean, input_precision="ieee")
        d_std = tl.dot(d_z, w_std, d_std, input_precision="ieee")
    n = PIXELS * 1.0
    std = tl.load(std_ptr + at, mask=ok, other=1.0)
    # Tensor.std's backward: d std / d x = (x - mean) / ((n - 1) std), and 0 where std = 0.
    slope = d_std / ((n - 1.0) * tl.where(std == 0.0, 1.0, std))  # (std NaN: NaN, as torch)
    tl.store(slope_ptr + at, tl.where(std == 0.0, 0.0, slope), mask=ok)
    tl.store(offset_ptr + at, d_mean / n, mask=ok)


@triton.jit
def _channel_gate_weight_grad_kernel(
    dz_ptr,  # (B, C2) fp32 contiguous: dL/dz
    mean_ptr, std_ptr,  # (B, C2) fp32 contiguous: the statistics of X2
    grad_w_ptr,  # (C2, C2, 1, 2) fp32 contiguous, written: sum_b dz[b, o] [mean, std][b, i]
    B, C2,
    BLOCK_B: tl.constexpr,  # samples per step
    BLOCK_O: tl.constexpr,  # output channels (of z) per program
    BLOCK_I: tl.constexpr,  # input channels (of the statistics) per program
):
    # grid: (ceil(C2 / BLOCK_O), ceil(C2 / BLOCK_I))
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = offs_o < C2
    i_ok = offs_i < C2
    grad_mean = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    grad_std = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        d_z_t = tl.load(dz_ptr + offs_b[None, :] * C2 + offs_o[:, None],
                        mask=o_ok[:, None] & b_ok[None, :], other=0.0)  # (BLOCK_O, BLOCK_B)
        bi = offs_b[:, None] * C2 + offs_i[None, :]
        bi_ok = b_ok[:, None] & i_ok[None, :]
        grad_mean = tl.dot(d_z_t, tl.load(mean_ptr + bi, mask=bi_ok, other=0.0), grad_mean,
                           input_precision="ieee")
        grad_std = tl.dot(d_z_t, tl.load(std_ptr + bi, mask=bi_ok, other=0.0), grad_std,
                          input_precision="ieee")
    oi = (offs_o[:, None] * C2 + offs_i[None, :]) * 2
    oi_ok = o_ok[:, None] & i_ok[None, :]
    tl.store(grad_w_ptr + oi, grad_mean, mask=oi_ok)
    tl.store(grad_w_ptr + oi + 1, grad_std, mask=oi_ok)


@triton.jit
def _channel_grad_sums_kernel(
    x_ptr,  # (B, C1 + C2, H, W) X, any strides; channels [C1, C1 + C2) read
    gy_ptr,  # (B, C1 + C2, H, W) dY, any strides; channels [C1, C1 + C2) read
    center_ptr,  # (B, C2) fp32 contiguous: the per-(b, c) mean of X2
    sum_xg_ptr,  # (B, C2) fp32 contiguous: sum over H * W of dY2 * (X2 - center)
    sum_g_ptr,  # (B, C2) fp32 contiguous: sum over H * W of dY2
    C1, C2, H, W,
    x_sb, x_sc, x_sh, x_sw,  # strides of x (elements)
    g_sb, g_sc, g_sh, g_sw,  # strides of gy (elements)
    BLOCK_P: tl.constexpr,  # pixels per step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # grid: (ceil(C2 / BLOCK_C) * B,), a sample's channel blocks in turn
    pid_c, pid_b = program_of_sample(tl.cdiv(C2, BLOCK_C))
    offs_c = C1 + pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C1 + C2
    x_base = x_ptr + pid_b * x_sb + offs_c * x_sc
    g_base = gy_ptr + pid_b * g_sb + offs_c * g_sc
    coef = pid_b * C2 + offs_c - C1
    center = tl.load(center_ptr + coef, mask=c_ok, other=0.0)
    n = H * W
    acc_xg = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, n, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        h = offs_p // W
        w = offs_p % W
        ok = (offs_p < n)[:, None] & c_ok[None, :]
        x = tl.load(x_base[None, :] + (h * x_sh + w * x_sw)[:, None], mask=ok, other=0.0)
        g = tl.load(g_base[None, :] + (h * g_sh + w * g_sw)[:, None], mask=ok, other=0.0)
        g = g.to(tl.float32)
        acc_xg += (x.to(tl.float32) - center[None, :]) * g  # g = 0 where masked
        acc_g += g
    tl.store(sum_xg_ptr + coef, tl.sum(acc_xg, 0), mask=c_ok)
    tl.store(sum_g_ptr + coef, tl.sum(acc_g, 0), mask=c_ok)


@triton.jit
def _conv3x3_affine_kernel(
    src_ptr,  # (B, C1 + C2, H, W) any strides: X (forward) or dY (input gradient)
    aux_ptr,  # (B, C1 + C2, H, W) any strides: X, channels [C1, C1 + C2) read (only if HAS_AUX)
    dst_ptr,  # (B, C1 + C2, H, W) output, any strides
    w_ptr,  # (9, C1, C1) contiguous, [tap = 3 * ky + kx, in channel, out channel], src dtype
    scale_ptr,  # (B, C2) fp32 contiguous: a, the multiplier of src2
    offset_ptr,  # (B, C2) fp32 contiguous: added to every pixel
    center_ptr,  # (B, C2) fp32 contiguous: subtracted from aux2 (only if HAS_AUX)
    slope_ptr,  # (B, C2) fp32 contiguous: the multiplier of aux2 - center (only if HAS_AUX)
    C1, C2, H, W,
    src_sb, src_sc, src_sh, src_sw,  # strides of src (elements)
    aux_sb, aux_sc, aux_sh, aux_sw,  # strides of aux (elements)
    dst_sb, dst_sc, dst_sh, dst_sw,  # strides of dst (elements)
    BLOCK_P: tl.constexpr,  # pixels per program (flattened h * W + w)
    BLOCK_CI: tl.constexpr,  # conv input channels per tl.dot
    BLOCK_CO: tl.constexpr,  # conv output channels per program
    BLOCK_C2: tl.constexpr,  # X2 channels per affine step
    HAS_AUX: tl.constexpr,  # add (aux2 - center) * slope (the input gradient)
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (ceil(H * W / BLOCK_P) * B, 1, ceil(C1 / BLOCK_CO)), a sample's pixel tiles in turn
    pid_p, pid_b = program_of_sample(tl.cdiv(H * W, BLOCK_P))
    pid_co = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < H * W
    h = offs_p // W
    w = offs_p % W
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C1
    src = src_ptr + pid_b * src_sb
    dst = dst_ptr + pid_b * dst_sb
    out_ty = dst_ptr.dtype.element_ty

    acc = conv3x3_tile(src, w_ptr, C1, H, W, src_sc, src_sh, src_sw, h, w, p_ok, offs_co, co_ok,
                       BLOCK_P, BLOCK_CI, BLOCK_CO, UPCAST)
    out_pix = h * dst_sh + w * dst_sw
    tl.store(dst + out_pix[:, None] + offs_co[None, :] * dst_sc, acc.to(out_ty),
             mask=p_ok[:, None] & co_ok[None, :])

    # Output-channel program j maps X2 channel blocks j, j + n_co, ... of its pixel tile.
    in_pix = h * src_sh + w * src_sw
    aux_pix = h * aux_sh + w * aux_sw
    step = tl.num_programs(2) * BLOCK_C2
    for c0 in range(pid_co * BLOCK_C2, C2, step):
        offs_c = c0 + tl.arange(0, BLOCK_C2)
        c_ok = offs_c < C2
        ok = p_ok[:, None] & c_ok[None, :]
        coef = pid_b * C2 + offs_c
        scale = tl.load(scale_ptr + coef, mask=c_ok, other=0.0)
        offset = tl.load(offset_ptr + coef, mask=c_ok, other=0.0)
        v = tl.load(src + in_pix[:, None] + (C1 + offs_c)[None, :] * src_sc, mask=ok, other=0.0)
        out = v.to(tl.float32) * scale[None, :] + offset[None, :]
        if HAS_AUX:
            center = tl.load(center_ptr + coef, mask=c_ok, other=0.0)
            slope = tl.load(slope_ptr + coef, mask=c_ok, other=0.0)
            a = tl.load(aux_ptr + pid_b * aux_sb + aux_pix[:, None]
                        + (C1 + offs_c)[None, :] * aux_sc, mask=ok, other=0.0)
            out += (a.to(tl.float32) - center[None, :]) * slope[None, :]
        tl.store(dst + out_pix[:, None] + (C1 + offs_c)[None, :] * dst_sc, out.to(out_ty),
                 mask=ok)


# GPU blocks of the X2 passes: (pixels per step, channels per program, warps).
_GPU_REDUCE_BLOCKS = (64, 32, 4)
_GPU_AFFINE_BLOCK_C2 = 32
# (the loop over C2 / BLOCK_I is a few steps: one stage, no pipelining; with 3 stages the
# fp16 / bf16 configuration spilled 1.4 KB per thread on sm_80, AOT machine-code report)
_GPU_GATE_BLOCKS = (32, 32, 32, 8)
# Chunks of the eval gate's statistics merged per step, one memory round trip each (one chunk
# a step made 49 round trips in a row at 56 x 56 in 64-pixel tiles; now 13): 2 x 4 x 32 x 32
# fp32 per step in 8 warps, no spill on sm_90 / sm_80 (116-128 registers under Triton 3.9,
# 214-220 under 3.6, the GPU machines'; 8 chunks a step spilled 112-136 B under 3.6, 4 chunks
# in 4 warps 16 B on sm_90). 2 under the interpreter (the tests' 3 chunks then take a full
# step and a partial one).
_GPU_GATE_CHUNKS_PER_STEP = 4


def _gate_chunks_per_step(interpret: bool = INTERPRET) -> int:
    return 2 if interpret else _GPU_GATE_CHUNKS_PER_STEP


def _reduce_blocks(c2: int, hw: int, interpret: bool = INTERPRET):
    """(BLOCK_P, BLOCK_C, num_warps) of the statistics and gradient-sum kernels."""
    if interpret:  # few, big programs under the interpreter (13 x 13 maps still take 2 steps)
        return block(hw, high=128), block(c2, high=64), 4
    return _GPU_REDUCE_BLOCKS


def _gate_blocks(b: int, c2: int, interpret: bool = INTERPRET):
    """(BLOCK_B, BLOCK_O, BLOCK_I, num_warps) of the gate kernel."""
    if interpret:  # one program for the small test shapes
        return block(b, high=64), block(c2, high=64), block(c2, high=64), 4
    return _GPU_GATE_BLOCKS


def _affine_block_c2(c2: int, interpret: bool = INTERPRET) -> int:
    return block(c2, high=64) if interpret else _GPU_AFFINE_BLOCK_C2


def _check_coefficients(b: int, c2: int, *coefs: torch.Tensor) -> None:
    for t in coefs:
        assert t.dtype == torch.float32 and t.shape == (b, c2) and t.is_contiguous(), \
            f"coefficients must be ({b}, {c2}) contiguous fp32, got {t.dtype} {tuple(t.shape)}"


def _stats(x: torch.Tensor, c1: int, chunk_pixels: int, sum_of_squares: bool
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    c2 = c - c1
    chunks = cdiv(h * w, chunk_pixels)
    mean = torch.empty((b, chunks, c2), device=x.device, dtype=torch.float32)
    dev = torch.empty_like(mean)
    block_p, block_c, warps = _reduce_blocks(c2, h * w)
    _channel_stats_kernel[(cdiv(c2, block_c) * b, 1, chunks)](
        x, mean, dev, c1, c2, h, w, chunk_pixels, *_strides(x),
        SUM_OF_SQUARES=sum_of_squares, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return mean, dev


def channel_stats(x: torch.Tensor, c1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (b, c) mean and unbiased std over H * W of x[:, c1:], each (B, C2) fp32 contiguous."""
    mean, std = _stats(x, c1, max(1, x.shape[2] * x.shape[3]), sum_of_squares=False)
    return mean.squeeze(1), std.squeeze(1)


# The programs the chunked statistics aim for (B x channel blocks x chunks): enough to fill
# the 132 SMs of an H100 / H200 several times over when the batch alone does not.
_STATS_PROGRAMS = 1024
# Pixels per chunk under the interpreter: small, so that the tests' maps take several chunks
# (the last one shorter) and the gate's merge is exercised.
_INTERPRET_CHUNK_PIXELS = 32


def stats_chunk_pixels(b: int, c2: int, pixels: int, interpret: bool = INTERPRET) -> int:
    """S, the pixels per chunk :func:`channel_chunk_stats` takes (a power of two): on a GPU
    enough chunks to bring the programs to about _STATS_PROGRAMS, at least BLOCK_P pixels
    each; a function of the shape alone (the op's fake uses it)."""
    if interpret:
        return _INTERPRET_CHUNK_PIXELS
    block_p, block_c, _ = _reduce_blocks(c2, pixels, interpret=False)
    wanted = cdiv(_STATS_PROGRAMS, b * cdiv(c2, block_c))
    return max(block_p, chunk_pixels(pixels, wanted))


def chunk_stats_shape(x: torch.Tensor, c1: int) -> Tuple[int, int, int]:
    """(B, T, C2): the shape of each of :func:`channel_chunk_stats`'s outputs (the op's fake)."""
    b, c, h, w = x.shape
    return b, cdiv(h * w, stats_chunk_pixels(b, c - c1, h * w)), c - c1


def channel_chunk_stats(x: torch.Tensor, c1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The statistics of X2 = x[:, c1:] per pixel chunk, split over H * W for parallelism:
    (mean, sum of squared deviations from it), each (B, T, C2) fp32 contiguous, in T chunks of
    :func:`stats_chunk_pixels` pixels (the last one the rest), merged by :func:`channel_gate`."""
    b, c, h, w = x.shape
    return _stats(x, c1, stats_chunk_pixels(b, c - c1, h * w), sum_of_squares=True)


def channel_gate(mean: torch.Tensor, std: torch.Tensor, pixels: int, cfc_weight: torch.Tensor,
                 cfc_bias: Optional[torch.Tensor], bn_a: Optional[tuple], bn_b: tuple,
                 training: bool = False) -> Tuple[torch.Tensor, ...]:
    """The gate, one kernel: (scale a, shift d) of Y2 = X2 * a + d and what the backward needs.

    mean, std: (B, C2) fp32 contiguous (:func:`channel_stats`), or in eval (B, T, C2) per-chunk
    means and sums of squared deviations in the chunks of
    :func:`patnet_kernels._types.chunk_layout` (:func:`channel_chunk_stats`, or the block's MLP
    kernel), merged here; pixels: H * W; cfc_weight: (C2, C2, 1, 2) contiguous;
    cfc_bias: (C2,) or None; bn_a: None (folded into W_ch) or (weight, bias, running_mean,
    running_var, eps), bn_b the same (weight / bias None without affine, running statistics
    None if absent: read in eval only), every tensor (C2,) contiguous; training: normalise
    with the batch's statistics (one program per channel block then, over every sample).

    Returns fp32 contiguous (scale (B, C2), shift (B, C2), z (B, C2): the mix W_ch . [mean,
    std] + bias, moments (4, C2): the mean and 1 / sqrt(var + eps) BN_a normalised with (0 and 1
    without BN_a) then BN_b's, batch (4, C2) in training: BN_a's batch mean and unbiased
    variance (zeros without BN_a) then BN_b's; (0, C2) in eval).
    """
    b, c2 = mean.shape[0], mean.shape[-1]
    chunks = mean.shape[1] if mean.dim() == 3 else 0
    assert not (chunks and training), "the training gate takes whole-map statistics"
    chunk_size, chunk_shift = chunk_layout(pixels, chunks) if chunks else (0, 0)
    if not chunks:
        _check_coefficients(b, c2, mean, std)
    scale, shift, z = (torch.empty((b, c2), device=mean.device, dtype=torch.float32)
                       for _ in range(3))
    moments = torch.empty((4, c2), device=mean.device, dtype=torch.float32)
    batch = torch.empty((4 if training else 0, c2), device=mean.device, dtype=torch.float32)
    a = bn_a if bn_a is not None else (None, None, None, None, 0.0)
    present = [t if t is not None else mean for t in (cfc_bias, *a[:4], *bn_b[:4])]
    block_b, block_o, block_i, warps = _gate_blocks(b, c2)
    grid = (cdiv(c2, block_o) * (1 if training else cdiv(b, block_b)),)
    _channel_gate_kernel[grid](
        mean, std, cfc_weight, *present, scale, shift, z, moments, batch if training else z,
        b, c2, chunks, pixels, chunk_size, chunk_shift, float(a[4]), float(bn_b[4]),
        HAS_BIAS=cfc_bias is not None, HAS_BN_A=bn_a is not None, HAS_A_W=a[0] is not None,
        HAS_A_B=a[1] is not None, HAS_B_W=bn_b[0] is not None, HAS_B_B=bn_b[1] is not None,
        TRAINING=training, BLOCK_T=_gate_chunks_per_step(), BLOCK_B=block_b, BLOCK_O=block_o,
        BLOCK_I=block_i, num_warps=warps, num_stages=1)
    return scale, shift, z, moments, batch


def channel_gate_backward(sum_xg: torch.Tensor, sum_g: torch.Tensor, mean: torch.Tensor,
                          std: torch.Tensor, pixels: int, z: torch.Tensor,
                          moments: torch.Tensor, cfc_weight: torch.Tensor,
                          a_weight: Optional[torch.Tensor], a_bias: Optional[torch.Tensor],
                          b_weight: Optional[torch.Tensor], has_a: bool, training: bool
                          ) -> Tuple[torch.Tensor, ...]:
    """The gate's backward, three kernels: from sum_xg = sum_hw dY2 (X2 - mean) and sum_g =
    sum_hw dY2 (:func:`channel_grad_sums`), each (B, C2) fp32 contiguous, and what
    :func:`channel_gate` returned (z, moments; mean, std (B, C2) its input), with cfc_weight
    (C2, C2, 1, 2) and the BatchNorms' weights (C2,) or None, all contiguous.

    Returns fp32 contiguous (slope (B, C2), offset (B, C2): the input gradient's terms
    through the statistics, see :func:`conv3x3_affine`; the gradient of cfc_weight (C2, C2,
    1, 2); grads (5, C2): those of W_ch's bias, BN_a's weight and bias (zeros without BN_a),
    BN_b's weight and bias).
    """
    b, c2 = mean.shape
    _check_coefficients(b, c2, sum_xg, sum_g, mean, std, z)
    dz, slope, offset = (torch.empty((b, c2), device=mean.device, dtype=torch.float32)
                         for _ in range(3))
    d_mean, d_std = ((torch.empty_like(dz), torch.empty_like(dz)) if training else (dz, dz))
    grads = torch.empty((5, c2), device=mean.device, dtype=torch.float32)
    grad_w = torch.empty((c2, c2, 1, 2), device=mean.device, dtype=torch.float32)
    present = [t if t is not None else mean for t in (a_weight, a_bias, b_weight)]
    block_b, block_o, block_i, warps = _gate_blocks(b, c2)
    _channel_gate_grad_kernel[(cdiv(c2, block_o),)](
        sum_xg, sum_g, mean, std, z, moments, *present, dz, d_mean, d_std, grads, b, c2, pixels,
        HAS_BN_A=has_a, HAS_A_W=a_weight is not None, HAS_A_B=a_bias is not None,
        HAS_B_W=b_weight is not None, TRAINING=training, BLOCK_B=block_b, BLOCK_O=block_o,
        num_warps=warps, num_stages=1)
    _channel_gate_input_grad_kernel[(cdiv(c2, block_i) * cdiv(b, block_b),)](
        dz, cfc_weight, std, d_mean, d_std, slope, offset, b, c2, pixels, TRAINING=training,
        BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=warps, num_stages=1)
    _channel_gate_weight_grad_kernel[(cdiv(c2, block_o), cdiv(c2, block_i))](
        dz, mean, std, grad_w, b, c2, BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_I=block_i,
        num_warps=warps, num_stages=1)
    return slope, offset, grad_w, grads


def channel_grad_sums(x: torch.Tensor, grad_y: torch.Tensor, center: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_hw dY2 * (X2 - center), sum_hw dY2), each (B, C2) fp32 contiguous.

    X2 = x[:, C1:] with C1 = C - C2; center: (B, C2) fp32 contiguous (the mean of X2).
    """
    b, c, h, w = x.shape
    c2 = center.shape[1]
    c1 = c - c2
    _check_coefficients(b, c2, center)
    sum_xg = torch.empty((b, c2), device=x.device, dtype=torch.float32)
    sum_g = torch.empty((b, c2), device=x.device, dtype=torch.float32)
    block_p, block_c, warps = _reduce_blocks(c2, h * w)
    _channel_grad_sums_kernel[(cdiv(c2, block_c) * b,)](
        x, grad_y, center, sum_xg, sum_g, c1, c2, h, w, *_strides(x), *_strides(grad_y),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return sum_xg, sum_g


def conv3x3_affine(src: torch.Tensor, weight_taps: torch.Tensor, dst: torch.Tensor,
                   scale: torch.Tensor, offset: torch.Tensor, aux: Optional[torch.Tensor] = None,
                   center: Optional[torch.Tensor] = None, slope: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """dst = [conv3x3(src1) | src2 * scale + offset (+ (aux2 - center) * slope)].

    src, dst, aux: (B, C, H, W), any strides, same dtype; weight_taps: (9, C1, C1) [tap, in,
    out] contiguous (``forward_taps`` / ``transposed_taps`` of partial_conv); scale, offset,
    center, slope: (B, C2) fp32 contiguous, broadcast over H and W. dst must not overlap src
    or aux. Returns dst.
    """
    b, c, h, w = src.shape
    c1 = weight_taps.shape[1]
    c2 = c - c1
    has_aux = aux is not None
    _check_coefficients(b, c2, scale, offset, *((center, slope) if has_aux else ()))
    if not has_aux:  # never read: any valid pointer
        aux, center, slope = src, scale, scale
    block_p, block_ci, block_co, warps = _conv_blocks(c1, src.dtype)
    grid = (cdiv(h * w, block_p) * b, 1, cdiv(c1, block_co))
    _conv3x3_affine_kernel[grid](
        src, aux, dst, weight_taps, scale, offset, center, slope, c1, c2, h, w,
        *_strides(src), *_strides(aux), *_strides(dst),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, BLOCK_C2=_affine_block_c2(c2),
        HAS_AUX=has_aux, UPCAST=upcast_dot(src.dtype), num_warps=warps)
    return dst


# (imported here, below the jit functions: a line added above them changes their cache keys)
from ._common import RELEASED_PATNET, RELEASED_PATNET_T1, distinct_configurations  # noqa: E402


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check."""
    kernels = []
    block_p, block_c, warps = _GPU_REDUCE_BLOCKS
    for dtype, tname in TRITON_DTYPE.items():
        ptr = "*" + tname
        fn = _channel_stats_kernel
        for sum_of_squares in (False, True):
            kernels.append(AotKernel(
                f"channel_stats[{tname}, chunked={sum_of_squares}]", fn,
                aot_signature(fn, {"x_ptr": ptr, "mean_ptr": "*fp32", "dev_ptr": "*fp32"}),
                dict(SUM_OF_SQUARES=sum_of_squares, BLOCK_P=block_p, BLOCK_C=block_c),
                num_warps=warps, launches=activation_launches("x")))
        fn = _channel_grad_sums_kernel
        kernels.append(AotKernel(
            f"channel_grad_sums[{tname}]", fn,
            aot_signature(fn, {"x_ptr": ptr, "gy_ptr": ptr, "center_ptr": "*fp32",
                               "sum_xg_ptr": "*fp32", "sum_g_ptr": "*fp32"}),
            dict(BLOCK_P=block_p, BLOCK_C=block_c), num_warps=warps,
            launches=activation_launches("x", "g")))
    g_b, g_o, g_i, g_warps = _GPU_GATE_BLOCKS
    gate_blocks = dict(BLOCK_B=g_b, BLOCK_O=g_o)
    for wname in ("fp32", "fp16", "bf16"):  # W_ch in the activations' dtype
        fn = _channel_gate_kernel
        bn_a = ("a_w_ptr", "a_b_ptr", "a_mean_ptr", "a_var_ptr")
        bn_b = ("b_w_ptr", "b_b_ptr", "b_mean_ptr", "b_var_ptr")
        # W_ch's bias and the BatchNorms' vectors fp32, or in W_ch's dtype (a model cast to
        # fp16 / bf16, not autocast; the launcher's placeholders for those not read fp32)
        for vname in ("fp32",) if wname == "fp32" else ("fp32", wname):
            cast = "" if vname == "fp32" else f", vectors {vname}"
            # inference (BN_a folded into W_ch, or not), and training
            for has_bn_a, training in ((False, False), (True, False), (True, True)):
                read = (bn_a if has_bn_a else ("bias_ptr",)) + bn_b
                sig = aot_signature(fn, {"mean_ptr": "*fp32", "std_ptr": "*fp32",
                                         "w_ptr": "*" + wname, "scale_ptr": "*fp32",
                                         "shift_ptr": "*fp32", "z_ptr": "*fp32",
                                         "moments_ptr": "*fp32", "batch_ptr": "*fp32",
                                         **{v: "*" + (vname if v in read else "fp32")
                                            for v in ("bias_ptr",) + bn_a + bn_b}},
                                    {"eps_a": "fp32", "eps_b": "fp32"})
                kernels.append(AotKernel(
                    f"channel_gate[{wname}{cast}, bn_a={has_bn_a}, training={training}]", fn,
                    sig, dict(HAS_BIAS=not has_bn_a, HAS_BN_A=has_bn_a, HAS_A_W=has_bn_a,
                              HAS_A_B=has_bn_a, HAS_B_W=True, HAS_B_B=True, TRAINING=training,
                              BLOCK_T=_gate_chunks_per_step(interpret=False), BLOCK_I=g_i,
                              **gate_blocks), num_warps=g_warps, num_stages=1))
        fn = _channel_gate_input_grad_kernel
        sig = aot_signature(fn, {name: "*fp32" for name in fn.arg_names if name.endswith("_ptr")}
                            | {"w_ptr": "*" + wname})
        for training in (False, True):
            kernels.append(AotKernel(
                f"channel_gate_input_grad[{wname}, training={training}]", fn, sig,
                dict(TRAINING=training, BLOCK_I=g_i, **gate_blocks), num_warps=g_warps,
                num_stages=1))
    fn = _channel_gate_grad_kernel  # (every tensor fp32; the BatchNorms' weights and BN_a's
    for vname in ("fp32", "fp16", "bf16"):  # bias also in a model cast to fp16 / bf16)
        sig = aot_signature(fn, {name: "*" + vname if name in ("a_w_ptr", "a_b_ptr", "b_w_ptr")
                                 else "*fp32" for name in fn.arg_names if name.endswith("_ptr")})
        cast = "" if vname == "fp32" else f"vectors {vname}, "
        for training in (False, True):
            kernels.append(AotKernel(
                f"channel_gate_grad[{cast}training={training}]", fn, sig,
                dict(HAS_BN_A=True, HAS_A_W=True, HAS_A_B=True, HAS_B_W=True,
                     TRAINING=training, **gate_blocks), num_warps=g_warps, num_stages=1))
    fn = _channel_gate_weight_grad_kernel
    kernels.append(AotKernel(
        "channel_gate_weight_grad", fn,
        aot_signature(fn, {name: "*fp32" for name in fn.arg_names if name.endswith("_ptr")}),
        dict(BLOCK_I=g_i, **gate_blocks), num_warps=g_warps, num_stages=1))
    # PAT_ch's conv: C1 = C / 4 at PATNet's stages 1-3 (E, 2E, 4E channels)
    for c1 in sorted({(e << stage) // 4 for e, _ in RELEASED_PATNET + (RELEASED_PATNET_T1,)
                      for stage in range(3)}):
        for dtype, tname in TRITON_DTYPE.items():
            p, ci, co, warps = _conv_blocks(c1, dtype, interpret=False)
            ptr = "*" + tname
            fn = _conv3x3_affine_kernel
            sig = aot_signature(fn, {"src_ptr": ptr, "aux_ptr": ptr, "dst_ptr": ptr,
                                     "w_ptr": ptr, "scale_ptr": "*fp32", "offset_ptr": "*fp32",
                                     "center_ptr": "*fp32", "slope_ptr": "*fp32"})
            for has_aux in (False, True):
                kernels.append(AotKernel(
                    f"conv3x3_affine[{tname}, CI={ci}, CO={co}, aux={has_aux}]", fn, sig,
                    dict(BLOCK_P=p, BLOCK_CI=ci, BLOCK_CO=co, BLOCK_C2=_GPU_AFFINE_BLOCK_C2,
                         HAS_AUX=has_aux, UPCAST=upcast_dot(dtype, interpret=False)),
                    num_warps=warps, launches=activation_launches("src", "aux", "dst")))
    return distinct_configurations(kernels)
