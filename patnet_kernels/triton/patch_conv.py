"""Triton kernel of a non-overlapping k x k, stride-k convolution with bias: the stem (4 x 4) and
the merging layers (2 x 2) of PATNet and FasterNet in inference, their BatchNorm folded.

Y[b, :, i, j] = W . patch(b, i, j) + bias, patch(b, i, j) the k x k x C_IN input values under
output pixel (i, j): an implicit GEMM of [pixels x K] x [K x C_OUT], K = k * k * C_IN, whose
A operand is gathered from X as it is read (no im2col written). X is read in its own dtype and
converted to the weight's in the kernel: under autocast the stem reads the float32 image itself
(no cast pass), and any layout (NCHW, channels_last, strided) is read as it is. The epilogue can
take the statistics of the output's last channels per tile of pixels (mean and sum of squared
deviations, as the MLP kernel's, :mod:`.pointwise_mlp`): the next stage's first PAT_ch block
reads them instead of reading its X2 for them. With k = 1 and a LayerNorm prologue it is PAT_sf's
LayerNorm (its affine folded into the projection) and qkv projection (``pk.layer_norm_linear``):
each pixel's C_IN values normalised in float32 as they are read, then the GEMM, the tokens
written (B, N, C_OUT) contiguous.

* :func:`patch_conv` -- the launcher; :func:`stats_chunks` -- its statistics' tiles;
  :func:`config_for` -- a launch's tiles; :func:`aot_kernels` -- the shipped configurations.
"""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, aot_signature, block, cdiv, dot,
                      pixel_strides, program_of_sample, samples_as_rows, store_tile_moments,
                      upcast_dot)


