"""Triton kernels of attention with a gathered relative-position bias (iRPE "bias" mode, PAT_sf).

O = dropout(softmax(scale * q k^T + table[h, bucket[i, j]])) v, flash-style: the N x N scores are
never written to memory. Each program holds a block of queries (forward, dQ) or keys (dK / dV),
loops over the other side in blocks, and gathers the bias from the (heads, num_buckets) table
through the (N, N) bucket ids inside the loop. At N <= 64 (7 x 7 = 49 tokens of classification)
one dK/dV program holds every key of a head and also writes its dQ, and in fp16 / bf16 one
forward program holds every query (fp32, whose IEEE dots run on FMA units, uses smaller tiles:
see _CONFIGS). Head dims are padded to a power of two (at least 64) and masked.

* :func:`rpe_attention_forward` -- online softmax (flash-attention 2); writes O and the row
  log-sum-exp (fp32) that the backward uses to recompute the probabilities.
* :func:`rpe_attention_backward` -- dK, dV per key block, looping over the query blocks of the
  batches of one split (``_rpe_bwd_kv_kernel``); dQ in the same program when one key block covers
  every key, else in a second pass (``_rpe_bwd_q_kernel``), or with fp32 atomics when allowed.
  The table gradient: dS summed over the batches of a split per (h, i, j) into an fp32 buffer,
  each element owned by one program (no atomics), then per bucket over a stable sort of the
  bucket map (``_rpe_table_grad_kernel``): a fixed summation order, so bit-identical run to run.
  With ``deterministic=False`` dS and dQ are accumulated with ``tl.atomic_add`` instead.
* Dropout: Philox (``tl.randint``) keyed by a 64-bit seed at counter
  ((b * heads + h) * N + i) * N + j; keep when its top 31 bits >= p * 2^31, kept weights scaled
  by 1 / (1 - p) (as F.dropout). The backward regenerates the same mask;
  :func:`dropout_keep_mask` writes it out for tests.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._types import DROPOUT_SEED_RANGE
from ._common import (TRITON_DTYPE, AotKernel, aot_signature, block, cdiv, reduction_splits,
                      upcast_dot)

# Dropout seeds lie in [SEED_LOW, SEED_HIGH) (see DROPOUT_SEED_RANGE).
SEED_LOW, SEED_HIGH = DROPOUT_SEED_RANGE


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation: in fp32 (IEEE, no TF32) when UPCAST, else in a's dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _keep(seed, bh, offs_m, offs_n, N, drop_threshold):
    """Dropout keep mask (BLOCK_M, BLOCK_N) of rows offs_m, columns offs_n of head bh = b*heads+h.

    Philox counter ((b * heads + h) * N + i) * N + j (64-bit); kept when the random's top 31 bits
    are >= drop_threshold = round(p * 2^31).
    """
    base = bh.to(tl.int64) * N * N
    offs = base + (offs_m[:, None] * N + offs_n[None, :]).to(tl.int64)
    r = tl.randint(seed, offs)
    return (r >> 1).to(tl.int32) >= drop_threshold


@triton.jit
def _logits(q, kt, table_ptr, bucket_ptr, h, NB, N, offs_m, offs_n, valid, scale,
            UPCAST: tl.constexpr):
    """scale * q k^T + table[h, bucket[i, j]] for one (BLOCK_M, BLOCK_N) tile, fp32."""
    s = _dot(q, kt, UPCAST) * scale
    ids = tl.load(bucket_ptr + offs_m[:, None] * N + offs_n[None, :], mask=valid, other=0)
    return s + tl.load(table_ptr + h * NB + ids)


@triton.jit
def _rpe_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, heads, N, D) each, any strides (given below), same dtype
    table_ptr,  # (heads, NB) fp32 contiguous: the bias table
    bucket_ptr,  # (N, N) int32 contiguous: bucket ids in [0, NB)
    o_ptr,  # (B, heads, N, D) q's dtype, unit stride over D: the output
    lse_ptr,  # (B, heads, N) fp32 contiguous: natural log-sum-exp of each row of logits
    heads, N, D, NB,
    sq_b, sq_h, sq_n, sq_d,  # strides of q (elements)
    sk_b, sk_h, sk_n, sk_d,  # strides of k
    sv_b, sv_h, sv_n, sv_d,  # strides of v
    so_b, so_h, so_n,  # strides of o over B, heads, N
    scale,  # fp32 logit scale
    seed,  # int64 Philox key (used only when DROPPING)
    drop_threshold,  # int32 round(p * 2^31)
    drop_scale,  # fp32 1 / (1 - p)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two (masked)
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
    DROPPING: tl.constexpr,  # apply dropout
):
    # grid: (B * heads, cdiv(N, BLOCK_M)), the batch on axis 0 (_common.MAX_GRID_YZ)
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (D, BLOCK_N)
        valid = m_ok[:, None] & n_ok[None, :]
        s = _logits(q, kt, table_ptr, bucket_ptr, h, NB, N, offs_m, offs_n, valid, scale, UPCAST)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPPING:
            keep = _keep(seed, bh, offs_m, offs_n, N, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _rpe_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, heads, N, D) each, any strides, same dtype
    o_ptr,  # (B, heads, N, D), unit stride over D: the forward output
    do_ptr,  # (B, heads, N, D) any strides: dL/dO
    lse_ptr,  # (B, heads, N) fp32 contiguous: from the forward
    table_ptr,  # (heads, NB) fp32 contiguous
    bucket_ptr,  # (N, N) int32 contiguous
    dq_ptr,  # (B, heads, N, D) contiguous, q's dtype: written only when one_kblock
    dq_acc_ptr,  # (B, heads, N, D) fp32 contiguous, zeroed: dQ accumulated when atomic
    dk_ptr, dv_ptr,  # (B, heads, N, D) contiguous, q's dtype
    ds_ptr,  # (SPLITS, heads, N, N) fp32 contiguous: split s gets the sum of dS over its
    #          batches b = s, s + SPLITS, ...; with atomic: (1, heads, N, N), zeroed
    B, heads, N, D, NB,
    sq_b, sq_h, sq_n, sq_d,  # strides of q
    sk_b, sk_h, sk_n, sk_d,  # strides of k
    sv_b, sv_h, sv_n, sv_d,  # strides of v
    sd_b, sd_h, sd_n, sd_d,  # strides of do
    so_b, so_h, so_n,  # strides of o over B, heads, N
    scale, seed, drop_threshold, drop_scale,  # as in the forward
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
    DROPPING: tl.constexpr,  # apply dropout
    ONE_KBLOCK: tl.constexpr,  # N <= BLOCK_N, this program sees every key: write dQ, delta
    #                            from P.dP
    ATOMIC: tl.constexpr,  # accumulate dS and dQ (unless ONE_KBLOCK) with fp32 atomics
):
    # grid: (heads * SPLITS, cdiv(N, BLOCK_N)), SPLITS = B with atomics (so on axis 0:
    # _common.MAX_GRID_YZ); program (s * heads + h, j) handles key block j of head h for the
    # batches s, s + SPLITS, ... in that order.
    split = tl.program_id(0) // heads
    h = tl.program_id(0) % heads
    splits = tl.num_programs(0) // heads
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]
    ds_head = ds_ptr + (split * heads + h).to(tl.int64) * N * N
    if ATOMIC:
        ds_head = ds_ptr + h.to(tl.int64) * N * N
    for b in range(split, B, splits):
        bh = b * heads + h
        b64 = h.to(tl.int64) * 0 + b  # (the loop index is a plain int under the interpreter)
        k = tl.load(k_ptr + b64 * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=nd_ok, other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_ptr + b64 * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                    mask=nd_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        kt = tl.trans(k)
        vt = tl.trans(v)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N
            md_ok = m_ok[:, None] & d_ok[None, :]
            valid = m_ok[:, None] & n_ok[None, :]
            row = bh.to(tl.int64) * N + offs_m
            q = tl.load(q_ptr + b64 * sq_b + h * sq_h + offs_m[:, None] * sq_n
                        + offs_d[None, :] * sq_d, mask=md_ok, other=0.0)
            do = tl.load(do_ptr + b64 * sd_b + h * sd_h + offs_m[:, None] * sd_n
                         + offs_d[None, :] * sd_d, mask=md_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
            s = _logits(q, kt, table_ptr, bucket_ptr, h, NB, N, offs_m, offs_n, valid, scale,
                        UPCAST)
            # Softmax probabilities exp(s - lse); at N = 1 exactly 1, as the forward computes
            # them (exp(s - max) / sum with max = s, sum = 1). This program's logits come from
            # other tile shapes than the forward's (another summation order where the dot is not
            # per-element exact, as under the interpreter), so exp(s - lse) would be 1 + noise
            # there: fp32 noise (~1e-6) in dQ, dK and the table gradient, whose exact values are
            # 0, and an ulp in dV. With P = 1, delta = rowsum(P dP) = dP and dS = 0 exactly.
            # (A select, not a branch: an scf.if yielding this tile doubles the loop body and
            # its spills. N > 1: unchanged, bit for bit.)
            p = tl.where(valid, tl.exp(tl.where(N == 1, 0.0, s - lse[:, None])), 0.0)
            dp = _dot(do, vt, UPCAST)  # dL/d(dropped probabilities)
            pd = p
            if DROPPING:
                keep = _keep(seed, bh, offs_m, offs_n, N, drop_threshold)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            if ONE_KBLOCK:  # rowsum(P * dP) over every key, exact for this program
                delta = tl.sum(p * dp, 1)
            else:  # the same sum as rowsum(dO * O)
                o = tl.load(o_ptr + b64 * so_b + h * so_h + offs_m[:, None] * so_n
                            + offs_d[None, :], mask=md_ok, other=0.0)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            ds = p * (dp - delta[:, None])  # dL/d(logits), (BLOCK_M, BLOCK_N) fp32
            dv += _dot(tl.trans(pd).to(do.dtype), do, UPCAST)
            dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST)
            if ONE_KBLOCK:
                dq = _dot(ds.to(k.dtype), k, UPCAST) * scale
                tl.store(dq_ptr + row[:, None] * D + offs_d[None, :],
                         dq.to(dq_ptr.dtype.element_ty), mask=md_ok)
            elif ATOMIC:
                dq = _dot(ds.to(k.dtype), k, UPCAST) * scale
                tl.atomic_add(dq_acc_ptr + row[:, None] * D + offs_d[None, :], dq, mask=md_ok)
            ds_at = ds_head + offs_m[:, None] * N + offs_n[None, :]
            if ATOMIC:
                tl.atomic_add(ds_at, ds, mask=valid)
            else:  # this program owns these elements of its split: plain read-modify-write
                # (the batch test as a tile: the interpreter mistypes a bool tile & scalar)
                later = (offs_n[None, :] * 0 + b64) > split
                ds += tl.load(ds_at, mask=valid & later, other=0.0)
                tl.store(ds_at, ds, mask=valid)
        out = (bh.to(tl.int64) * N + offs_n)[:, None] * D + offs_d[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=nd_ok)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=nd_ok)


@triton.jit
def _rpe_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, heads, N, D) each, any strides, same dtype
    o_ptr,  # (B, heads, N, D), unit stride over D: the forward output
    do_ptr,  # (B, heads, N, D) any strides: dL/dO
    lse_ptr,  # (B, heads, N) fp32 contiguous
    table_ptr,  # (heads, NB) fp32 contiguous
    bucket_ptr,  # (N, N) int32 contiguous
    dq_ptr,  # (B, heads, N, D) contiguous, q's dtype
    heads, N, D, NB,
    sq_b, sq_h, sq_n, sq_d,  # strides of q
    sk_b, sk_h, sk_n, sk_d,  # strides of k
    sv_b, sv_h, sv_n, sv_d,  # strides of v
    sd_b, sd_h, sd_n, sd_d,  # strides of do
    so_b, so_h, so_n,  # strides of o over B, heads, N
    scale, seed, drop_threshold, drop_scale,  # as in the forward
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    UPCAST: tl.constexpr,  # tl.dot in fp32 (IEEE) instead of the input dtype
    DROPPING: tl.constexpr,  # apply dropout
):
    # grid: (B * heads, cdiv(N, BLOCK_M)), the batch on axis 0. dQ = scale * dS K, recomputing
    # dS per key block.
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    row = bh.to(tl.int64) * N + offs_m
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=md_ok, other=0.0)
    do = tl.load(do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_n + offs_d[None, :] * sd_d,
                 mask=md_ok, other=0.0)
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
                mask=md_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        valid = m_ok[:, None] & n_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=nd_ok,
                    other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * sv_n + offs_d[:, None] * sv_d,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = _logits(q, tl.trans(k), table_ptr, bucket_ptr, h, NB, N, offs_m, offs_n, valid,
                    scale, UPCAST)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, UPCAST)
        if DROPPING:
            keep = _keep(seed, bh, offs_m, offs_n, N, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST)
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=md_ok)


@triton.jit
def _rpe_table_grad_kernel(
    ds_ptr,  # (SPLITS, heads, N * N) fp32 contiguous: dS summed over batches, per split
    order_ptr,  # (N * N,) int32: flat indices i * N + j, stably sorted by bucket id
    seg_ptr,  # (COUNT + 1,) int32: bucket LOW + t owns order[seg[t]:seg[t + 1]]
    dtable_ptr,  # (heads, NB) fp32 contiguous: receives column LOW + t of each head
    SPLITS, heads, NN, NB, LOW,
    BLOCK_S: tl.constexpr,  # splits per step
    BLOCK: tl.constexpr,  # entries per step
):
    # grid: (COUNT, heads). Lane (s, l) sums entries l, l + BLOCK, ... of splits s, s + BLOCK_S,
    # ... in a fixed order, then the lanes are reduced: the same bits on every run. A step
    # loads BLOCK_S splits at once (one memory round trip: the 66 splits of a 7 x 7 map's
    # batch of 256 in 17 steps, not 66 of two dependent loads each).
    t = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(seg_ptr + t)
    end = tl.load(seg_ptr + t + 1)
    acc = tl.zeros((BLOCK_S, BLOCK), tl.float32)
    for i0 in range(start, end, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        ok = idx < end
        flat = tl.load(order_ptr + idx, mask=ok, other=0)
        for s0 in range(0, SPLITS, BLOCK_S):
            split = s0 + tl.arange(0, BLOCK_S)
            at = (split[:, None] * heads + h).to(tl.int64) * NN + flat[None, :]
            acc += tl.load(ds_ptr + at, mask=(split < SPLITS)[:, None] & ok[None, :],
                           other=0.0)
    tl.store(dtable_ptr + h * NB + LOW + t, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _dropout_mask_kernel(
    keep_ptr,  # (B * heads, N, N) int8 contiguous: 1 where the kernels keep a weight
    N, seed, drop_threshold,  # as in the forward
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (B * heads, cdiv(N, BLOCK_M), cdiv(N, BLOCK_N)), the batch on axis 0
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, offs_m, offs_n, N, drop_threshold)
    at = keep_ptr + (bh.to(tl.int64) * N + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(at, keep.to(tl.int8), mask=(offs_m < N)[:, None] & (offs_n < N)[None, :])


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------
# The table gradient's sum, splits and entries per step: 4 x 512 fp32 in flight a step (under
# the interpreter its 2 splits take one partial step).
_TABLE_BLOCKS = dict(BLOCK_S=4, BLOCK=512)
_MASK_BLOCK = 64
MAX_HEAD_DIM = 256

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by padded head dim, for fp16 / bf16
# and for fp32 (whose IEEE tl.dot runs on FMA units and stages every operand through shared
# memory: smaller tiles, no software pipelining, to fit an A100's 163 KiB and compile in seconds).
# The key block of the dK/dV kernel is 64 wherever it fits (not fp32 at D = 256), so that at
# N <= 64 (7 x 7 = 49 tokens) one program holds every key of a head and writes dQ too. Each is
# the configuration of a sweep of tiles, warps and stages (2026-12-07, every mode of
# :func:`_modes` compiled for sm_90 and sm_80 under Triton 3.9 and for sm_90 under 3.6, the
# GPU machines') with the least local memory, the largest tiles among equals: none in fp16 /
# bf16 but the dK/dV kernel at D = 256 (at most 40 B per thread, 16 to 64 queries a step and
# 4 to 16 warps all spill there), where the earlier configurations kept up to 432 B (the dQ
# kernel at D = 256) and the dK/dV kernel 280 B at D = 64. Chosen from the machine code, not
# timed: no GPU has run them; ``python -m benchmarks.sweep_rpe_attention`` times them on one.
_CONFIGS = {
    False: {  # fp16 / bf16
        64: {"fwd": (64, 64, 4, 2), "kv": (16, 64, 8, 1), "q": (64, 64, 4, 2)},
        128: {"fwd": (64, 64, 8, 2), "kv": (16, 64, 8, 2), "q": (64, 32, 8, 2)},
        256: {"fwd": (64, 32, 8, 2), "kv": (16, 64, 8, 1), "q": (32, 64, 8, 2)},
    },
    True: {  # fp32
        64: {"fwd": (64, 32, 8, 1), "kv": (16, 64, 8, 1), "q": (32, 32, 8, 1)},
        128: {"fwd": (32, 32, 8, 1), "kv": (16, 64, 8, 1), "q": (16, 32, 8, 1)},
        256: {"fwd": (32, 32, 8, 1), "kv": (16, 32, 8, 1), "q": (16, 16, 8, 1)},
    },
}


# A configuration of one kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages).
Config = Tuple[int, int, int, int]


def _config(head_dim: int, dtype: torch.dtype, kernel: str,
            chosen: Optional[Dict[str, Config]] = None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of ``kernel`` ("fwd", "kv", "q"):
    ``chosen[kernel]`` where given (the tuning sweep's), else the shipped one.

    The head dim is padded to the next power of two, at least 64 (48 -> 64, 72 / 96 -> 128,
    144 / 192 / 240 -> 256), and masked: every launch but the sweep's is one of the shipped
    configurations (:func:`aot_kernels`), under the interpreter too (only its arithmetic is fp32
    throughout).
    Head dims above MAX_HEAD_DIM have none.
    """
    block_d = block(head_dim, low=64)
    if block_d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton rpe_attention kernels take head dims up to {MAX_HEAD_DIM}, "
                         f"got {head_dim}")
    block_m, block_n, warps, stages = (chosen or {}).get(
        kernel, _CONFIGS[dtype == torch.float32][block_d][kernel])
    return block_m, block_n, block_d, warps, stages


