"""Triton kernels of a BatchNorm followed by an activation: Y = act(Z), Z = (X - mean) * rstd *
gamma + beta, rstd = 1 / sqrt(var + eps) (the block MLP's BatchNorm and ReLU or exact GELU).

X and Y are (B, C, H, W), NCHW, channels_last or a channel slice of either: every kernel takes
each tensor's batch, channel and *pixel* stride (pixel p = h * W + w; a tensor whose (h, w) do
not flatten to one stride is copied first by the op). Arithmetic in fp32; stores cast to the
output's dtype.

Kernels:

* :func:`batch_moments` (training forward) -- per (channel block, sample, pixel chunk) the
  count-weighted mean and sum of squared deviations of X (``_moments_kernel``, tiles merged
  with Chan's formula), then one program per channel block merges those rows, a block a step,
  in a fixed order (``_merge_kernel``): the batch mean and biased variance, and the running
  statistics updated in the same launch. Deterministic, no atomics.
* :func:`apply` -- Y = act(Z) with the batch's or the running statistics: one pass.
* :func:`grad_sums` (backward) -- per channel sum dZ and sum dZ * xhat with dZ = dY * act'(Z), Z
  recomputed from X (the BN output is never stored): the gradients of beta and gamma, and the
  batch-statistics terms of dX.
* :func:`grad_input` -- dX = gamma * rstd * (dZ - sum dZ / N - xhat * sum dZ xhat / N) in
  training, gamma * rstd * dZ in eval.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TRITON_DTYPE, AotKernel, activation_launches, aot_signature,
                      block, cdiv, merge_moments, merge_rows, pixel_strides, program_of_sample,
                      tile_moments)
from .pointwise_mlp import ACTIVATION_CODES, _activation as activation


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz on an fp32 tile: ReLU (0): 1 where z > 0, else 0 (torch's threshold_backward
    on the output); the exact GELU (1): Phi(z) + z phi(z)."""
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, eps, offs_c, c_ok):
    """(mean, rstd, gamma, beta) of a block of channels, fp32 vectors."""
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
    gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    return mean, tl.rsqrt(var + eps), gamma, beta


@triton.jit
def _normalised_and_grad(x, dy, mean, rstd, gamma, beta, ACTIVATION: tl.constexpr):
    """(xhat, dZ) of a (pixels x channels) tile, fp32: xhat = (x - mean) * rstd and dZ = dY *
    act'(Z) with Z = xhat * gamma + beta recomputed (the forward never stored it)."""
    xhat = (x - mean[None, :]) * rstd[None, :]
    return xhat, dy * _activation_grad(xhat * gamma[None, :] + beta[None, :], ACTIVATION)


@triton.jit
def _tile(C, HW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sample, pixel offsets, channel offsets, channel mask, tile mask) of this program of a
    grid (cdiv(HW, BLOCK_P) * B, 1, cdiv(C, BLOCK_C)), a sample's pixel tiles in turn."""
    pid_p, pid_b = program_of_sample(tl.cdiv(HW, BLOCK_P))
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    return pid_b, offs_p, offs_c, c_ok, (offs_p < HW)[:, None] & c_ok[None, :]


