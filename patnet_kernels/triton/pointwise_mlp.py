"""Triton kernel of the block's MLP in inference, hidden activation kept on chip.

Y = W2 . act(W1 . X + b1) + b2 [+ R] over (B, C, H, W) activations (NCHW, channels_last, or any
strides whose H and W merge into one pixel stride). Each program takes a tile of pixels of one
sample and a block of output channels and runs the hidden dimension in chunks: a chunk of
act(W1 . X + b1) is computed (a [pixels x C] x [C x chunk] GEMM), cast to the input dtype and at
once multiplied into the output accumulator ([pixels x chunk] x [chunk x out]), flash-MLP style,
so the hidden activation (2C channels in the released models) is never written to memory. Bias,
activation and residual are epilogues: X is read once, R once, Y written once. A program
holds one block of output channels (up to 256) and computes the hidden activation for it, so
past 256 output channels the default is two passes (``Config.two_pass``, the ONE_LAYER mode):
the first writes act(W1 . M + b1), the mixer computed as below, the second reads it back for
W2, its bias, the residual and the statistics. A second accumulator per program
(``Config.block_n2``) is a tuning option (see :func:`default_config`).

As a whole FasterNet or PAT_ch block runs it, the MLP's input is the mixer's output computed on
the fly: channels [0, C1) are conv3x3(X1) of the program's pixel tile, computed once before the
hidden loop (``partial_conv.conv3x3_tile``, the one-pixel halo re-read from cache) and kept on
chip; channels [C1, C) are X2, through PAT_ch's per-(sample, channel) affine map where given.
The epilogue can also take the statistics of the output's last channels per pixel tile (mean
and sum of squared deviations): the next PAT_ch block's gate reads them instead of X2. And it
can run PAT_sp on the MLP's output M before the residual (PATNet-T1's blocks): one program then
holds the whole output in two accumulators, Ma and Mb, and writes [BN_c(Ma * hsig(w . Ma)) |
conv1x1(BN_d(Mb)) + bias], PAT_sp's conv a third GEMM on the tile, so M is never written.

Tiles of one sample leave each sample's last tile partly empty where BLOCK_P does not divide
its H * W (196 pixels at 14 x 14 in 4 tiles of 64: 1.31x the arithmetic), so there, in
channels_last, the tiles run over the samples taken as rows of one (:func:`tile_grid`), each
conv window in its own sample; with PAT_ch's per-sample affine and statistics (the SPAN mode,
fp16 / bf16) where a tile meets two samples at most, each row with its sample's affine, each
sample's rows giving its statistics (chunks: :func:`patnet_kernels._types.chunk_layout`).

* :func:`pointwise_mlp` -- the launcher; :func:`stats_chunks` -- its statistics' tiles;
  :func:`config_for` -- a launch's configuration; :func:`aot_kernels` -- the shipped ones.
"""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      batch_norm_tile, block, cdiv, dot, hardsigmoid, pixel_strides,
                      program_of_sample, samples_as_rows, store_tile_moments, upcast_dot)
from .partial_conv import conv3x3_tile

# The activation constexpr of the kernel, by the reference's name.
ACTIVATION_CODES = {"relu": 0, "gelu": 1}
IDENTITY = 2  # (no activation: the second pass of a two-pass MLP)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """ReLU (0), the exact GELU (1), 0.5 z (1 + erf(z / sqrt 2)), or none (2) on an fp32 tile;
    ReLU and GELU keep NaN, as torch's (tl.maximum(NaN, 0) would give 0)."""
    if ACTIVATION == 0:
        return tl.where(z < 0.0, 0.0, z)
    if ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _first_layer(x, scale_row, shift_row, conv, offs_c1, c1_ok, w1_ptr, b1_ptr, offs_h, h_ok,
                 p_ok, in_next, has_next, C, C_HEAD, x_sc, HAS_AFFINE: tl.constexpr,
                 HAS_B1: tl.constexpr, CONV_HEAD: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
                 SPAN: tl.constexpr):
    """W1[offs_h] . M + b1[offs_h] on the program's pixel tile, (BLOCK_P, BLOCK_H) fp32, M =
    [conv | x[:, C_HEAD:] * scale + shift]: ``conv`` the conv head's (BLOCK_P, BLOCK_C1) tile
    (CONV_HEAD), ``x`` the tile's (BLOCK_P, 1) pixel rows, ``scale_row`` / ``shift_row`` the
    affine of the tile's (first) sample; SPAN: the rows ``in_next`` (BLOCK_P,) take the next
    sample's, which follows at C - C_HEAD (read if ``has_next``). W1 (rows, C) contiguous. A
    chunk of the hidden activation before it, or with ONE_LAYER a block of the output."""
    hidden = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    if CONV_HEAD:
        w1_head = tl.load(w1_ptr + offs_h[None, :] * C + offs_c1[:, None],
                          mask=c1_ok[:, None] & h_ok[None, :], other=0.0)  # (BLOCK_C1, BLOCK_H)
        hidden = dot(conv, w1_head, hidden, UPCAST)
    for k0 in range(C_HEAD, C, BLOCK_K):  # hidden += M[:, k0:k0 + BLOCK_K] . W1^T
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        m = tl.load(x + offs_k[None, :] * x_sc, mask=p_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_P, BLOCK_K)
        if HAS_AFFINE:  # (in fp32, rounded to x's dtype as PAT_ch's apply pass writes it)
            a = tl.load(scale_row + offs_k, mask=k_ok, other=0.0)[None, :]
            d = tl.load(shift_row + offs_k, mask=k_ok, other=0.0)[None, :]
            mapped = m.to(tl.float32) * a + d
            if SPAN:  # (the next sample's rows: its affine, one row of C - C_HEAD further)
                if has_next:
                    a_next = tl.load(scale_row + (C - C_HEAD) + offs_k, mask=k_ok, other=0.0)
                    d_next = tl.load(shift_row + (C - C_HEAD) + offs_k, mask=k_ok, other=0.0)
                    mapped = tl.where(in_next[:, None], m.to(tl.float32) * a_next[None, :]
                                      + d_next[None, :], mapped)
            m = tl.where(p_ok[:, None] & k_ok[None, :], mapped, 0.0).to(m.dtype)
        w1t = tl.load(w1_ptr + offs_h[None, :] * C + offs_k[:, None],
                      mask=k_ok[:, None] & h_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_H)
        hidden = dot(m, w1t, hidden, UPCAST)
    if HAS_B1:
        hidden += tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    return hidden