def _dropout_args(dropout_p: float, seed: int):
    """(seed, dropping, drop_threshold, drop_scale) of the kernels for rate ``dropout_p``."""
    if dropout_p <= 0.0:
        return SEED_LOW, False, 0, 1.0
    if not SEED_LOW <= seed < SEED_HIGH:
        raise ValueError(f"dropout seed must be in [2^32, 2^62), got {seed}")
    threshold = min(int(round(dropout_p * 2 ** 31)), 2 ** 31 - 1)
    return seed, True, threshold, 1.0 / (1.0 - dropout_p)


def _strides4(t: torch.Tensor):
    return tuple(t.stride())


def rpe_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          table32: torch.Tensor, ids32: torch.Tensor, scale: float,
                          dropout_p: float, seed: int, configs: Optional[Dict[str, Config]] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O, lse): O (B, heads, N, d) in q's dtype, laid out as (B, N, heads, d) contiguous (so
    that merging its heads, ``O.transpose(1, 2).reshape(B, N, heads * d)``, is a view), lse
    (B, heads, N) fp32 contiguous.

    q, k, v: (B, heads, N, d), any strides; table32: (heads, NB) fp32 contiguous; ids32: (N, N)
    int32 contiguous, ids in [0, NB); seed: see :func:`draw_seed` (ignored when dropout_p == 0);
    configs: {"fwd": :data:`Config`} to launch instead of the shipped one (the tuning sweep).
    """
    bsz, heads, n, d = q.shape
    block_m, block_n, block_d, warps, stages = _config(d, q.dtype, "fwd", configs)
    out = torch.empty((bsz, n, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    seed, dropping, threshold, drop_scale = _dropout_args(dropout_p, seed)
    _rpe_fwd_kernel[(bsz * heads, cdiv(n, block_m))](
        q, k, v, table32, ids32, out, lse, heads, n, d, table32.shape[1],
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out)[:3],
        float(scale), seed, threshold, drop_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast_dot(q.dtype),
        DROPPING=dropping, num_warps=warps, num_stages=stages)
    return out, lse


def _splits(bsz: int, programs_per_split: int, atomic: bool) -> int:
    """How many groups the batches are split into for the dK/dV kernel (one fp32 dS buffer of
    (heads, N, N) each): enough programs for about two per multiprocessor; with atomics one
    group per batch (they share one buffer)."""
    return bsz if atomic else reduction_splits(bsz, programs_per_split, 2)


def rpe_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           table32: torch.Tensor, ids32: torch.Tensor, order: torch.Tensor,
                           seg: torch.Tensor, low: int, scale: float, dropout_p: float,
                           seed: int, deterministic: bool = True,
                           configs: Optional[Dict[str, Config]] = None):
    """(dq, dk, dv, dtable): dq, dk, dv (B, heads, N, d) contiguous in q's dtype; dtable
    (heads, NB) fp32.

    ``out`` and ``lse`` come from :func:`rpe_attention_forward` with the same arguments;
    ``order``, ``seg``, ``low`` from :func:`bucket_segments`. With ``deterministic`` (default)
    no float atomics are used and every gradient is the same bits on every run. configs:
    {"kv" / "q": :data:`Config`} to launch instead of the shipped ones (the tuning sweep).
    """
    bsz, heads, n, d = q.shape
    nb = table32.shape[1]
    kv_m, kv_n, block_d, kv_warps, kv_stages = _config(d, q.dtype, "kv", configs)
    seed, dropping, threshold, drop_scale = _dropout_args(dropout_p, seed)
    kblocks = cdiv(n, kv_n)
    one_kblock = kblocks == 1
    atomic = not deterministic
    splits = _splits(bsz, kblocks * heads, atomic)
    dq = torch.empty((bsz, heads, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if atomic:
        ds = torch.zeros((1, heads, n, n), dtype=torch.float32, device=q.device)
    else:  # every element is written by the first batch of its split: no zeroing
        ds = torch.empty((splits, heads, n, n), dtype=torch.float32, device=q.device)
    dq_acc = ds  # a placeholder fp32 pointer, not touched unless atomic and not one_kblock
    if atomic and not one_kblock:
        dq_acc = torch.zeros((bsz, heads, n, d), dtype=torch.float32, device=q.device)
    upcast = upcast_dot(q.dtype)
    if out.stride(3) != 1:  # (the forward's output always has; one given otherwise is copied)
        out = out.contiguous()
    strides = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out),
               *_strides4(out)[:3])
    _rpe_bwd_kv_kernel[(heads * splits, kblocks)](
        q, k, v, out, grad_out, lse, table32, ids32, dq, dq_acc, dk, dv, ds,
        bsz, heads, n, d, nb, *strides, float(scale), seed, threshold, drop_scale,
        BLOCK_M=kv_m, BLOCK_N=kv_n, BLOCK_D=block_d, UPCAST=upcast, DROPPING=dropping,
        ONE_KBLOCK=one_kblock, ATOMIC=atomic, num_warps=kv_warps, num_stages=kv_stages)
    if not one_kblock:
        if atomic:
            dq.copy_(dq_acc)
        else:
            q_m, q_n, _, q_warps, q_stages = _config(d, q.dtype, "q", configs)
            _rpe_bwd_q_kernel[(bsz * heads, cdiv(n, q_m))](
                q, k, v, out, grad_out, lse, table32, ids32, dq, heads, n, d, nb, *strides,
                float(scale), seed, threshold, drop_scale, BLOCK_M=q_m, BLOCK_N=q_n,
                BLOCK_D=block_d, UPCAST=upcast, DROPPING=dropping, num_warps=q_warps,
                num_stages=q_stages)
    dtable = torch.zeros((heads, nb), dtype=torch.float32, device=q.device)
    count = seg.numel() - 1
    _rpe_table_grad_kernel[(count, heads)](
        ds, order, seg, dtable, ds.shape[0], heads, n * n, nb, low, **_TABLE_BLOCKS,
        num_warps=4)
    return dq, dk, dv, dtable


def bucket_segments(ids: torch.Tensor, num_buckets: int):
    """(ids32, order, seg, low, high) of an (N, N) bucket map with ids in [0, num_buckets).

    ids32: the ids as int32 contiguous, a new tensor (a cache keyed by the map holds none of
    it); order: (N * N,) int32 flat indices stably sorted by id; seg: (num_buckets + 1,) int32
    with bucket t owning order[seg[t]:seg[t + 1]]; low = 0 and high = num_buckets - 1. No
    device synchronisation (so it may run inside a CUDA graph); depends only on the map, so
    callers cache it.
    """
    ids32 = ids.to(torch.int32, memory_format=torch.contiguous_format, copy=True)
    sorted_ids, order = torch.sort(ids32.reshape(-1), stable=True)
    bounds = torch.arange(0, num_buckets + 1, device=ids.device, dtype=torch.int32)
    seg = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return ids32, order.to(torch.int32), seg, 0, num_buckets - 1


def dropout_keep_mask(seed: int, batch: int, heads: int, n: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(batch, heads, N, N) bool: where the attention kernels keep a weight for this seed and p
    (the mask the forward and backward apply; for tests)."""
    seed, _, threshold, _ = _dropout_args(dropout_p, seed)
    keep = torch.empty((batch, heads, n, n), dtype=torch.int8, device=device)
    grid = (batch * heads, cdiv(n, _MASK_BLOCK), cdiv(n, _MASK_BLOCK))
    _dropout_mask_kernel[grid](keep, n, seed, threshold, BLOCK_M=_MASK_BLOCK,
                               BLOCK_N=_MASK_BLOCK, num_warps=4)
    return keep.bool()


