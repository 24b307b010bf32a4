"""Triton kernels of PConv (the partial 3x3 conv with channel passthrough) and PAT_sf's output.

Y = [conv3x3(X1) | X2], X1 = X[:, :C1]; tensors of any strides (NCHW, channels_last, a channel
slice of a bigger tensor): every kernel takes the four strides of each activation.

* :func:`conv3x3_passthrough` -- one pass over X: each program computes conv3x3 of its pixel tile
  for a block of output channels (an implicit GEMM, nine shifted [pixels x C1] x [C1 x C1]
  products) and copies its share of X2: X read once, Y written once. Also the input gradient
  (the conv of dY1 with the transposed, flipped weight) and the in-place form (from a copy of X1).
* :func:`conv3x3_weight_grad` -- dW[o, i, ky, kx] = sum_{b, h, w} dY1[b, o, h, w] X1[b, i, h +
  ky - 1, w + kx - 1], per-program fp32 partials summed in a fixed order (deterministic).
* :func:`self_mixer_output` -- PAT_sf's output [conv3x3(X1) | tokens proj^T + bias (times the
  dropout multiplier)] (+ X) in one pass: each program computes a block of the conv's output
  channels or one of the projection's, written straight into Y.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      block, cdiv, dot, program_of_sample, reduction_splits, samples_as_rows,
                      upcast_dot)


@triton.jit
def conv3x3_tile(
    src,  # pointer to sample b of the conv input (channels [0, C1) read), any strides
    w_ptr,  # (9, C1, C1) contiguous, [tap = 3 * ky + kx, in channel, out channel]
    C1, H, W,
    src_sc, src_sh, src_sw,  # channel, row and column strides of src (elements)
    h, w,  # (BLOCK_P,) row and column of each output pixel of the tile
    p_ok,  # (BLOCK_P,) which pixels of the tile exist
    offs_co, co_ok,  # (BLOCK_CO,) output channels of the tile and which exist
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    """conv3x3 (padding 1) of one (BLOCK_P pixels x BLOCK_CO output channels) tile, in fp32:
    an implicit GEMM of nine shifted [pixels x C1] x [C1 x out channels] products. Shared by
    every kernel that fuses a partial conv (PConv, PAT_ch)."""
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for tap in tl.static_range(9):
        hh = h + (tap // 3 - 1)
        ww = w + (tap % 3 - 1)
        pix_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        pix = hh * src_sh + ww * src_sw
        for ci0 in range(0, C1, BLOCK_CI):
            offs_ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = offs_ci < C1
            x = tl.load(src + pix[:, None] + offs_ci[None, :] * src_sc,
                        mask=pix_ok[:, None] & ci_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + tap * C1 * C1 + offs_ci[:, None] * C1 + offs_co[None, :],
                         mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
            acc = dot(x, wt, acc, UPCAST)
    return acc


@triton.jit
def _conv3x3_passthrough_kernel(
    src_ptr,  # (B, >= C1 [+ C_rest], H, W) conv input, any strides; X, or dY for the input grad
    dst_ptr,  # (B, C1 [+ C_rest], H, W) output, any strides; channels [0, C1) get the conv
    w_ptr,  # (9, C1, C1) contiguous, [tap = 3 * ky + kx, in channel, out channel], src dtype
    C1, C_total,  # conv channels; channels copied are [C1, C_total) (only if COPY_REST)
    H, W,
    src_sb, src_sc, src_sh, src_sw,  # strides of src (elements)
    dst_sb, dst_sc, dst_sh, dst_sw,  # strides of dst (elements)
    BLOCK_P: tl.constexpr,  # pixels per program (flattened h * W + w)
    BLOCK_CI: tl.constexpr,  # input channels per tl.dot
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_COPY: tl.constexpr,  # passthrough channels per copy step
    COPY_REST: tl.constexpr,  # copy src[:, C1:C_total] to dst[:, C1:C_total]
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

    acc = conv3x3_tile(src, w_ptr, C1, H, W, src_sc, src_sh, src_sw, h, w, p_ok, offs_co, co_ok,
                       BLOCK_P, BLOCK_CI, BLOCK_CO, UPCAST)
    out_pix = h * dst_sh + w * dst_sw
    tl.store(dst + out_pix[:, None] + offs_co[None, :] * dst_sc,
             acc.to(dst_ptr.dtype.element_ty), mask=p_ok[:, None] & co_ok[None, :])

    if COPY_REST:
        # Output-channel program j copies channel blocks j, j + n_co, ... of the passthrough.
        in_pix = h * src_sh + w * src_sw
        step = tl.num_programs(2) * BLOCK_COPY
        for c0 in range(C1 + pid_co * BLOCK_COPY, C_total, step):
            offs_c = c0 + tl.arange(0, BLOCK_COPY)
            ok = p_ok[:, None] & (offs_c < C_total)[None, :]
            v = tl.load(src + in_pix[:, None] + offs_c[None, :] * src_sc, mask=ok)
            tl.store(dst + out_pix[:, None] + offs_c[None, :] * dst_sc, v, mask=ok)


@triton.jit
def _conv3x3_weight_grad_kernel(
    x_ptr,  # (B, >= C1, H, W) the original X1 (channels [0, C1) read), any strides
    gy_ptr,  # (B, >= C1, H, W) dY (channels [0, C1) read), any strides
    partial_ptr,  # (SPLITS, 9, C1, C1) fp32 contiguous, [split, tap, in channel, out channel]
    B, C1, H, W,
    x_sb, x_sc, x_sh, x_sw,  # strides of x (elements)
    g_sb, g_sc, g_sh, g_sw,  # strides of gy (elements)
    BLOCK_P: tl.constexpr,  # pixels per step
    BLOCK_CI: tl.constexpr,  # input channels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (SPLITS, 9 * ceil(C1 / BLOCK_CI), ceil(C1 / BLOCK_CO)). Split s sums the work items
    # (sample, pixel tile) s, s + SPLITS, ... for one tap and one (in, out) channel block.
    pid_s = tl.program_id(0)
    splits = tl.num_programs(0)
    tap = tl.program_id(1) % 9
    pid_ci = tl.program_id(1) // 9
    pid_co = tl.program_id(2)
    dy = tap // 3 - 1
    dx = tap % 3 - 1
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = offs_ci < C1
    co_ok = offs_co < C1
    tiles = tl.cdiv(H * W, BLOCK_P)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for item in range(pid_s, B * tiles, splits):
        b = (item // tiles).to(tl.int64)
        offs_p = (item % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < H * W
        h = offs_p // W
        w = offs_p % W
        hh = h + dy
        ww = w + dx
        pix_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        x = tl.load(x_ptr + b * x_sb + (hh * x_sh + ww * x_sw)[None, :] + offs_ci[:, None] * x_sc,
                    mask=ci_ok[:, None] & pix_ok[None, :], other=0.0)  # (CI, P)
        g = tl.load(gy_ptr + b * g_sb + (h * g_sh + w * g_sw)[:, None] + offs_co[None, :] * g_sc,
                    mask=p_ok[:, None] & co_ok[None, :], other=0.0)  # (P, CO)
        acc = dot(x, g, acc, UPCAST)
    out = partial_ptr + ((pid_s * 9 + tap) * C1 + offs_ci[:, None]) * C1 + offs_co[None, :]
    tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])


@triton.jit
def _self_mixer_output_kernel(
    x_ptr,  # (B, C1 + C2, H, W) X, any strides: the conv reads X1, the residual all of X
    w_ptr,  # (9, C1, C1) contiguous, [tap = 3 * ky + kx, in channel, out channel], x's dtype
    t_ptr,  # (B, N, C2) any strides, x's dtype: the attention's tokens, N = H * W row-major
    pw_ptr,  # (C2, C2) contiguous, [out, in], x's dtype: the output projection's weight
    pb_ptr,  # (C2,) x's dtype: the projection's bias (read if HAS_BIAS)
    keep_ptr,  # (B, N, C2) contiguous, x's dtype: the dropout multiplier (read if HAS_KEEP)
    y_ptr,  # (B, C1 + C2, H, W) output, any strides: [conv3x3(X1) | proj(tokens)] (+ X)
    C1, C2, H, W,
    P,  # pixels: H * W per sample, or B * H * W with the samples taken as rows of one (then
        # one sample: _common.samples_as_rows of x, y and the tokens)
    x_sb, x_sc, x_sh, x_sw,  # strides of x (elements)
    t_sb, t_sn, t_sc,  # strides of the tokens
    y_sb, y_sc, y_sh, y_sw,  # strides of y
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    RESIDUAL: tl.constexpr,  # add X (PAT_sf's first residual sum)
    BLOCK_P: tl.constexpr,  # pixels (tokens) per program
    BLOCK_CI: tl.constexpr,  # conv input channels per tl.dot
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # token channels per step of the projection
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    # grid: (ceil(P / BLOCK_P) * (B or 1), 1, ceil(C1 / BLOCK_N) + ceil(C2 / BLOCK_N)), a
    # sample's pixel tiles in turn: the first programs of axis 2 compute the conv's output
    # channels, the others the projection's.
    pid_p, pid_b = program_of_sample(tl.cdiv(P, BLOCK_P))
    pid_n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    rows = offs_p // W  # (over the samples taken as rows of one: h the row in its own sample,
    h = rows % H  # whose first row each conv window is based on)
    w = offs_p % W
    out_ty = y_ptr.dtype.element_ty
    conv_blocks = tl.cdiv(C1, BLOCK_N)
    if pid_n < conv_blocks:
        channel = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = channel < C1
        acc = conv3x3_tile(x_ptr + pid_b * x_sb + ((rows - h) * x_sh)[:, None], w_ptr, C1, H, W,
                           x_sc, x_sh, x_sw, h, w, p_ok, channel, c_ok, BLOCK_P, BLOCK_CI,
                           BLOCK_N, UPCAST)
    else:
        offs_o = (pid_n - conv_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = offs_o < C2
        channel = C1 + offs_o
        tokens = t_ptr + pid_b * t_sb + offs_p[:, None] * t_sn
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C2, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C2
            t = tl.load(tokens + offs_k[None, :] * t_sc, mask=p_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wt = tl.load(pw_ptr + offs_o[None, :] * C2 + offs_k[:, None],
                         mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = dot(t, wt, acc, UPCAST)
        if HAS_BIAS:
            acc += tl.load(pb_ptr + offs_o, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_KEEP:  # (the projection rounded to the dtype, then the dropout's multiply)
            keep = tl.load(keep_ptr + (pid_b * H * W + offs_p[:, None]) * C2 + offs_o[None, :],
                           mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            acc = acc.to(out_ty).to(tl.float32) * keep.to(tl.float32)
    ok = p_ok[:, None] & c_ok[None, :]
    y = acc.to(out_ty)  # (each half rounded as its own op writes it)
    if RESIDUAL:
        x = tl.load(x_ptr + pid_b * x_sb + (rows * x_sh + w * x_sw)[:, None]
                    + channel[None, :] * x_sc, mask=ok, other=0.0)
        y = (y.to(tl.float32) + x.to(tl.float32)).to(out_ty)
    tl.store(y_ptr + pid_b * y_sb + (rows * y_sh + w * y_sw)[:, None] + channel[None, :] * y_sc,
             y, mask=ok)


# (imported here, below the jit functions: a line added above them changes their cache keys)
import itertools  # noqa: E402

from ._common import (RELEASED_PATNET, RELEASED_PATNET_T1, RELEASED_STAGE_WIDTHS,  # noqa: E402
                      distinct_configurations)


def _conv_blocks(c1: int, dtype: torch.dtype, interpret: bool = INTERPRET):
    """(BLOCK_P, BLOCK_CI, BLOCK_CO, num_warps) of the conv kernels for C1 conv channels of
    ``dtype``: fp32 (its dots as IEEE FMAs) in 8 warps (4 spilled up to 256 B per thread on
    sm_80, read off the AOT machine code)."""
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return 256, block(c1, high=64), block(c1, high=64), 4
    warps = 8 if upcast_dot(dtype, interpret=False) else 4
    return 64, block(c1, high=32), block(c1, high=64), warps


def _wgrad_block_p(dtype: torch.dtype) -> int:
    """Pixels per step of the weight-gradient kernel on a GPU (under the interpreter: the conv
    kernels' BLOCK_P): fp32 half as many (128 spilled up to 1.8 KB per thread on sm_80)."""
    return 64 if upcast_dot(dtype, interpret=False) else 128


def _copy_block(rest_channels: int, copy_rest: bool) -> int:
    return block(rest_channels, high=64) if copy_rest else 16


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def conv3x3_passthrough(src: torch.Tensor, weight_taps: torch.Tensor, dst: torch.Tensor,
                        copy_rest: bool) -> torch.Tensor:
    """dst[:, :C1] = conv3x3(src[:, :C1]) and, if ``copy_rest``, dst[:, C1:] = src[:, C1:].

    src: (B, C_src, H, W), dst: (B, C_dst, H, W), any strides, same dtype; weight_taps:
    (9, C1, C1) contiguous, [tap, in, out] (see :func:`forward_taps`). dst must not overlap
    the pixels of src[:, :C1] that the conv reads. Returns dst.
    """
    b, _, h, w = src.shape
    c1 = weight_taps.shape[1]
    block_p, block_ci, block_co, warps = _conv_blocks(c1, src.dtype)
    block_copy = _copy_block(dst.shape[1] - c1, copy_rest)
    grid = (cdiv(h * w, block_p) * b, 1, cdiv(c1, block_co))
    _conv3x3_passthrough_kernel[grid](
        src, dst, weight_taps, c1, dst.shape[1], h, w, *_strides(src), *_strides(dst),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, BLOCK_COPY=block_copy,
        COPY_REST=copy_rest, UPCAST=upcast_dot(src.dtype), num_warps=warps)
    return dst


def _self_mixer_blocks(c1: int, c2: int, dtype: torch.dtype, interpret: bool = INTERPRET):
    """(BLOCK_P, BLOCK_CI, BLOCK_N, BLOCK_K, num_warps) of the PAT_sf output kernel: fp32
    (IEEE FMAs) in half the pixels (64 spilled 280 B per thread on sm_80, AOT report)."""
    if interpret:
        return 64, block(c1, high=64), block(max(c1, c2), high=64), block(c2, high=64), 4
    if dtype == torch.float32:
        return 32, block(c1, high=16), 64, 16, 4
    return 64, block(c1, high=32), 64, 32, 4


def self_mixer_rows(x: torch.Tensor, tokens: torch.Tensor, y: torch.Tensor) -> Tuple[int, int]:
    """(samples, pixels a sample) the PAT_sf output kernel tiles for x and y (B, C, H, W) and
    the tokens (B, H * W, C2): the B samples taken as rows of one where
    :func:`_common.samples_as_rows` allows (channels_last, the tokens one sample after
    another), so that no sample's last tile runs partly empty (PAT_sf's 7 x 7 = 49 tokens in a
    tile of 64), each conv window in its own sample; else tiles of one sample."""
    b, _, h, w = x.shape
    if samples_as_rows(x, y, tokens.transpose(1, 2)[..., None]):
        return 1, b * h * w
    return b, h * w


def self_mixer_output(x: torch.Tensor, weight_taps: torch.Tensor, tokens: torch.Tensor,
                      proj_weight: torch.Tensor, proj_bias, keep, y: torch.Tensor,
                      residual: bool) -> torch.Tensor:
    """y = [conv3x3(X1) | tokens proj_weight^T + proj_bias, times keep] (+ x), one kernel.

    x, y: (B, C, H, W), any strides, same dtype, not overlapping; weight_taps: (9, C1, C1)
    [tap, in, out] contiguous (see :func:`forward_taps`); tokens: (B, H * W, C2), any strides
    (C2 = C - C1); proj_weight: (C2, C2) contiguous; proj_bias: (C2,) or None; keep: (B, H * W,
    C2) contiguous or None (the dropout multiplier); residual: add x. Returns y.
    """
    b, c, h, w = x.shape
    c1 = weight_taps.shape[1]
    c2 = c - c1
    block_p, block_ci, block_n, block_k, warps = _self_mixer_blocks(c1, c2, x.dtype)
    samples, pixels = self_mixer_rows(x, tokens, y)
    grid = (cdiv(pixels, block_p) * samples, 1, cdiv(c1, block_n) + cdiv(c2, block_n))
    _self_mixer_output_kernel[grid](
        x, weight_taps, tokens, proj_weight, proj_weight if proj_bias is None else proj_bias,
        tokens if keep is None else keep, y, c1, c2, h, w, pixels, *_strides(x),
        *_strides(tokens),
        *_strides(y), HAS_BIAS=proj_bias is not None, HAS_KEEP=keep is not None,
        RESIDUAL=residual, BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_N=block_n,
        BLOCK_K=block_k, UPCAST=upcast_dot(x.dtype), num_warps=warps)
    return y


def forward_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C1, C1, 3, 3) conv weight -> (9, C1, C1) [tap, in, out] for the forward conv."""
    return weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], weight.shape[0]).contiguous()


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """A (C_OUT, C_IN, k, k) conv weight with the same values, stored [ky, kx, in, out], so
    that :func:`forward_taps` of a 3 x 3 one is a view (no copy per call), and the patch conv
    (:mod:`.patch_conv`) reads a stem's or merging layer's along its output channels: for
    weights fixed at inference."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