@triton.jit
def _pixel_moments(x_pix, x_sc, p_ok, C_IN, EPS, BLOCK_K: tl.constexpr):
    """(mean, 1 / sqrt(variance + EPS)) of each pixel's C_IN values (biased variance, as
    LayerNorm's), fp32 vectors over the tile's pixels ``x_pix`` (BLOCK_P, 1) pointers: the mean,
    then the squared deviations from it (two passes over the values, the second from cache;
    no E[x^2] - E[x]^2 cancellation)."""
    total = tl.zeros((x_pix.shape[0],), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_pix + (offs_k * x_sc)[None, :],
                    mask=p_ok[:, None] & (offs_k < C_IN)[None, :], other=0.0)
        total += tl.sum(a.to(tl.float32), 1)
    mean = total / C_IN
    squares = tl.zeros((x_pix.shape[0],), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (offs_k < C_IN)[None, :]
        a = tl.load(x_pix + (offs_k * x_sc)[None, :], mask=ok, other=0.0)
        centred = tl.where(ok, a.to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, 1)
    return mean, tl.rsqrt(squares / C_IN + EPS)


@triton.jit
def _patch_conv_kernel(
    x_ptr,  # (B, C_IN, H, W) input, any strides (below), any float dtype (converted to w's)
    w_ptr,  # (C_OUT, C_IN, KS, KS) weight, any strides (below), y's dtype
    b_ptr,  # (C_OUT,) bias, y's dtype; unread unless HAS_BIAS
    y_ptr,  # (B, C_OUT, HO, WO) output, HO = H // KS, WO = W // KS, pixels flattened to one
            # stride y_sp (NCHW, channels_last)
    stats_mean_ptr, stats_m2_ptr,  # (B, T, C_OUT - STATS_FIRST) fp32 contiguous, T the pixel
                                   # tiles, written if STATS: per tile the mean
                                   # and sum of squared deviations of y[:, STATS_FIRST:] as
                                   # stored (the next PAT_ch block's X2 statistics)
    C_IN, C_OUT, KS,  # input and output channels, patch size (kernel size and stride)
    EPS,  # LayerNorm's epsilon (fp32; if NORMALIZE)
    STATS_FIRST,  # the first output channel whose statistics are taken (if STATS)
    P,  # output pixels per sample, HO * WO
    WO,  # output width: output pixel p is at row p // WO, column p % WO
    x_sb, x_sc, x_sh, x_sw,  # strides of x (elements)
    w_so, w_si, w_sy, w_sx,  # strides of the weight over out, in, ky, kx
    y_sb, y_sc, y_sp,  # sample, channel and flattened pixel strides of y
    HAS_BIAS: tl.constexpr,
    STATS: tl.constexpr,  # write the statistics of y's channels [STATS_FIRST, C_OUT)
    NORMALIZE: tl.constexpr,  # (KS = 1 only) LayerNorm each pixel's C_IN values, no affine
                              # (fp32, then in w's dtype) before the GEMM
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_K: tl.constexpr,  # patch values (ky, kx, input channel) per step
    BLOCK_N: tl.constexpr,  # output channels per program
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the weight's dtype
):
    # grid: (cdiv(P, BLOCK_P) * B, 1, cdiv(C_OUT, BLOCK_N)), a sample's pixel tiles in turn;
    # the launcher may pass the samples as rows of one (B = 1, HO and P over all samples:
    # _common.samples_as_rows)
    pid_p, pid_b = program_of_sample(tl.cdiv(P, BLOCK_P))
    pid_n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    # (BLOCK_P, 1) the top-left input value of each output pixel's patch
    x_pix = (x_ptr + pid_b * x_sb + ((offs_p // WO) * KS * x_sh)[:, None]
             + ((offs_p % WO) * KS * x_sw)[:, None])
    row = KS * C_IN  # patch values per patch row: K = (ky, kx, c) in that order
    if NORMALIZE:
        mean, rstd = _pixel_moments(x_pix, x_sc, p_ok, C_IN, EPS, BLOCK_K)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KS * row, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KS * row
        if NORMALIZE:  # (KS = 1: the patch values are the channels; no division, which
            # would hide their contiguity from the compiler)
            x_off = offs_k * x_sc
            w_off = offs_k * w_si
        else:
            ky = offs_k // row
            kx = (offs_k % row) // C_IN
            c = offs_k % C_IN
            x_off = ky * x_sh + kx * x_sw + c * x_sc
            w_off = ky * w_sy + kx * w_sx + c * w_si
        a = tl.load(x_pix + x_off[None, :], mask=p_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_P, BLOCK_K)
        wt = tl.load(w_ptr + (offs_n * w_so)[None, :] + w_off[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if NORMALIZE:  # (the K values past C_IN meet zero weights)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
        acc = dot(a.to(w_ptr.dtype.element_ty), wt, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pid_b * y_sb + offs_p[:, None] * y_sp + offs_n[None, :] * y_sc, out,
             mask=p_ok[:, None] & n_ok[None, :])
    if STATS:
        store_tile_moments(out.to(tl.float32), p_ok, offs_n, n_ok, stats_mean_ptr,
                           stats_m2_ptr, tl.program_id(0).to(tl.int64), STATS_FIRST,
                           C_OUT)  # (the tile's row: pid_b * tiles + pid_p)


class Config(NamedTuple):
    """Tile sizes and launch options of the kernel for one call."""
    block_p: int
    block_k: int
    block_n: int
    warps: int
    stages: int


def config_for(in_channels: int, out_channels: int, patch: int, dtype: torch.dtype,
               interpret: bool = INTERPRET) -> Config:
    """The tiles of a launch on ``dtype`` (the weight's and output's): output channels in one
    block up to 128 (wider outputs take several programs per pixel tile, each reading the
    patches again, from cache); the patch values in steps of up to 64 (the stem's 4 x 4 x 3 =
    48 in one). float32 (IEEE dots on FMA units) takes smaller tiles."""
    k = patch * patch * in_channels
    block_n = block(out_channels, low=16, high=128)
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return Config(128, block(k, low=16, high=128), block_n, 4, 1)
    if upcast_dot(dtype, interpret=False):
        return Config(32, block(k, low=16, high=16), min(block_n, 64), 4, 2)
    # (128 output channels in 4 warps took 255 registers on sm_80: 8 warps, read off the AOT
    # check's machine code)
    return Config(64, block(k, low=16, high=64), block_n, 8 if block_n >= 128 else 4, 3)


def stats_chunks(x: torch.Tensor, weight: torch.Tensor) -> int:
    """T, the pixel tiles of the kernel on x (B, C_IN, H, W) with this (C_OUT, C_IN, k, k)
    weight: the chunks of its output statistics (BLOCK_P pixels each, a power of two, as
    :func:`patnet_kernels._types.chunk_pixels` assumes)."""
    k = weight.shape[-1]
    config = config_for(weight.shape[1], weight.shape[0], k, weight.dtype)
    return cdiv((x.shape[2] // k) * (x.shape[3] // k), config.block_p)


def pixel_rows(x: torch.Tensor, y: torch.Tensor, k: int, statistics: bool) -> Tuple[int, int]:
    """(samples, output rows per sample) of a launch's pixel tiles (grid axis 0; each
    row W // k pixels) on x (B, C_IN, H, W) into y (B, C_OUT, H // k, W // k): the B samples
    as one sample of B * H // k rows where :func:`_common.samples_as_rows` allows, the input's
    rows hold whole patches and no per-tile ``statistics`` are taken."""
    if not statistics and x.shape[2] % k == 0 and samples_as_rows(x, y):
        return 1, x.shape[0] * y.shape[2]
    return x.shape[0], y.shape[2]


def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               y: torch.Tensor, statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               stats_first: int = 0, eps: Optional[float] = None) -> torch.Tensor:
    """y = conv(x, weight, bias, stride = kernel size k), written into y; returns y.

    x: (B, C_IN, H, W), any strides and float dtype; weight: (C_OUT, C_IN, k, k), any strides
    (stored [ky, kx, in, out], as ``patnet.optimize_for_inference`` keeps it, its loads are
    contiguous over the output channels); bias: (C_OUT,) or None, y's dtype (any stride: the
    kernel reads a contiguous one, copied if need be); y: (B, C_OUT,
    H // k, W // k) in the weight's dtype, its pixels flattened to one stride. statistics:
    (mean, m2), each (B, :func:`stats_chunks`, C_OUT - stats_first) fp32 contiguous, filled
    with those of y[:, stats_first:] per tile of pixels, or None. eps: each pixel's C_IN values
    layer-normalised first with this epsilon, no affine (k = 1 only), or None.
    """
    c_in = x.shape[1]
    c_out, _, k, _ = weight.shape
    wo = y.shape[3]
    config = config_for(c_in, c_out, k, weight.dtype)
    samples, rows = pixel_rows(x, y, k, statistics is not None)
    grid = (cdiv(rows * wo, config.block_p) * samples, 1, cdiv(c_out, config.block_n))
    stats_mean, stats_m2 = statistics if statistics is not None else (weight, weight)
    _patch_conv_kernel[grid](
        x, weight, bias.contiguous() if bias is not None else weight, y, stats_mean, stats_m2,
        c_in, c_out, k, 0.0 if eps is None else eps, stats_first, rows * wo, wo, *x.stride(),
        *weight.stride(), *pixel_strides(y), HAS_BIAS=bias is not None,
        STATS=statistics is not None, NORMALIZE=eps is not None, BLOCK_P=config.block_p,
        BLOCK_K=config.block_k, BLOCK_N=config.block_n, UPCAST=upcast_dot(weight.dtype),
        num_warps=config.warps, num_stages=config.stages)
    return y


# ------------------------------------------------------------------------------------------
# (imported here, below the jit functions: a line added above them changes their cache keys)
from ._common import (RELEASED_FASTERNET, RELEASED_PATNET, RELEASED_PATNET_T1,  # noqa: E402
                      distinct_configurations)

# The released models' stems and merging layers (SPEC.md section 5): the stem 4 x 4 from 3
# channels to E, the merging layers 2 x 2 from C to 2C at C = E, 2E, 4E; PATNet's PAT_sf
# LayerNorm + qkv from C2 = 6E to 3 C2 (stage 4: 8E channels, C1 = 2E).
_PATNET_WIDTHS = tuple(e for e, _ in RELEASED_PATNET + (RELEASED_PATNET_T1,))
_STEM_WIDTHS = tuple(sorted({e for e, _ in RELEASED_FASTERNET} | set(_PATNET_WIDTHS)))


class Launch(NamedTuple):
    """One kind of launch of the released models' inference path."""
    c_in: int
    c_out: int
    k: int
    stats: bool = False      # with the next PAT_ch block's statistics
    from_fp32: bool = False  # x float32 (the image under autocast), the weight not
    norm: bool = False       # PAT_sf's LayerNorm first (k = 1, tokens out)


def released_launches():
    """Each :class:`Launch` of the released models' inference path: the stem (from the float32
    image under autocast, which it reads as it is, or from an image in the model's dtype),
    with the statistics where a PAT_ch block follows, and each merging layer, in the model's
    dtype, with them before stages 2 and 3 of PATNet (stage 4's first block is PAT_sf's); and
    PATNet's PAT_sf LayerNorm + qkv."""
    for e in _STEM_WIDTHS:
        for stats, from_fp32 in itertools.product((False, True), (False, True)):
            yield Launch(3, e, 4, stats, from_fp32)
        for c, stats in ((e, True), (2 * e, True), (4 * e, False), (e, False), (2 * e, False)):
            yield Launch(c, 2 * c, 2, stats)
    for e in _PATNET_WIDTHS:
        yield Launch(6 * e, 18 * e, 1, norm=True)


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU for the released models
    (:func:`released_launches` per dtype; NCHW and channels_last inputs, the stem also from an
    NCHW image into a channels_last output, the weight stored
    [ky, kx, in, out], PAT_sf's qkv weight as nn.Linear keeps it), for the ahead-of-time
    check."""
    kernels = []
    fn = _patch_conv_kernel
    for launch, dtype in itertools.product(released_launches(), TRITON_DTYPE):
        config = config_for(launch.c_in, launch.c_out, launch.k, dtype, interpret=False)
        tname = TRITON_DTYPE[dtype]
        xname = "fp32" if launch.from_fp32 else tname
        name = (f"patch_conv[{xname} -> {tname}, P={config.block_p}, K={config.block_k}, "
                f"N={config.block_n}{', stats' if launch.stats else ''}"
                f"{', layer norm' if launch.norm else ''}{', stem' if launch.c_in == 3 else ''}]")
        # (the launcher passes the weight for the pointers of what it does not take)
        pointers = {p: "*" + tname for p in fn.arg_names if p.endswith("_ptr")}
        pointers["x_ptr"] = "*" + xname
        if launch.stats:
            pointers.update(stats_mean_ptr="*fp32", stats_m2_ptr="*fp32")
        if launch.norm:
            launches = {"NCHW": ("x_sw", "w_si", "w_sy", "w_sx", "y_sc", "KS"),
                        "channels_last": ("x_sc", "w_si", "w_sy", "w_sx", "y_sc", "KS")}
        else:  # (the stem also from an NCHW image into channels_last: the inference copy's)
            launches = {"NCHW": ("x_sw", "w_so", "y_sp"),
                        "channels_last": ("x_sc", "w_so", "y_sc"),
                        **({"NCHW -> channels_last": ("x_sw", "w_so", "y_sc")}
                           if launch.c_in == 3 else {})}
        kernels.append(AotKernel(
            name, fn, aot_signature(fn, pointers, {"EPS": "fp32"}),
            dict(HAS_BIAS=True, STATS=launch.stats, NORMALIZE=launch.norm,
                 BLOCK_P=config.block_p, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
                 UPCAST=upcast_dot(dtype, interpret=False)),
            num_warps=config.warps, num_stages=config.stages, launches=launches))
    return distinct_configurations(kernels)