@triton.jit
def _pointwise_mlp_kernel(
    x_ptr,  # (B, C, H, W) input, any strides with a flattened pixel stride x_sp
    scale_ptr, shift_ptr,  # (B, C - C_HEAD) fp32 contiguous: M = x * scale + shift on
                           # channels [C_HEAD, C); unread unless HAS_AFFINE
    wc_ptr,  # (9, C_HEAD, C_HEAD) contiguous 3x3 conv taps, [tap = 3 * ky + kx, in channel,
             # out channel], x dtype; unread unless CONV_HEAD
    w1_ptr,  # (HIDDEN, C) contiguous, [hidden, in channel], x dtype
    b1_ptr,  # (HIDDEN,) bias of the first conv (its BatchNorm folded); unread unless HAS_B1
    w2_ptr,  # (C_OUT, HIDDEN) contiguous, [out channel, hidden], x dtype
    b2_ptr,  # (C_OUT,) bias of the second conv; unread unless HAS_B2
    r_ptr,  # (B, C_OUT, H, W) residual, any strides as x; unread unless HAS_RESIDUAL
    y_ptr,  # (B, C_OUT, H, W) output, any strides as x
    stats_mean_ptr, stats_m2_ptr,  # (B, T, C_OUT - STATS_FIRST) fp32 contiguous, written if
                                   # STATS: per pixel tile the mean and sum of squared
                                   # deviations of y[:, STATS_FIRST:] as stored (the next PAT_ch
                                   # block's X2 statistics), chunk t of a sample its rows in
                                   # tile t (T = ceil(H W / BLOCK_P)), SPAN in its first tile +
                                   # t (T one more; _types.chunk_layout)
    sg_ptr,  # (Q,) PAT_sp's gate weight w, x dtype contiguous; read if SPATIAL
    sw_ptr,  # (C_OUT - Q, C_OUT - Q) PAT_sp's 1x1 conv weight, [out, in] contiguous, x dtype;
             # read if SPATIAL
    sbias_ptr,  # (C_OUT - Q,) that conv's bias, x dtype; read if SPATIAL and SP_BIAS
    cm_ptr, cv_ptr, cw_ptr, cb_ptr,  # (Q,) fp32 each: BN_c's mean, variance, weight, bias
                                     # (SPATIAL)
    dm_ptr, dv_ptr, dw_ptr, db_ptr,  # (C_OUT - Q,) fp32 each: BN_d's (SPATIAL and SP_BN_D)
    c_eps, d_eps,  # BN_c's and BN_d's eps (SPATIAL)
    C, C_HEAD, HIDDEN, C_OUT,  # C_HEAD: channels [0, C_HEAD) of M are the conv (0: none)
    Q,  # SPATIAL: PAT_sp's gated channels, the first Q of the MLP's output (the rest its conv's)
    STATS_FIRST,  # the first output channel whose statistics are taken (if STATS)
    P,  # pixels: H * W per sample, or B * H * W with the samples taken as rows of one (the
        # launcher's choice, tile_grid: then one sample on grid axis 0, and PAT_ch's affine and
        # statistics only with SPAN)
    H, W,  # rows per sample and image width: pixel p is at row (p // W) % H of its sample,
           # column p % W
    x_sb, x_sc, x_sp,  # sample, channel and pixel strides of x (elements)
    r_sb, r_sc, r_sp,  # strides of the residual (elements)
    y_sb, y_sc, y_sp,  # strides of y (elements)
    ACTIVATION: tl.constexpr,  # 0: ReLU, 1: exact GELU (ACTIVATION_CODES), 2: none
    HAS_AFFINE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CONV_HEAD: tl.constexpr,  # M[:, :C_HEAD] = conv3x3(x[:, :C_HEAD]) (padding 1), computed
                              # once per tile and kept on chip
    STATS: tl.constexpr,  # write the statistics of y's channels [STATS_FIRST, C_OUT)
    SPATIAL: tl.constexpr,  # PAT_sp on the MLP's output M before the residual: y = [BN_c(Ma *
                            # hsig(w . Ma)) | conv1x1(BN_d(Mb)) + bias], Ma = M[:, :Q] and
                            # Mb = M[:, Q:] each in one block of BLOCK_N channels
    SP_BIAS: tl.constexpr, SP_BN_D: tl.constexpr,  # PAT_sp's conv has a bias; BN_d not folded
    ONE_LAYER: tl.constexpr,  # one 1x1 conv only, y = act(W1 . M + b1) (+ r), C_OUT = W1's
                              # rows, all of them in each program (grid axis 2 of size 1): a
                              # pass of a two-pass MLP; W2, HIDDEN, PAT_sp not read
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # input channels per step of the first GEMM
    BLOCK_H: tl.constexpr,  # hidden channels per chunk
    BLOCK_N: tl.constexpr,  # output channels per program (SPATIAL: per half, Ma and Mb)
    WIDE: tl.constexpr,  # a second accumulator for the BLOCK_N2 output channels after the
                         # first block's: a program covers BLOCK_N + BLOCK_N2 of them, the
                         # hidden activation computed once for both (not with SPATIAL)
    BLOCK_N2: tl.constexpr,  # the second accumulator's channels (SPATIAL: Mb's, = BLOCK_N)
    BLOCK_O: tl.constexpr,  # SPATIAL: output channels per step of PAT_sp's conv
    BLOCK_CI: tl.constexpr,  # conv input channels per tl.dot (CONV_HEAD)
    BLOCK_C1: tl.constexpr,  # C_HEAD rounded up to a power of two (CONV_HEAD): the whole head
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
    SPAN: tl.constexpr,  # PAT_ch's tiles over the samples taken as rows of one (tile_grid):
                         # a tile's rows in two samples at most (H W > 2 BLOCK_P), each with
                         # its sample's affine, each sample's statistics apart
):
    # grid: (ceil(P / BLOCK_P) * (B or 1), 1, output blocks), a sample's pixel tiles in turn
    # (one sample where the samples are taken as rows of one)
    pid_p, sample = program_of_sample(tl.cdiv(P, BLOCK_P))
    pid_n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    if SPAN:  # (the tile's first row's sample, and where the next one begins)
        first_sample = (pid_p * BLOCK_P) // (H * W)
        next_start = (first_sample + 1) * (H * W)
        in_next = offs_p >= next_start  # (BLOCK_P,) the next sample's rows
        has_next = next_start < tl.minimum(P, pid_p * BLOCK_P + BLOCK_P)
        chunks = (H * W + BLOCK_P - 1) // BLOCK_P + 1  # (statistics' chunks a sample)
        stats_row = first_sample * chunks + pid_p - (first_sample * H * W) // BLOCK_P
        next_row = (first_sample + 1) * chunks  # (the next sample's first chunk)
        # (a sample whose rows meet one tile fewer than it has chunks: its last chunk empty,
        # cleared by the tile holding its last row, so that every chunk is written)
        clear_after = (next_start <= pid_p * BLOCK_P + BLOCK_P) & (stats_row + 1 < next_row)
    else:
        first_sample = sample
        in_next = offs_p < 0  # (not read)
        has_next = first_sample < 0
        stats_row = first_sample * ((P + BLOCK_P - 1) // BLOCK_P) + pid_p
        next_row = stats_row  # (not read)
        clear_after = has_next
    if WIDE:
        first = pid_n * (BLOCK_N + BLOCK_N2)
    else:
        first = pid_n * BLOCK_N
    offs_n = first + tl.arange(0, BLOCK_N)
    n_ok = offs_n < (Q if SPATIAL else C_OUT)  # (SPATIAL: one program holds Ma and Mb)
    # The second accumulator's channels: Mb's (SPATIAL), or the BLOCK_N2 after the first block's
    local_b = tl.arange(0, BLOCK_N2)  # (WIDE)
    if SPATIAL:
        offs_nb = Q + local_b
    else:
        offs_nb = first + BLOCK_N + local_b
    nb_ok = offs_nb < C_OUT
    x = x_ptr + sample * x_sb + offs_p[:, None] * x_sp  # (BLOCK_P, 1) pixel rows of x
    scale_row = scale_ptr + first_sample * (C - C_HEAD) - C_HEAD  # (by input channel)
    shift_row = shift_ptr + first_sample * (C - C_HEAD) - C_HEAD
    offs_c1 = tl.arange(0, BLOCK_C1)
    c1_ok = offs_c1 < C_HEAD
    if CONV_HEAD:  # (rounded to x's dtype, as a conv writing its output would)
        rows = offs_p // W
        h = rows % H  # (the tile's pixels' rows in their own sample, whose first row each
        # conv's window is based on: no neighbour across two samples taken as rows of one)
        conv = conv3x3_tile(x_ptr + sample * x_sb + ((rows - h) * W * x_sp)[:, None], wc_ptr,
                            C_HEAD, H, W, x_sc, W * x_sp, x_sp, h, offs_p % W, p_ok, offs_c1,
                            c1_ok, BLOCK_P, BLOCK_CI, BLOCK_C1, UPCAST).to(x_ptr.dtype.element_ty)
    else:
        conv = tl.zeros((BLOCK_P, BLOCK_C1), dtype=x_ptr.dtype.element_ty)  # (not read)
    r_pix = r_ptr + sample * r_sb + offs_p[:, None] * r_sp  # (BLOCK_P, 1) pixel rows
    y_pix = y_ptr + sample * y_sb + offs_p[:, None] * y_sp
    if ONE_LAYER:  # y = act(W1 . M + b1) (+ r), every output channel, BLOCK_N at a time
        for n0 in range(0, C_OUT, BLOCK_N):  # (the conv head computed once per pixel tile)
            offs_o = n0 + tl.arange(0, BLOCK_N)
            o_ok = offs_o < C_OUT
            y1 = _first_layer(x, scale_row, shift_row, conv, offs_c1, c1_ok, w1_ptr, b1_ptr,
                              offs_o, o_ok, p_ok, in_next, has_next, C, C_HEAD, x_sc, HAS_AFFINE,
                              HAS_B1, CONV_HEAD, BLOCK_P, BLOCK_K, BLOCK_N, UPCAST, SPAN)
            _store_output(_activation(y1, ACTIVATION), offs_o, o_ok, p_ok, r_pix, y_pix, r_sc,
                          y_sc, stats_mean_ptr, stats_m2_ptr, stats_row, STATS_FIRST, C_OUT,
                          HAS_RESIDUAL, STATS, in_next, has_next, next_row,
                          clear_after, SPAN)
        return

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_N2), dtype=tl.float32)  # channels offs_nb
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HIDDEN
        hidden = _first_layer(x, scale_row, shift_row, conv, offs_c1, c1_ok, w1_ptr, b1_ptr,
                              offs_h, h_ok, p_ok, in_next, has_next, C, C_HEAD, x_sc, HAS_AFFINE,
                              HAS_B1, CONV_HEAD, BLOCK_P, BLOCK_K, BLOCK_H, UPCAST, SPAN)
        # (hidden channels past HIDDEN are act(0) = 0 and meet zero rows of W2)
        hidden = _activation(hidden, ACTIVATION).to(x_ptr.dtype.element_ty)
        w2t = tl.load(w2_ptr + offs_n[None, :] * HIDDEN + offs_h[:, None],
                      mask=h_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_N)
        acc = dot(hidden, w2t, acc, UPCAST)
        if SPATIAL or WIDE:
            w2t_b = tl.load(w2_ptr + offs_nb[None, :] * HIDDEN + offs_h[:, None],
                            mask=h_ok[:, None] & nb_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_N2)
            acc_b = dot(hidden, w2t_b, acc_b, UPCAST)

    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SPATIAL or WIDE:
            acc_b += tl.load(b2_ptr + offs_nb, mask=nb_ok, other=0.0).to(tl.float32)[None, :]
    if SPATIAL:  # (M rounded to x's dtype, as the MLP writing it would)
        ma = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        g = tl.load(sg_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        s = hardsigmoid(tl.sum(ma * g[None, :], axis=1))  # (BLOCK_P,) the gate
        ya = batch_norm_tile(ma * s[:, None], offs_n, n_ok, cm_ptr, cv_ptr, cw_ptr, cb_ptr, c_eps)
        _store_output(ya, offs_n, n_ok, p_ok, r_pix, y_pix, r_sc, y_sc, stats_mean_ptr,
                      stats_m2_ptr, stats_row, STATS_FIRST, C_OUT, HAS_RESIDUAL, STATS, in_next,
                      has_next, next_row, clear_after, SPAN)
        mb = acc_b.to(x_ptr.dtype.element_ty)
        if SP_BN_D:  # (0 past C_OUT - Q, where the weight's rows are 0 too)
            mb = batch_norm_tile(mb.to(tl.float32), local_b, nb_ok, dm_ptr, dv_ptr, dw_ptr,
                                 db_ptr, d_eps).to(x_ptr.dtype.element_ty)
        for o0 in range(0, C_OUT - Q, BLOCK_O):  # Yb, BLOCK_O output channels at a time
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_ok = offs_o < C_OUT - Q
            wt = tl.load(sw_ptr + offs_o[None, :] * (C_OUT - Q) + local_b[:, None],
                         mask=nb_ok[:, None] & o_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_O)
            yb = dot(mb, wt, tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32), UPCAST)
            if SP_BIAS:
                yb += tl.load(sbias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            _store_output(yb, Q + offs_o, o_ok, p_ok, r_pix, y_pix, r_sc, y_sc, stats_mean_ptr,
                          stats_m2_ptr, stats_row, STATS_FIRST, C_OUT, HAS_RESIDUAL, STATS,
                          in_next, has_next, next_row, clear_after, SPAN)
    else:
        _store_output(acc, offs_n, n_ok, p_ok, r_pix, y_pix, r_sc, y_sc, stats_mean_ptr,
                      stats_m2_ptr, stats_row, STATS_FIRST, C_OUT, HAS_RESIDUAL, STATS, in_next,
                      has_next, next_row, clear_after, SPAN)
        if WIDE:
            _store_output(acc_b, offs_nb, nb_ok, p_ok, r_pix, y_pix, r_sc, y_sc,
                          stats_mean_ptr, stats_m2_ptr, stats_row, STATS_FIRST, C_OUT,
                          HAS_RESIDUAL, STATS, in_next, has_next, next_row,
                          clear_after, SPAN)


@triton.jit
def _store_output(acc, offs_c, c_ok, p_ok, r_pix, y_pix, r_sc, y_sc, stats_mean_ptr,
                  stats_m2_ptr, stats_row, STATS_FIRST, C_OUT, HAS_RESIDUAL: tl.constexpr,
                  STATS: tl.constexpr, in_next, has_next, next_row, clear_after,
                  SPAN: tl.constexpr):
    """Store a tile of the output, y[pixels, offs_c] = acc (+ the residual), ``r_pix`` and
    ``y_pix`` the (BLOCK_P, 1) pixel rows of r and y; with STATS also the tile's statistics of
    its channels in [STATS_FIRST, C_OUT) as stored, at ``stats_row``: SPAN those of its first
    sample's rows there, where the tile reaches into the next sample (``has_next``) those of
    its rows ``in_next`` at ``next_row``, and where ``clear_after`` zeros at stats_row + 1 (an
    empty chunk)."""
    ok = p_ok[:, None] & c_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_pix + offs_c[None, :] * r_sc, mask=ok, other=0.0).to(tl.float32)
    out = acc.to(y_pix.dtype.element_ty)
    tl.store(y_pix + offs_c[None, :] * y_sc, out, mask=ok)
    if STATS:
        if SPAN:
            store_tile_moments(out.to(tl.float32), p_ok & (in_next == 0), offs_c, c_ok,
                               stats_mean_ptr, stats_m2_ptr, stats_row, STATS_FIRST, C_OUT)
            if has_next:
                store_tile_moments(out.to(tl.float32), p_ok & in_next, offs_c, c_ok,
                                   stats_mean_ptr, stats_m2_ptr, next_row, STATS_FIRST, C_OUT)
            if clear_after:
                keep = c_ok & (offs_c >= STATS_FIRST)
                at = (stats_row + 1) * (C_OUT - STATS_FIRST) + offs_c - STATS_FIRST
                tl.store(stats_mean_ptr + at, 0.0, mask=keep)
                tl.store(stats_m2_ptr + at, 0.0, mask=keep)
        else:
            store_tile_moments(out.to(tl.float32), p_ok, offs_c, c_ok, stats_mean_ptr,
                               stats_m2_ptr, stats_row, STATS_FIRST, C_OUT)