# ------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ------------------------------------------------------------------------------------------
RELEASED_HEAD_DIMS = (48, 72, 96, 144, 192, 240)

_SCALARS = {"scale": "fp32", "seed": "i64", "drop_scale": "fp32"}


def _modes(kernel: str) -> List[Dict[str, bool]]:
    """The compile-time modes of ``kernel`` ("fwd", "kv", "q"), each its own machine code: with
    and without dropout; for the dK/dV kernel also with one key block (N <= BLOCK_N: 7 x 7
    tokens) or several, and the atomic (non-deterministic) backward or not."""
    dropping = [dict(DROPPING=drop) for drop in (False, True)]
    if kernel != "kv":
        return dropping
    return [dict(mode, ONE_KBLOCK=one, ATOMIC=atomic) for mode in dropping
            for one in (False, True) for atomic in (False, True)]


_MODE_LABELS = (("ONE_KBLOCK", "one key block"), ("ATOMIC", "atomic"), ("DROPPING", "dropout"))


def aot_kernels() -> List[AotKernel]:
    """Every kernel configuration this file launches on a GPU, for the ahead-of-time check:
    the three attention kernels per padded head dim (64, 128, 256), dtype and mode
    (:func:`_modes`), and the two helpers."""
    kernels, seen = [], set()
    for head_dim in RELEASED_HEAD_DIMS:
        for dtype, tname in TRITON_DTYPE.items():
            block_d = block(head_dim, low=64)
            if (block_d, dtype) in seen:
                continue
            seen.add((block_d, dtype))
            ptr = "*" + tname
            io = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "table_ptr": "*fp32",
                  "bucket_ptr": "*i32", "o_ptr": ptr, "lse_ptr": "*fp32"}
            grads = {**io, "do_ptr": ptr, "dq_ptr": ptr, "dq_acc_ptr": "*fp32", "dk_ptr": ptr,
                     "dv_ptr": ptr, "ds_ptr": "*fp32"}
            for kernel, fn in (("fwd", _rpe_fwd_kernel), ("kv", _rpe_bwd_kv_kernel),
                               ("q", _rpe_bwd_q_kernel)):
                block_m, block_n, _, warps, stages = _config(head_dim, dtype, kernel)
                # q, k, v (and dO) with a unit last stride: contiguous, or views of one qkv
                unit = tuple(s for s in ("sq_d", "sk_d", "sv_d", "sd_d") if s in fn.arg_names)
                for mode in _modes(kernel):
                    labels = "".join(f", {label}" for flag, label in _MODE_LABELS
                                     if mode.get(flag))
                    kernels.append(AotKernel(
                        f"rpe_{kernel}[{tname}, D={block_d}, {block_m}x{block_n}{labels}]", fn,
                        aot_signature(fn, grads, _SCALARS),
                        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                             UPCAST=upcast_dot(dtype, interpret=False), **mode),
                        num_warps=warps, num_stages=stages, launches={"contiguous": unit}))
    fn = _rpe_table_grad_kernel
    kernels.append(AotKernel(
        "rpe_table_grad", fn,
        aot_signature(fn, {"ds_ptr": "*fp32", "order_ptr": "*i32", "seg_ptr": "*i32",
                           "dtable_ptr": "*fp32"}),
        dict(_TABLE_BLOCKS), num_warps=4))
    fn = _dropout_mask_kernel
    kernels.append(AotKernel(
        "rpe_dropout_mask", fn, aot_signature(fn, {"keep_ptr": "*i8"}, {"seed": "i64"}),
        dict(BLOCK_M=_MASK_BLOCK, BLOCK_N=_MASK_BLOCK), num_warps=4))
    return kernels