@triton.jit
def _moments_kernel(
    x_ptr,  # (B, C, H, W) X, any strides with flattenable pixels
    mean_ptr,  # (B * SPLITS, C) fp32 contiguous, out: per (sample, pixel chunk) channel means
    m2_ptr,  # (B * SPLITS, C) fp32 contiguous, out: the sums of squared deviations
    C, HW, CHUNK,  # channels; pixels H * W; pixels per chunk (a multiple of BLOCK_P)
    x_sb, x_sc, x_sp,  # strides of X: batch, channel, pixel (elements)
    BLOCK_P: tl.constexpr,  # pixels per step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # grid: (cdiv(C, BLOCK_C) * B, 1, SPLITS), a sample's channel blocks in turn; chunk s
    # holds pixels [s CHUNK, (s + 1) CHUNK).
    pid_c, pid_b = program_of_sample(tl.cdiv(C, BLOCK_C))
    pid_s = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    x_base = x_ptr + pid_b * x_sb + offs_c[None, :] * x_sc
    seen = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(pid_s * CHUNK, tl.minimum(HW, (pid_s + 1) * CHUNK), BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < HW)[:, None] & c_ok[None, :]
        x = tl.load(x_base + offs_p[:, None] * x_sp, mask=ok, other=0.0).to(tl.float32)
        count, tile_mean, tile_m2 = tile_moments(x, ok)
        seen, mean, m2 = merge_moments(seen, mean, m2, count, tile_mean, tile_m2)
    row = pid_b * tl.num_programs(2) + pid_s
    tl.store(mean_ptr + row * C + offs_c, mean, mask=c_ok)
    tl.store(m2_ptr + row * C + offs_c, m2, mask=c_ok)


@triton.jit
def _merge_kernel(
    part_mean_ptr, part_m2_ptr,  # (ROWS, C) fp32 contiguous: _moments_kernel's rows
    mean_ptr, var_ptr,  # (C,) fp32, out: the batch mean and biased variance
    run_mean_ptr, run_var_ptr,  # (C,) the running mean and variance (any float dtype),
                                # updated in place if UPDATE (see _update_running)
    momentum,  # fp32: the running statistics' momentum (UPDATE)
    C, HW, CHUNK, SPLITS, ROWS,  # row r covers pixels of chunk r % SPLITS of one sample
    BLOCK_R: tl.constexpr,  # rows per step (loaded together: one memory round trip a step)
    BLOCK_C: tl.constexpr,  # channels per program
    UPDATE: tl.constexpr,  # update the running statistics
):
    # grid: (cdiv(C, BLOCK_C),). Blocks of rows merged in order (deterministic).
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    seen = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < ROWS
        count = tl.where(r_ok, tl.minimum(CHUNK, HW - (rows % SPLITS) * CHUNK), 0)
        ok = r_ok[:, None] & c_ok[None, :]
        at = rows[:, None] * C + offs_c[None, :]
        rows_count, rows_mean, rows_m2 = merge_rows(
            tl.broadcast_to(count.to(tl.float32)[:, None], (BLOCK_R, BLOCK_C)),
            tl.load(part_mean_ptr + at, mask=ok, other=0.0),
            tl.load(part_m2_ptr + at, mask=ok, other=0.0))
        seen, mean, m2 = merge_moments(seen, mean, m2, rows_count, rows_mean, rows_m2)
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + offs_c, m2 / seen, mask=c_ok)
    if UPDATE:  # (the variance's batch value unbiased, as F.batch_norm; training has N > 1)
        _update_running(run_mean_ptr, mean, momentum, offs_c, c_ok)
        _update_running(run_var_ptr, m2 / (seen - 1.0), momentum, offs_c, c_ok)