# (imported here, below the jit functions: a line added above them changes their cache keys)
import functools  # noqa: E402
from .tuned import listed as tuned_listed, lookup as tuned_lookup  # noqa: E402
from ._common import (RELEASED_FASTERNET, RELEASED_PATNET, RELEASED_PATNET_T1,  # noqa: E402
                      distinct_configurations)


class Config(NamedTuple):
    """Tile sizes and launch options of the kernel for one call."""
    block_p: int
    block_k: int
    block_h: int
    block_n: int
    warps: int
    stages: int
    block_ci: int = 32  # conv input channels per tl.dot, when the kernel computes a conv head
    block_o: int = 64  # output channels per step of PAT_sp's conv, when it follows
    block_n2: int = 0  # a second accumulator's output channels, after the first block's: a
                       # program covers block_n + block_n2 (0: none; not with PAT_sp)
    two_pass: bool = False  # the hidden activation through memory: one launch writes
                            # act(W1 . M + b1), a second W2 . it + b2 (+ residual), each
                            # program all output channels of its pixel tile, block_n at a
                            # time (not with PAT_sp)


def second_block(config: Config, single: bool) -> dict:
    """The kernel's WIDE and BLOCK_N2 for ``config``; ``single``: no second output block (PAT_sp
    follows, whose Mb takes the second accumulator, block_n wide; or one layer)."""
    wide = bool(config.block_n2) and not single
    return dict(WIDE=wide, BLOCK_N2=config.block_n2 if wide else config.block_n)


