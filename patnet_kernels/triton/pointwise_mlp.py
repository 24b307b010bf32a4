"""Triton kernel of the block's MLP in inference, hidden activation kept on chip.

Y = W2 . act(W1 . X + b1) + b2 [+ R] over (B, C, H, W) activations (NCHW, channels_last, or any
strides whose H and W merge into one pixel stride). Each program takes a tile of pixels of one
sample and a block of output channels and runs the hidden dimension in chunks: a chunk of
act(W1 . X + b1) is computed (a [pixels x C] x [C x chunk] GEMM), cast to the input dtype and at
once multiplied into the output accumulator ([pixels x chunk] x [chunk x out]), flash-MLP style,
so the hidden activation (2C channels in the released models) is never written to memory. Bias,
activation and residual are epilogues: X is read once, R once, Y written once.

* :func:`pointwise_mlp` -- the launcher; :func:`aot_kernels` -- its shipped configurations.
"""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      block, dot, upcast_dot)

# The activation constexpr of the kernel, by the reference's name.
ACTIVATION_CODES = {"relu": 0, "gelu": 1}


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """ReLU (0) or the exact GELU (1), 0.5 z (1 + erf(z / sqrt 2)), on an fp32 tile; both keep
    NaN, as torch's (tl.maximum(NaN, 0) would give 0)."""
    if ACTIVATION == 0:
        return tl.where(z < 0.0, 0.0, z)
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _accumulate_input_chunk(
    hidden,  # (BLOCK_P, BLOCK_H) fp32 accumulator of W1 . M for one hidden chunk
    src,  # (BLOCK_P, 1) pointers to this tile's pixels of the tensor holding channels [LO, HI)
    src_sc,  # its channel stride (elements)
    LO, HI,  # the MLP input channels [LO, HI) taken from src (src channel c - SRC_FIRST)
    SRC_FIRST,  # the MLP input channel of src's channel 0
    scale_row, shift_row,  # pointers to this sample's (C - C_HEAD,) fp32 affine, or unused
    AFFINE_FIRST,  # the MLP input channel of the affine's entry 0
    w1_ptr, C,  # (HIDDEN, C) contiguous first-conv weight
    offs_h, h_ok, p_ok,  # (BLOCK_H,) hidden channels of the chunk; (BLOCK_P,) pixels that exist
    HAS_AFFINE: tl.constexpr,  # M = src * scale + shift on these channels
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """hidden += M[:, LO:HI] . W1[chunk, LO:HI]^T, M read from src (affine applied in fp32 and
    rounded to src's dtype, as PAT_ch's apply pass writes it)."""
    for k0 in range(LO, HI, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < HI
        m = tl.load(src + (offs_k - SRC_FIRST)[None, :] * src_sc,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_K)
        if HAS_AFFINE:
            a = tl.load(scale_row + offs_k - AFFINE_FIRST, mask=k_ok, other=0.0)
            d = tl.load(shift_row + offs_k - AFFINE_FIRST, mask=k_ok, other=0.0)
            m = tl.where(p_ok[:, None] & k_ok[None, :],
                         m.to(tl.float32) * a[None, :] + d[None, :], 0.0).to(m.dtype)
        w1t = tl.load(w1_ptr + offs_h[None, :] * C + offs_k[:, None],
                      mask=k_ok[:, None] & h_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_H)
        hidden = dot(m, w1t, hidden, UPCAST)
    return hidden


@triton.jit
def _pointwise_mlp_kernel(
    x_ptr,  # (B, C, H, W) input, any strides with a flattened pixel stride x_sp; channels
            # [C_HEAD, C) of the MLP input M (all of M when C_HEAD = 0)
    head_ptr,  # (B, C_HEAD, H, W) channels [0, C_HEAD) of M, strides as x; unread if C_HEAD = 0
    scale_ptr, shift_ptr,  # (B, C - C_HEAD) fp32 contiguous: M = x * scale + shift on
                           # channels [C_HEAD, C); unread unless HAS_AFFINE
    w1_ptr,  # (HIDDEN, C) contiguous, [hidden, in channel], x dtype
    b1_ptr,  # (HIDDEN,) bias of the first conv (its BatchNorm folded); unread unless HAS_B1
    w2_ptr,  # (C_OUT, HIDDEN) contiguous, [out channel, hidden], x dtype
    b2_ptr,  # (C_OUT,) bias of the second conv; unread unless HAS_B2
    r_ptr,  # (B, C_OUT, H, W) residual, any strides as x; unread unless HAS_RESIDUAL
    y_ptr,  # (B, C_OUT, H, W) output, any strides as x
    C, C_HEAD, HIDDEN, C_OUT,
    P,  # pixels per sample, H * W
    x_sb, x_sc, x_sp,  # sample, channel and pixel strides of x (elements)
    h_sb, h_sc, h_sp,  # strides of the head (elements)
    r_sb, r_sc, r_sp,  # strides of the residual (elements)
    y_sb, y_sc, y_sp,  # strides of y (elements)
    ACTIVATION: tl.constexpr,  # 0: ReLU, 1: exact GELU (ACTIVATION_CODES)
    HAS_AFFINE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # input channels per step of the first GEMM
    BLOCK_H: tl.constexpr,  # hidden channels per chunk
    BLOCK_N: tl.constexpr,  # output channels per program
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    x = x_ptr + pid_b * x_sb + offs_p[:, None] * x_sp  # (BLOCK_P, 1) pixel rows of x
    head = head_ptr + pid_b * h_sb + offs_p[:, None] * h_sp
    scale_row = scale_ptr + pid_b * (C - C_HEAD)
    shift_row = shift_ptr + pid_b * (C - C_HEAD)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HIDDEN
        hidden = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        hidden = _accumulate_input_chunk(hidden, head, h_sc, 0, C_HEAD, 0, scale_row,
                                         shift_row, C_HEAD, w1_ptr, C, offs_h, h_ok, p_ok,
                                         False, BLOCK_K, UPCAST)
        hidden = _accumulate_input_chunk(hidden, x, x_sc, C_HEAD, C, 0, scale_row, shift_row,
                                         C_HEAD, w1_ptr, C, offs_h, h_ok, p_ok, HAS_AFFINE,
                                         BLOCK_K, UPCAST)
        if HAS_B1:
            hidden += tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        # (hidden channels past HIDDEN are act(0) = 0 and meet zero rows of W2)
        hidden = _activation(hidden, ACTIVATION).to(x_ptr.dtype.element_ty)
        w2t = tl.load(w2_ptr + offs_n[None, :] * HIDDEN + offs_h[:, None],
                      mask=h_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_N)
        acc = dot(hidden, w2t, acc, UPCAST)

    ok = p_ok[:, None] & n_ok[None, :]
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + pid_b * r_sb + offs_p[:, None] * r_sp + offs_n[None, :] * r_sc,
                    mask=ok, other=0.0)
        acc += r.to(tl.float32)
    tl.store(y_ptr + pid_b * y_sb + offs_p[:, None] * y_sp + offs_n[None, :] * y_sc,
             acc.to(y_ptr.dtype.element_ty), mask=ok)


class Config(NamedTuple):
    """Tile sizes and launch options of the kernel for one call."""
    block_p: int
    block_k: int
    block_h: int
    block_n: int
    warps: int
    stages: int


def default_config(channels: int, hidden: int, out_channels: int, dtype: torch.dtype,
                   interpret: bool = INTERPRET) -> Config:
    """The kernel's configuration for these widths and dtype. On a GPU the output block covers
    C_OUT up to 256 (no hidden chunk computed twice); wider outputs take several programs per
    pixel tile, each recomputing the hidden activation. float32 (its dots as IEEE FMAs, no
    tensor cores) takes smaller tiles: the fp16/bf16 ones spill registers there (read off
    the sm_80/sm_90 machine code, ``python -m patnet_kernels.triton.aot``)."""
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return Config(128, block(channels, high=128), block(hidden, high=128),
                       block(out_channels, high=256), 4, 1)
    block_n = block(out_channels, high=256)
    if upcast_dot(dtype, interpret=False):
        return Config(32, 16, 32, block_n, 8, 2)
    return Config(64, block(channels, high=64), 64, block_n, 8, 3)  # (4 warps spill on sm_80)


def _pixel_strides(t: torch.Tensor):
    """(sample, channel, pixel) strides of a (B, C, H, W) tensor whose H and W merge."""
    return t.stride(0), t.stride(1), t.stride(3)


def pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  activation: str, y: torch.Tensor, head: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                  config: Optional[Config] = None) -> torch.Tensor:
    """y = W2 . act(W1 . M + b1) + b2 [+ residual] with M = [head | x[:, C_HEAD:] * scale +
    shift] (no head: C_HEAD = 0; no scale and shift: x as it is); returns y.

    x: (B, C, H, W); head: (B, C_HEAD, H, W) or None; residual and y: (B, C_OUT, H, W); each
    with H and W merging into one pixel stride (stride(2) == W * stride(3): NCHW,
    channels_last, channel slices of either). scale, shift: (B, C - C_HEAD) fp32 contiguous,
    both or neither. w1: (HIDDEN, C) contiguous; w2: (C_OUT, HIDDEN) contiguous; b1 (HIDDEN,),
    b2 (C_OUT,) or None; all in x's dtype. activation: "relu" or "gelu". y must not overlap
    x, the head or the residual. ``config``: tiles and launch options (default:
    :func:`default_config`; benchmarks/sweep_pointwise_mlp.py times others).
    """
    b, c, h, w = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    config = config or default_config(c, hidden, c_out, x.dtype)
    grid = (triton.cdiv(h * w, config.block_p), b, triton.cdiv(c_out, config.block_n))
    r = residual if residual is not None else y
    m1 = head if head is not None else x
    _pointwise_mlp_kernel[grid](
        x, m1, scale if scale is not None else w1, shift if shift is not None else w1,
        w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, r, y,
        c, 0 if head is None else head.shape[1], hidden, c_out, h * w,
        *_pixel_strides(x), *_pixel_strides(m1), *_pixel_strides(r), *_pixel_strides(y),
        ACTIVATION=ACTIVATION_CODES[activation], HAS_AFFINE=scale is not None,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_P=config.block_p, BLOCK_K=config.block_k, BLOCK_H=config.block_h,
        BLOCK_N=config.block_n, UPCAST=upcast_dot(x.dtype), num_warps=config.warps,
        num_stages=config.stages)
    return y


# (activation, residual, affine) of the released models' MLPs: ReLU (T2 ... L) and GELU (T0,
# T1) with the block's residual (FasterNet blocks, and MLPs after PAT_sf); the same after
# PAT_ch's gate (PAT_ch blocks); GELU without a residual (PATNet-T1, whose PAT_sp follows).
_RELEASED_EPILOGUES = (("relu", True, False), ("gelu", True, False), ("relu", True, True),
                       ("gelu", True, True), ("gelu", False, False))


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check: the
    MLP widths (C -> 2C -> C) of every released stage with the epilogues of the released
    models (:data:`_RELEASED_EPILOGUES`; b1 from the folded BatchNorm, no b2)."""
    kernels, seen, fn = [], set(), _pointwise_mlp_kernel
    for c, (dtype, tname) in itertools.product(
            (32, 40, 48, 64, 96, 128, 144, 160, 192, 256, 320, 384, 512, 640, 768, 1536),
            TRITON_DTYPE.items()):
        config = default_config(c, 2 * c, c, dtype, interpret=False)
        if (config, dtype) in seen:
            continue
        seen.add((config, dtype))
        for activation, residual, affine in _RELEASED_EPILOGUES:
            kernels.append(AotKernel(
                f"pointwise_mlp[{tname}, K={config.block_k}, N={config.block_n}, {activation}, "
                f"residual={residual}, affine={affine}]", fn,
                # (without the affine the launcher passes w1 as the unused scale and shift)
                aot_signature(fn, {name: "*fp32" if affine and name in ("scale_ptr", "shift_ptr")
                                   else "*" + tname
                                   for name in fn.arg_names if name.endswith("_ptr")}),
                dict(ACTIVATION=ACTIVATION_CODES[activation], HAS_AFFINE=affine, HAS_B1=True,
                     HAS_B2=False, HAS_RESIDUAL=residual, BLOCK_P=config.block_p,
                     BLOCK_K=config.block_k, BLOCK_H=config.block_h, BLOCK_N=config.block_n,
                     UPCAST=upcast_dot(dtype, interpret=False)),
                num_warps=config.warps, num_stages=config.stages,
                launches=activation_launches("x", "h", "r", "y", pixel="sp")))
    return kernels