@triton.jit
def _apply_kernel(
    x_ptr,  # (B, C, H, W) X, any strides with flattenable pixels
    y_ptr,  # (B, C, H, W) out: Y, any strides with flattenable pixels
    mean_ptr, var_ptr,  # (C,) fp32: the statistics normalised with (batch or running)
    w_ptr, b_ptr,  # (C,) fp32: gamma, beta
    eps,  # fp32
    C, HW,
    x_sb, x_sc, x_sp,  # strides of X (elements)
    y_sb, y_sc, y_sp,  # strides of Y (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
    ACTIVATION: tl.constexpr,  # 0 ReLU, 1 exact GELU
):
    # grid: (cdiv(HW, BLOCK_P) * B, 1, cdiv(C, BLOCK_C))
    pid_b, offs_p, offs_c, c_ok, ok = _tile(C, HW, BLOCK_P, BLOCK_C)
    mean, rstd, gamma, beta = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, eps, offs_c, c_ok)
    x = tl.load(x_ptr + pid_b * x_sb + offs_c[None, :] * x_sc + offs_p[:, None] * x_sp, mask=ok,
                other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * (rstd * gamma)[None, :] + beta[None, :]
    tl.store(y_ptr + pid_b * y_sb + offs_c[None, :] * y_sc + offs_p[:, None] * y_sp,
             activation(z, ACTIVATION).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_sums_kernel(
    x_ptr,  # (B, C, H, W) X, any strides with flattenable pixels
    gy_ptr,  # (B, C, H, W) dY, any strides with flattenable pixels
    mean_ptr, var_ptr,  # (C,) fp32: the statistics normalised with
    w_ptr, b_ptr,  # (C,) fp32: gamma, beta
    sums_ptr,  # (2, B * SPLITS, C) fp32 contiguous, out: per (sample, chunk) sum dZ, sum dZ xhat
    eps,  # fp32
    C, HW, CHUNK,  # channels; pixels; pixels per chunk (a multiple of BLOCK_P)
    x_sb, x_sc, x_sp,  # strides of X (elements)
    g_sb, g_sc, g_sp,  # strides of dY (elements)
    BLOCK_P: tl.constexpr,  # pixels per step
    BLOCK_C: tl.constexpr,  # channels per program
    ACTIVATION: tl.constexpr,  # 0 ReLU, 1 exact GELU
):
    # grid: (cdiv(C, BLOCK_C) * B, 1, SPLITS), a sample's channel blocks in turn
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid_c, pid_b = program_of_sample(c_blocks)
    pid_s = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mean, rstd, gamma, beta = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, eps, offs_c, c_ok)
    x_base = x_ptr + pid_b * x_sb + offs_c[None, :] * x_sc
    g_base = gy_ptr + pid_b * g_sb + offs_c[None, :] * g_sc
    sum_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(pid_s * CHUNK, tl.minimum(HW, (pid_s + 1) * CHUNK), BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < HW)[:, None] & c_ok[None, :]
        x = tl.load(x_base + offs_p[:, None] * x_sp, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(g_base + offs_p[:, None] * g_sp, mask=ok, other=0.0).to(tl.float32)
        xhat, dz = _normalised_and_grad(x, dy, mean, rstd, gamma, beta, ACTIVATION)
        sum_dz += tl.sum(dz, 0)  # (dY, so dZ, is 0 outside the tile)
        sum_dz_xhat += tl.sum(dz * xhat, 0)
    row = pid_b * tl.num_programs(2) + pid_s
    rows = (tl.num_programs(0) // c_blocks) * tl.num_programs(2)
    tl.store(sums_ptr + row * C + offs_c, sum_dz, mask=c_ok)
    tl.store(sums_ptr + (rows + row) * C + offs_c, sum_dz_xhat, mask=c_ok)


@triton.jit
def _grad_input_kernel(
    x_ptr,  # (B, C, H, W) X, any strides with flattenable pixels
    gy_ptr,  # (B, C, H, W) dY, any strides with flattenable pixels
    gx_ptr,  # (B, C, H, W) out: dX, any strides with flattenable pixels
    mean_ptr, var_ptr,  # (C,) fp32: the statistics normalised with
    w_ptr, b_ptr,  # (C,) fp32: gamma, beta
    sums_ptr,  # (2, C) fp32 contiguous: sum dZ, sum dZ xhat over the batch (read if TRAIN)
    eps, inv_n,  # fp32: the BatchNorm's eps; 1 / (B * H * W)
    C, HW,
    x_sb, x_sc, x_sp,  # strides of X (elements)
    g_sb, g_sc, g_sp,  # strides of dY (elements)
    o_sb, o_sc, o_sp,  # strides of dX (elements)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
    ACTIVATION: tl.constexpr,  # 0 ReLU, 1 exact GELU
    TRAIN: tl.constexpr,  # batch statistics (their gradient terms) or running ones
):
    # grid: (cdiv(HW, BLOCK_P) * B, 1, cdiv(C, BLOCK_C))
    pid_b, offs_p, offs_c, c_ok, ok = _tile(C, HW, BLOCK_P, BLOCK_C)
    mean, rstd, gamma, beta = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, eps, offs_c, c_ok)
    x = tl.load(x_ptr + pid_b * x_sb + offs_c[None, :] * x_sc + offs_p[:, None] * x_sp, mask=ok,
                other=0.0).to(tl.float32)
    dy = tl.load(gy_ptr + pid_b * g_sb + offs_c[None, :] * g_sc + offs_p[:, None] * g_sp,
                 mask=ok, other=0.0).to(tl.float32)
    xhat, dz = _normalised_and_grad(x, dy, mean, rstd, gamma, beta, ACTIVATION)
    if TRAIN:
        mean_dz = tl.load(sums_ptr + offs_c, mask=c_ok, other=0.0) * inv_n
        mean_dz_xhat = tl.load(sums_ptr + C + offs_c, mask=c_ok, other=0.0) * inv_n
        dz = dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]
    tl.store(gx_ptr + pid_b * o_sb + offs_c[None, :] * o_sc + offs_p[:, None] * o_sp,
             (dz * (gamma * rstd)[None, :]).to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _update_running(run_ptr, batch, momentum, offs_c, c_ok):
    """running = running + momentum * (batch - running) in fp32 (torch's lerp), stored in the
    running buffer's dtype: a BatchNorm's running statistic (C,) moved towards ``batch``."""
    running = tl.load(run_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(run_ptr + offs_c, (running + momentum * (batch - running)).to(
        run_ptr.dtype.element_ty), mask=c_ok)


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------
def _blocks(c: int, interpret: bool = INTERPRET) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of every kernel but the merge."""
    if interpret:  # few, big programs: the interpreter pays per program and per operation
        return 256, block(c, high=64), 4
    return 64, 64, 4


def _merge_block_r(interpret: bool = INTERPRET) -> int:
    """Rows per step of the merge. A step is one memory round trip (a row per step made the
    merge a serial chain of B x SPLITS round trips: 1024 at batch 256 and 56 x 56, on one or
    two programs); on a GPU 32 rows (x 64 channels, 16 values of each partial per thread).
    Under the interpreter 4, so that the tests' few rows take several steps, one partial."""
    return 4 if interpret else 32


def _chunk(hw: int, block_p: int, interpret: bool = INTERPRET) -> int:
    """Pixels per chunk of the reductions: enough per program to amortise its start and its
    row of partial sums (the rows are 1 / CHUNK of the activation's size)."""
    return block_p if interpret else max(block_p, min(1024, cdiv(hw, block_p) * block_p))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _reduction_grid(x: torch.Tensor) -> Tuple[Tuple[int, int, int], int, int, int]:
    """(grid, CHUNK, BLOCK_P, BLOCK_C) of the two reductions over X."""
    b, c, h, w = x.shape
    block_p, block_c, _ = _blocks(c)
    chunk = _chunk(h * w, block_p)
    return (cdiv(c, block_c) * b, 1, cdiv(h * w, chunk)), chunk, block_p, block_c


def batch_moments(x: torch.Tensor,
                  running: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  momentum: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of each channel of x (B, C, H, W) over (B, H, W), fp32 (C,);
    ``running``: the BatchNorm's (running mean, running var), each (C,) contiguous, moved
    towards the batch's (the variance's unbiased) by ``momentum`` in the same launch, as
    ``F.batch_norm`` does in training; or None."""
    b, c, h, w = x.shape
    grid, chunk, block_p, block_c = _reduction_grid(x)
    rows = b * grid[2]
    part = torch.empty((2, rows, c), device=x.device, dtype=torch.float32)
    _moments_kernel[grid](x, part[0], part[1], c, h * w, chunk, *pixel_strides(x),
                          BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_blocks(c)[2])
    mean, var = (torch.empty((c,), device=x.device, dtype=torch.float32) for _ in range(2))
    run_mean, run_var = running if running is not None else (mean, var)
    _merge_kernel[(cdiv(c, block_c),)](
        part[0], part[1], mean, var, run_mean, run_var, float(momentum), c, h * w, chunk, grid[2],
        rows, BLOCK_R=_merge_block_r(), BLOCK_C=block_c, UPDATE=running is not None)
    return mean, var


def apply(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
          weight: torch.Tensor, bias: torch.Tensor, eps: float, activation_name: str) -> None:
    """y = act((x - mean) / sqrt(var + eps) * weight + bias); x, y (B, C, H, W) with
    flattenable pixels, the vectors fp32 (C,)."""
    b, c, h, w = x.shape
    block_p, block_c, warps = _blocks(c)
    grid = (cdiv(h * w, block_p) * b, 1, cdiv(c, block_c))
    _apply_kernel[grid](x, y, mean, var, weight, bias, eps, c, h * w, *pixel_strides(x),
                        *pixel_strides(y), BLOCK_P=block_p, BLOCK_C=block_c,
                        ACTIVATION=ACTIVATION_CODES[activation_name], num_warps=warps)


def grad_sums(x: torch.Tensor, grad_y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor, eps: float, activation_name: str
              ) -> torch.Tensor:
    """[sum dZ; sum dZ * xhat] over (B, H, W), fp32 (2, C), dZ = dY * act'(Z)."""
    b, c, h, w = x.shape
    grid, chunk, block_p, block_c = _reduction_grid(x)
    part = torch.empty((2, b * grid[2], c), device=x.device, dtype=torch.float32)
    _grad_sums_kernel[grid](x, grad_y, mean, var, weight, bias, part, eps, c, h * w, chunk,
                            *pixel_strides(x), *pixel_strides(grad_y), BLOCK_P=block_p,
                            BLOCK_C=block_c, ACTIVATION=ACTIVATION_CODES[activation_name],
                            num_warps=_blocks(c)[2])
    return part.sum(1)


def grad_input(x: torch.Tensor, grad_y: torch.Tensor, grad_x: torch.Tensor, mean: torch.Tensor,
               var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               sums: Optional[torch.Tensor], eps: float, activation_name: str) -> None:
    """grad_x = dX; ``sums``: :func:`grad_sums` in training (batch statistics), None in eval."""
    b, c, h, w = x.shape
    block_p, block_c, warps = _blocks(c)
    grid = (cdiv(h * w, block_p) * b, 1, cdiv(c, block_c))
    _grad_input_kernel[grid](
        x, grad_y, grad_x, mean, var, weight, bias, mean if sums is None else sums, eps,
        1.0 / (b * h * w),
        c, h * w, *pixel_strides(x), *pixel_strides(grad_y), *pixel_strides(grad_x),
        BLOCK_P=block_p, BLOCK_C=block_c, ACTIVATION=ACTIVATION_CODES[activation_name],
        TRAIN=sums is not None, num_warps=warps)


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# --------------------------------------------------------------------------------------------
def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check
    (block sizes do not depend on the shape on a GPU: one configuration per kernel, dtype and
    constexpr flag)."""
    block_p, block_c, warps = _blocks(0, interpret=False)
    tiles = dict(BLOCK_P=block_p, BLOCK_C=block_c)
    f32 = "*fp32"
    vectors = {name: f32 for name in ("mean_ptr", "var_ptr", "w_ptr", "b_ptr")}
    scalars = {"eps": "fp32", "inv_n": "fp32"}
    # (the models' training: running statistics kept, float32 buffers, or fp16 / bf16 ones
    # in a model cast to that dtype; without them)
    kernels = [AotKernel(f"bn_act_merge[update={update}{running}]", _merge_kernel,
                         aot_signature(_merge_kernel, {n: f32 for n in (
                             "part_mean_ptr", "part_m2_ptr", "mean_ptr", "var_ptr")} | {
                             n: "*" + run for n in ("run_mean_ptr", "run_var_ptr")},
                             {"momentum": "fp32"}),
                         dict(BLOCK_R=_merge_block_r(interpret=False), BLOCK_C=block_c,
                              UPDATE=update),
                         # (a small batch's partials in one split: SPLITS = 1 a constexpr)
                         launches={"aligned": (), "one split": ("SPLITS",)})
               for update, run, running in ((True, "fp32", ""), (True, "fp16", ", running fp16"),
                                            (True, "bf16", ", running bf16"),
                                            (False, "fp32", ""))]
    for dtype, tname in TRITON_DTYPE.items():
        ptr = "*" + tname
        kernels.append(AotKernel(
            f"bn_act_moments[{tname}]", _moments_kernel,
            aot_signature(_moments_kernel, {"x_ptr": ptr, "mean_ptr": f32, "m2_ptr": f32}),
            dict(tiles), num_warps=warps, launches=activation_launches("x", pixel="sp")))
        for name, code in ACTIVATION_CODES.items():
            act = dict(tiles, ACTIVATION=code)
            kernels.append(AotKernel(
                f"bn_act_apply[{tname}, {name}]", _apply_kernel,
                aot_signature(_apply_kernel, dict(vectors, x_ptr=ptr, y_ptr=ptr), scalars),
                act, num_warps=warps, launches=activation_launches("x", "y", pixel="sp")))
            kernels.append(AotKernel(
                f"bn_act_grad_sums[{tname}, {name}]", _grad_sums_kernel,
                aot_signature(_grad_sums_kernel, dict(vectors, x_ptr=ptr, gy_ptr=ptr,
                                                      sums_ptr=f32), scalars),
                act, num_warps=warps, launches=activation_launches("x", "g", pixel="sp")))
            for train in (True, False):
                kernels.append(AotKernel(
                    f"bn_act_grad_input[{tname}, {name}, train={train}]", _grad_input_kernel,
                    aot_signature(_grad_input_kernel, dict(vectors, x_ptr=ptr, gy_ptr=ptr,
                                                           gx_ptr=ptr, sums_ptr=f32),
                                  scalars),
                    dict(act, TRAIN=train), num_warps=warps,
                    launches=activation_launches("x", "g", "o", pixel="sp")))
    return kernels