class SpatialAttention(NamedTuple):
    """PAT_sp after the MLP (SPEC.md section 3) as the kernel takes it; Q gated channels and
    P = C_OUT - Q conv channels."""
    gate: torch.Tensor  # (Q,) the gate weight w, contiguous, in x's dtype
    weight: torch.Tensor  # (P, P) the 1x1 conv's [out, in], contiguous, in x's dtype
    bias: Optional[torch.Tensor]  # (P,) in x's dtype, or None
    bn_c: Tuple[torch.Tensor, ...]  # BN_c's (mean, var, weight, bias), fp32 (Q,) each
    c_eps: float
    bn_d: Optional[Tuple[torch.Tensor, ...]]  # BN_d's, fp32 (P,) each, or None (folded)
    d_eps: float


def config_for(channels: int, hidden: int, out_channels: int, dtype: torch.dtype,
               conv_channels: int = 0, spatial_half: int = 0,
               device: Optional[torch.device] = None) -> Config:
    """The configuration a launch on ``device`` takes: the one tuned for its GPU architecture
    where a sweep found one faster (:mod:`patnet_kernels.triton.tuned`), else
    :func:`default_config`."""
    key = (int(channels), int(hidden), int(out_channels), int(conv_channels), int(spatial_half))
    tuned = tuned_lookup("pointwise_mlp", dtype, key, device)
    if tuned is not None:
        return Config(*tuned)
    return default_config(*key[:3], dtype, *key[3:])