_REVERSED_TAPS = {}  # device -> the taps 8, 7, ..., 0 (int64), made once per device


def transposed_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C1, C1, 3, 3) conv weight -> (9, C1, C1) taps of the input-gradient conv.

    dX1 = conv3x3(dY1, W') with W'[i, o, ky, kx] = W[o, i, 2 - ky, 2 - kx]: in [tap, in, out]
    form, tap t is W[:, :, tap 8 - t] ([o, i]): one gather (``index_select``, contiguous) of
    the [ky, kx, o, i] view, which any layout of W has.
    """
    reversed_taps = _REVERSED_TAPS.get(weight.device)
    if reversed_taps is None:
        reversed_taps = _REVERSED_TAPS[weight.device] = torch.arange(8, -1, -1,
                                                                     device=weight.device)
    return torch.index_select(weight.permute(2, 3, 0, 1).flatten(0, 1), 0, reversed_taps)


def conv3x3_weight_grad(x1: torch.Tensor, grad_y: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """dW (C1, C1, 3, 3) into ``out`` (x1's dtype, any strides; returned), from X1 (B, >= C1,
    H, W) and dY (B, >= C1, H, W).

    Only the first C1 = weight rows channels of each are read, where C1 = x1.shape[1] unless
    x1 carries extra channels; pass ``x1`` sliced to C1 channels. Accumulates in fp32.
    """
    b, c1, h, w = x1.shape
    block_p, block_ci, block_co, warps = _conv_blocks(c1, x1.dtype)
    block_p = block_p if INTERPRET else _wgrad_block_p(x1.dtype)
    tiles = cdiv(h * w, block_p)
    n_ci, n_co = cdiv(c1, block_ci), cdiv(c1, block_co)
    splits = reduction_splits(b * tiles, 9 * n_ci * n_co, 4)
    partial = torch.empty((splits, 9, c1, c1), device=x1.device, dtype=torch.float32)
    _conv3x3_weight_grad_kernel[(splits, 9 * n_ci, n_co)](
        x1, grad_y, partial, b, c1, h, w, *_strides(x1), *_strides(grad_y),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        UPCAST=upcast_dot(x1.dtype), num_warps=warps)
    # the splits summed in fp32 straight into out's [out, in, ky, kx] (from [tap = 3 ky + kx,
    # in, out]); in fp16 / bf16 then cast into out, its layout taken in the same pass
    taps = partial.view(splits, 3, 3, c1, c1).permute(0, 4, 3, 1, 2)
    if out.dtype == torch.float32:
        return torch.sum(taps, 0, out=out)
    return out.copy_(torch.sum(taps, 0))


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check."""
    kernels = []
    for c1 in sorted({width // 4 for width in RELEASED_STAGE_WIDTHS}):  # (C1 = C / 4)
        for dtype, tname in TRITON_DTYPE.items():
            block_p, block_ci, block_co, warps = _conv_blocks(c1, dtype, interpret=False)
            upcast, ptr = upcast_dot(dtype, interpret=False), "*" + tname
            fn = _conv3x3_passthrough_kernel
            for copy_rest in (True, False):
                kernels.append(AotKernel(
                    f"conv3x3_passthrough[{tname}, CI={block_ci}, CO={block_co}, "
                    f"copy={_copy_block(3 * c1, copy_rest) if copy_rest else False}]", fn,
                    aot_signature(fn, {"src_ptr": ptr, "dst_ptr": ptr, "w_ptr": ptr}),
                    dict(BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co,
                         BLOCK_COPY=_copy_block(3 * c1, copy_rest), COPY_REST=copy_rest,
                         UPCAST=upcast), num_warps=warps,
                    launches=activation_launches("src", "dst")))
            fn = _conv3x3_weight_grad_kernel
            kernels.append(AotKernel(
                f"conv3x3_weight_grad[{tname}, CI={block_ci}, CO={block_co}]", fn,
                aot_signature(fn, {"x_ptr": ptr, "gy_ptr": ptr, "partial_ptr": "*fp32"}),
                dict(BLOCK_P=_wgrad_block_p(dtype), BLOCK_CI=block_ci, BLOCK_CO=block_co,
                     UPCAST=upcast), num_warps=warps,
                launches=activation_launches("x", "g")))
    # PAT_sf's output (stage 4, C = 8E): training (dropout or none) and inference, each with
    # the block's first residual sum or without
    fn = _self_mixer_output_kernel
    for (e, _), (dtype, tname) in itertools.product(RELEASED_PATNET + (RELEASED_PATNET_T1,),
                                                    TRITON_DTYPE.items()):
        block_p, block_ci, block_n, block_k, warps = _self_mixer_blocks(2 * e, 6 * e, dtype,
                                                                        interpret=False)
        ptr = "*" + tname
        sig = aot_signature(fn, {name: ptr for name in fn.arg_names if name.endswith("_ptr")})
        for keep, residual in itertools.product((True, False), (False, True)):
            kernels.append(AotKernel(
                f"self_mixer_output[{tname}, keep={keep}, residual={residual}]", fn, sig,
                dict(HAS_BIAS=True, HAS_KEEP=keep, RESIDUAL=residual, BLOCK_P=block_p,
                     BLOCK_CI=block_ci, BLOCK_N=block_n, BLOCK_K=block_k,
                     UPCAST=upcast_dot(dtype, interpret=False)), num_warps=warps,
                launches=activation_launches("x", "y", tokens=("t_sc",))))
    return distinct_configurations(kernels)