@functools.lru_cache(maxsize=None)  # (a look-up per launch: its arithmetic took ~60 calls)
def default_config(channels: int, hidden: int, out_channels: int, dtype: torch.dtype,
                   conv_channels: int = 0, spatial_half: int = 0,
                   interpret: bool = INTERPRET) -> Config:
    """The kernel's configuration for these widths and dtype (``conv_channels``: C_HEAD of a
    conv head, 0 for none; ``spatial_half``: the wider of the two halves of a PAT_sp that
    follows, max(Q, P) (Q in the released split), 0 for none), untuned. The output block
    covers C_OUT up to 256 (no hidden chunk computed twice). A wider output in one pass would
    take several programs per pixel tile, each recomputing the hidden activation and the conv
    head (FasterNet-T2's 384-channel stage twice, its 768-channel stage three times: 1.5-2x
    the MLP's arithmetic, which is most of these stages' time), so it runs in two passes
    (``two_pass``): the hidden activation written once and read once, 8 C bytes per pixel more
    in fp16, under the two GEMMs' arithmetic from 384 channels on (the traffic model's
    roofline: each pass at its arithmetic), each pass's weights read once per pixel tile
    (the one-pass form reads W1 once per output block). Chosen from that model, not measured:
    ``benchmarks/sweep_pointwise_mlp.py`` times the one-pass form, and a second accumulator
    (:func:`wide_block_n2`: the hidden activation once per 512 channels, but at 64 pixels it
    spills, sm_80 280-490 B per thread at 256 + 64 channels under a conv head, sm_80 and sm_90
    at 256 + 256; at 32 pixels the weights are read from L2 twice as often per pixel), beside
    it. With PAT_sp one program holds the whole output, a block of block(max(Q, P))
    channels for each half, in 32 pixels (16 past 256 channels), hidden chunks of 32 channels from 256 on
    (fp32: 16, and PAT_sp's conv in 16-channel steps). float32 (its dots as IEEE FMAs, no tensor
    cores) takes smaller tiles, and under a conv head of 64 channels or more, or with PAT_sp,
    16 pixels per program without software pipelining; in fp16 / bf16 a conv head over 256
    channels takes 32 pixels per program: the bigger tiles spill registers there (read off the
    sm_80 / sm_90 machine code, ``python -m patnet_kernels.triton.aot``: fp32 conv heads of
    128 to 512 channels kept 400 B to 3.8 KB of stack per thread with 32 pixels and two
    stages, none now; one stage with 32 pixels spills at 64 channels; PATNet-T1's blocks with
    PAT_sp kept 64-88 B on sm_80 at 64 pixels in fp16 / bf16, 72-192 B in fp32 at 32, and its
    stage-4 MLP (Q = 192) 56 B on sm_90 with 64-channel hidden chunks, 1.3-4.3 KB in fp32)."""
    tiles = _default_tiles(channels, hidden, out_channels, dtype, conv_channels, spatial_half,
                           interpret)
    if spatial_half or out_channels <= tiles.block_n:
        return tiles
    # Each pass's programs take their outputs 128 at a time (256 spilled 32-120 B per thread
    # under a 96-channel conv head in channels_last, sm_90 and sm_80), 64 under a conv head of
    # 256 or 512 channels in fp16 / bf16 (128 spilled 8-56 B on sm_80, 8-24 B on sm_90 at
    # 512) and in fp32 under a conv head of 64 to 256 channels (32 spilled 32 B on sm_90 at
    # 256), 32 in fp32 under one of 512 (128 needed 288 KB of shared memory).
    conv_block = block(conv_channels)
    if upcast_dot(dtype, interpret=False):
        block_n = 128 if conv_block < 64 else 64 if conv_block <= 256 else 32
    else:
        block_n = 128 if conv_block < 256 else 64
    return tiles._replace(two_pass=True, block_n=block_n)


def _default_tiles(channels: int, hidden: int, out_channels: int, dtype: torch.dtype,
                   conv_channels: int, spatial_half: int, interpret: bool) -> Config:
    conv_block = block(conv_channels)
    block_n = block(spatial_half) if spatial_half else block(out_channels, high=256)
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return Config(128, block(channels, high=128), block(hidden, high=128), block_n, 4, 1,
                      block(conv_channels, high=64))
    wide_gated = spatial_half and block_n >= 256  # (PAT_sp's two accumulators of 256+)
    if upcast_dot(dtype, interpret=False):
        if conv_block >= 64 or block_n > 256 or spatial_half:
            return Config(16, 16, 16 if wide_gated else 32, block_n, 8, 1, 16,
                          16 if wide_gated else 64)
        return Config(32, 16, 32, block_n, 8, 2, 16)
    block_p = (16 if block_n > 256 else 32 if spatial_half or conv_block > 256 else 64)
    # (input channels 32 a step under a 256-channel output block, and the conv head's 16 a
    # step under one of 256 or more: at 64 and 32, PAT_ch's block and first pass spilled
    # 16-104 B where their tiles span samples, sm_90 and sm_80; 4 warps spill on sm_80)
    return Config(block_p, block(channels, high=32 if block_n >= 256 else 64),
                  32 if wide_gated else 64, block_n, 8, 3,
                  16 if conv_block >= 256 else min(conv_block, 32))


def wide_block_n2(out_channels: int, block_n: int) -> int:
    """The second accumulator's width that covers ``out_channels`` in the fewest programs of at
    most 2 ``block_n`` channels each (0 where one block holds them): 384 -> 128 (one program),
    640 -> 64 (two of 320), 768 -> 128 (two of 384), 1536 -> 256 (three of 512)."""
    if out_channels <= block_n:
        return 0
    return block(cdiv(out_channels, cdiv(out_channels, 2 * block_n)) - block_n)


def stats_chunks(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, conv_channels: int,
                 spatial_half: int = 0, config: Optional[Config] = None,
                 residual: Optional[torch.Tensor] = None) -> int:
    """T, the chunks of the kernel's output statistics on x (B, C, H, W) with these weights,
    (HIDDEN, C) and (C_OUT, HIDDEN), the conv head and PAT_sp (``spatial_half`` = max(Q, P), 0
    for none), its output laid out as x and its ``residual`` given or not: a sample's pixel
    tiles, or where the tiles span samples (:func:`tile_grid`) one more
    (:func:`patnet_kernels._types.chunk_layout`), of BLOCK_P pixels, a power of two."""
    config = config or config_for(x.shape[1], w1.shape[0], w2.shape[0], x.dtype,
                                  conv_channels, spatial_half, x.device)
    return cdiv(x.shape[2] * x.shape[3], config.block_p) + int(tile_grid(  # (int: torch 2.11
        x, x if residual is None else residual, x, config.block_p, True).span)  # fails on +bool)


class TileGrid(NamedTuple):
    """A launch's pixel tiles: ``grid`` (tiles a sample, samples) or (tiles over all pixels, 1),
    the launch's grid axis 0 their product (:func:`._common.program_of_sample`); ``pixels``
    the kernel's P; ``span``: its SPAN mode."""
    grid: Tuple[int, int]
    pixels: int
    span: bool


def tile_grid(x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, block_p: int,
              per_sample: bool) -> TileGrid:
    """The tiles of ``block_p`` pixels of a launch on x, its residual r (or y) and y, each (B,
    C, H, W): over the samples taken as the rows of one where :func:`_common.samples_as_rows`
    allows (channels_last), as the other kernels' (so that no sample's last tile runs partly
    empty); with ``per_sample`` (PAT_ch's affine or statistics) in the SPAN mode, and only
    where that saves something (block_p does not divide H * W) and H * W > 2 block_p (a tile
    meets two samples at most, and the statistics' chunk layout reads unambiguously from their
    count, :func:`patnet_kernels._types.chunk_layout`), in fp16 and bf16 (in float32, no speed
    target, the SPAN form's few more registers spilled 8-160 B on sm_90 and sm_80)."""
    b, _, h, w = x.shape
    pixels = h * w
    if ((not per_sample or pixels % block_p and pixels > 2 * block_p
         and x.dtype != torch.float32) and samples_as_rows(x, r, y)):
        return TileGrid((cdiv(b * pixels, block_p), 1), b * pixels, per_sample)
    return TileGrid((cdiv(pixels, block_p), b), pixels, False)


def pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  activation: str, y: torch.Tensor, conv_taps: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                  statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  stats_first: int = 0, spatial: Optional[SpatialAttention] = None,
                  config: Optional[Config] = None) -> torch.Tensor:
    """y = W2 . act(W1 . M + b1) + b2 [+ residual] with M = [conv3x3(x[:, :C_HEAD]) |
    x[:, C_HEAD:] * scale + shift] (no conv taps: C_HEAD = 0; no scale and shift: x as it is);
    with ``spatial``, y = PAT_sp(W2 . act(W1 . M + b1) + b2) [+ residual]; returns y.

    x: (B, C, H, W); residual and y: (B, C_OUT, H, W); each with H and W merging into one pixel
    stride (stride(2) == W * stride(3): NCHW, channels_last, channel slices of either).
    conv_taps: (9, C_HEAD, C_HEAD) contiguous, [tap, in, out]
    (:func:`patnet_kernels.triton.partial_conv.forward_taps`), or None. scale, shift:
    (B, C - C_HEAD) fp32 contiguous, both or neither. w1: (HIDDEN, C) contiguous; w2: (C_OUT,
    HIDDEN) contiguous; b1 (HIDDEN,), b2 (C_OUT,) or None; all in x's dtype. activation:
    "relu" or "gelu". y must not overlap x or the residual. ``statistics``: (mean, m2), each
    (B, :func:`stats_chunks`, C_OUT - ``stats_first``) fp32 contiguous, filled with the mean
    and sum of squared deviations of y[:, stats_first:] per chunk of pixels
    (:func:`patnet_kernels._types.chunk_layout`), or None. ``spatial``: PAT_sp's tensors
    (:class:`SpatialAttention`), or None.
    ``config``: tiles and launch options (default: :func:`config_for` x's device;
    benchmarks/sweep_pointwise_mlp.py times others).
    """
    b, c, h, w = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    c_head = conv_taps.shape[1] if conv_taps is not None else 0
    q = c_out - spatial.weight.shape[0] if spatial is not None else 0
    half = max(q, c_out - q) if spatial is not None else 0
    config = config or config_for(c, hidden, c_out, x.dtype, c_head, half, x.device)
    if spatial is not None and (config.block_n2 or config.two_pass):
        raise ValueError("with PAT_sp one program holds the whole output: no block_n2, no "
                         "two_pass")
    if config.block_n < half:
        raise ValueError(f"with PAT_sp one program holds both halves of the output, {q} and "
                         f"{c_out - q} channels: the output block must be at least "
                         f"block({half}), got {config.block_n}")
    if not config.two_pass:
        _launch(x, y, w1, b1, w2, b2, residual, ACTIVATION_CODES[activation], conv_taps, scale,
                shift, statistics, stats_first, spatial, config)
        return y
    # The hidden activation through memory: act(W1 . M + b1), then W2 . it + b2 [+ residual].
    layout = (torch.channels_last if x.stride(1) == 1 and c > 1 else torch.contiguous_format)
    act = torch.empty((b, hidden, h, w), device=x.device, dtype=x.dtype, memory_format=layout)
    _launch(x, act, w1, b1, None, None, None, ACTIVATION_CODES[activation], conv_taps, scale,
            shift, None, 0, None, config, one_layer=True)
    _launch(act, y, w2, b2, None, None, residual, IDENTITY, None, None, None, statistics,
            stats_first, None, config, one_layer=True)
    return y


def _launch(x: torch.Tensor, y: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
            w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], activation: int,
            conv_taps: Optional[torch.Tensor], scale: Optional[torch.Tensor],
            shift: Optional[torch.Tensor], statistics: Optional[Tuple[torch.Tensor, ...]],
            stats_first: int, spatial: Optional[SpatialAttention], config: Config,
            one_layer: bool = False) -> None:
    """One pass of the kernel over the pixels (arguments as :func:`pointwise_mlp`'s;
    ``activation`` its code; its tiles :func:`tile_grid`); ``one_layer``: y = act(W1 . M + b1)
    [+ residual], no W2."""
    b, c, h, w = x.shape
    c_out = w1.shape[0] if one_layer else w2.shape[0]
    hidden = w1.shape[0]
    c_head = conv_taps.shape[1] if conv_taps is not None else 0
    q = c_out - spatial.weight.shape[0] if spatial is not None else 0
    r = residual if residual is not None else y
    tiles = tile_grid(x, r, y, config.block_p, scale is not None or statistics is not None)
    chunks = cdiv(h * w, config.block_p) + int(tiles.span)  # (the statistics' a sample)
    if statistics is not None and statistics[0].shape[1] != chunks:
        raise ValueError(f"statistics of {statistics[0].shape[1]} chunks a sample, where this "
                         f"launch writes {chunks}: make them (B, stats_chunks(...), C_OUT - "
                         "stats_first) for this x and config")
    blocks = (1 if spatial is not None or one_layer else
              cdiv(c_out, config.block_n + config.block_n2))
    unused = w1  # (any pointer in x's dtype for the arguments not read)
    stats_mean, stats_m2 = statistics if statistics is not None else (unused, unused)
    sp = spatial or SpatialAttention(unused, unused, None, (unused,) * 4, 0.0, None, 0.0)
    bn_d = sp.bn_d or sp.bn_c
    _pointwise_mlp_kernel[(tiles.grid[0] * tiles.grid[1], 1, blocks)](
        x, scale if scale is not None else unused, shift if shift is not None else unused,
        conv_taps if conv_taps is not None else unused, w1, b1 if b1 is not None else unused,
        w2 if w2 is not None else unused, b2 if b2 is not None else unused, r, y,
        stats_mean, stats_m2, sp.gate, sp.weight, sp.bias if sp.bias is not None else unused,
        *sp.bn_c, *bn_d, sp.c_eps, sp.d_eps, c, c_head, hidden, c_out, q, stats_first,
        tiles.pixels, h, w,
        *pixel_strides(x), *pixel_strides(r), *pixel_strides(y),
        **kernel_constexprs(
            config, x.dtype, activation, residual is not None, scale is not None, c_head,
            statistics is not None, spatial is not None, one_layer, b1 is not None,
            b2 is not None, sp.bias is not None, sp.bn_d is not None, tiles.span),
        num_warps=config.warps, num_stages=config.stages)


def kernel_constexprs(config: Config, dtype: torch.dtype, activation: int, residual: bool,
                      affine: bool, conv_channels: int, stats: bool, spatial: bool,
                      one_layer: bool, has_b1: bool, has_b2: bool, sp_bias: bool,
                      sp_bn_d: bool, span: bool, interpret: bool = INTERPRET) -> dict:
    """The kernel's constexprs for a launch with ``config`` on ``dtype`` (``activation``: its
    code; the other flags as the kernel's; ``conv_channels``: C_HEAD, 0 for no conv head): what
    a launch passes and the AOT check compiles, in one place. Without a conv head its tile
    BLOCK_CI, not read, is 16, so that a two-pass MLP's second pass is one compile whatever
    the first pass's head."""
    conv, single = bool(conv_channels), spatial or one_layer
    return dict(
        ACTIVATION=activation, HAS_AFFINE=affine, HAS_B1=has_b1, HAS_B2=has_b2,
        HAS_RESIDUAL=residual, CONV_HEAD=conv, STATS=stats, SPATIAL=spatial,
        SP_BIAS=sp_bias, SP_BN_D=sp_bn_d, ONE_LAYER=one_layer,
        BLOCK_P=config.block_p, BLOCK_K=config.block_k, BLOCK_H=config.block_h,
        BLOCK_N=config.block_n, **second_block(config, single),
        BLOCK_O=min(config.block_o, config.block_n),
        BLOCK_CI=config.block_ci if conv else 16, BLOCK_C1=block(conv_channels),
        UPCAST=upcast_dot(dtype, interpret), SPAN=span)


def aot_kernel(config: Config, dtype: torch.dtype, activation: Optional[str], residual: bool,
               affine: bool, conv_channels: int = 0, stats: bool = False,
               spatial: bool = False, one_layer: bool = False, bias: bool = True,
               span: bool = False) -> AotKernel:
    """The kernel as launched with ``config`` on ``dtype`` activations, b1 from the folded
    BatchNorm and no b2, with this epilogue, a conv head of ``conv_channels`` (0: none), the
    output's statistics if ``stats`` and PAT_sp if ``spatial`` (BN_d folded into its conv's
    weight and bias, as the inference copy has it); ``one_layer``: a pass of the two-pass form
    (``activation`` None: its second, no activation; ``bias`` False: no b1, as the second pass
    takes the call's absent b2); ``span``: PAT_ch's tiles spanning samples (SPAN,
    :func:`tile_grid`: channels_last only)."""
    fn, tname = _pointwise_mlp_kernel, TRITON_DTYPE[dtype]
    conv_block = block(conv_channels)
    head = f", conv<={conv_block}" if conv_channels else ""
    fp32 = (("scale_ptr", "shift_ptr") if affine else ()) + (
        ("stats_mean_ptr", "stats_m2_ptr") if stats else ()) + (
        ("cm_ptr", "cv_ptr", "cw_ptr", "cb_ptr", "dm_ptr", "dv_ptr", "dw_ptr", "db_ptr")
        if spatial else ())
    second = f"+{config.block_n2}" if config.block_n2 and not one_layer else ""
    return AotKernel(
        f"pointwise_mlp{'_pass' if one_layer else ''}[{tname}, P={config.block_p}, "
        f"K={config.block_k}, N={config.block_n}{second}{head}, {activation or 'none'}, "
        f"residual={residual}, affine={affine}"
        f"{', stats' if stats else ''}{', PAT_sp' if spatial else ''}"
        f"{', span' if span else ''}]", fn,
        # (the launcher passes w1, in x's dtype, for every pointer not read)
        aot_signature(fn, {name: "*fp32" if name in fp32 else "*" + tname
                           for name in fn.arg_names if name.endswith("_ptr")},
                      {"c_eps": "fp32", "d_eps": "fp32"}),
        kernel_constexprs(config, dtype,
                          ACTIVATION_CODES[activation] if activation else IDENTITY, residual,
                          affine, conv_channels, stats, spatial, one_layer, bias, False,
                          spatial, False, span, interpret=False),
        num_warps=config.warps, num_stages=config.stages,
        launches={kind: ones for kind, ones in activation_launches(
            "x", "r", "y", pixel="sp").items() if kind == "channels_last" or not span})


def aot_launches(config: Config, dtype: torch.dtype, activation: str, residual: bool,
                 affine: bool, conv_channels: int = 0, stats: bool = False,
                 spatial: bool = False) -> List[AotKernel]:
    """The kernels one call with ``config`` launches (:func:`aot_kernel`'s arguments): one, or
    the two passes of the two-pass form (the first with the conv head, the affine, b1 and the
    activation; the second with the residual and the statistics, and as its bias the call's
    b2, which the folded models' MLPs do not have); in fp16 and bf16 a pass with the affine or
    the statistics (PAT_ch's) each also in its SPAN form (:func:`tile_grid`)."""
    spans = (False, True) if dtype != torch.float32 else (False,)
    if not config.two_pass:
        return [aot_kernel(config, dtype, activation, residual, affine, conv_channels, stats,
                           spatial, span=span) for span in spans[:1 + (affine or stats)]]
    return ([aot_kernel(config, dtype, activation, False, affine, conv_channels, one_layer=True,
                        span=span) for span in spans[:1 + affine]]
            + [aot_kernel(config, dtype, None, residual, False, stats=stats, one_layer=True,
                          bias=False, span=span) for span in spans[:1 + stats]])


def released_launches():
    """(C, activation, residual, affine, conv head, stats, PAT_sp) of each MLP launch of the
    released models' inference path (:mod:`patnet.inference`), C -> 2C -> C: FasterNet blocks
    (conv head, no gate) at widths E, 2E, 4E, 8E; PATNet's PAT_ch blocks (conv head and the
    gate's affine, and the output's statistics, which the next PAT_ch block reads) at E, 2E,
    4E and its MLPs after PAT_sf (no head) at 8E; PATNet-T1's the same, each with PAT_sp
    before the residual."""
    for e, activation in RELEASED_FASTERNET:
        for c in (e, 2 * e, 4 * e, 8 * e):
            yield c, activation, True, False, True, False, False
    for e, activation in RELEASED_PATNET:
        for c in (e, 2 * e, 4 * e):
            yield c, activation, True, True, True, True, False
        yield 8 * e, activation, True, False, False, False, False
    e, activation = RELEASED_PATNET_T1
    for c in (e, 2 * e, 4 * e):
        yield c, activation, True, True, True, True, True
    yield 8 * e, activation, True, False, False, False, True


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU for the released models
    (:func:`released_launches`; the default and any tuned one), for the ahead-of-time
    check."""
    kernels = []
    for (c, activation, residual, affine, conv, stats, spatial), dtype in itertools.product(
            released_launches(), TRITON_DTYPE):
        c_head = c // 4 if conv else 0
        half = c - c // 2 if spatial else 0  # (Q = C - int(C / 2) >= P)
        configs = [default_config(c, 2 * c, c, dtype, c_head, half, interpret=False)] + [
            Config(*fields) for fields in tuned_listed(
                "pointwise_mlp", dtype, (c, 2 * c, c, c_head, half))]
        for config in configs:
            kernels += aot_launches(config, dtype, activation, residual, affine, c_head,
                                    stats, spatial)
    return distinct_configurations(kernels)
