"""Every reference op against an independent formula (SPEC.md sections 1-4).

The expected values below are written from the SPEC with plain float64 numpy / math-module
arithmetic: explicit sums over the 3x3 taps with index arithmetic for the zero padding, mean and
unbiased std as explicit sums, the dense W_ch mix as a sum over input channels, BatchNorm as
(x - mean) / sqrt(var + eps) * w + b, hardsigmoid as clamp(x + 3, 0, 6) / 6, softmax as
exp(l - max) / sum, and the iRPE bucket ids per pair from the math module. None of them calls
torch's conv, batch_norm, hardsigmoid, softmax or std, so an error shared by the reference and
the test cannot cancel out.

The ops are called through the public functional API with backend="torch" (and through
``patnet_kernels.reference`` directly where that is useful), in float64, to about 1e-10.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BatchNormParams
from patnet_kernels import reference as ref

from conftest import authors_reference_dir

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
CL = torch.channels_last


# --------------------------------------------------------------------------------------------
# Independent formulas (numpy float64)
# --------------------------------------------------------------------------------------------
def np_(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def np_hsig(z: np.ndarray) -> np.ndarray:
    return np.clip(z + 3.0, 0.0, 6.0) / 6.0


def np_conv3x3(x1: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Explicit sum over the 3x3 taps: y[b, o, h, w] = sum_{i, ky, kx} W[o, i, ky, kx] *
    x1[b, i, h + ky - 1, w + kx - 1], the term dropped where that index is outside the map."""
    b, c1, hh, ww = x1.shape
    y = np.zeros((b, w.shape[0], hh, ww))
    for o in range(w.shape[0]):
        for i in range(c1):
            for ky in range(3):
                for kx in range(3):
                    dy, dx = ky - 1, kx - 1
                    # output rows h with 0 <= h + dy < H, output columns likewise
                    h0, h1 = max(0, -dy), min(hh, hh - dy)
                    w0, w1 = max(0, -dx), min(ww, ww - dx)
                    if h0 >= h1 or w0 >= w1:
                        continue
                    y[:, o, h0:h1, w0:w1] += w[o, i, ky, kx] * x1[:, i, h0 + dy:h1 + dy,
                                                                  w0 + dx:w1 + dx]
    return y


def np_pconv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    c1 = w.shape[0]
    out = x.copy()
    out[:, :c1] = np_conv3x3(x[:, :c1], w)
    return out


def np_bn(x: np.ndarray, bn: Dict[str, Optional[np.ndarray]], training: bool
          ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """BatchNorm over axis 1 of (B, C, H, W). Returns y and the running stats after the call.

    Training: batch mean and biased variance normalise; the running statistics move by
    running = (1 - m) * running + m * stat with the UNBIASED batch variance (as torch does).
    """
    n = x.shape[0] * x.shape[2] * x.shape[3]
    eps, m = bn["eps"], bn["momentum"]
    rm, rv = bn["running_mean"], bn["running_var"]
    if training:
        mean = x.sum(axis=(0, 2, 3)) / n
        sq = ((x - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
        var_biased, var_unbiased = sq / n, sq / (n - 1)
        if rm is not None:
            rm = (1 - m) * rm + m * mean
            rv = (1 - m) * rv + m * var_unbiased
        mean_used, var_used = mean, var_biased
    else:
        mean_used, var_used = rm, rv
    y = (x - mean_used[None, :, None, None]) / np.sqrt(var_used[None, :, None, None] + eps)
    if bn["weight"] is not None:
        y = y * bn["weight"][None, :, None, None]
    if bn["bias"] is not None:
        y = y + bn["bias"][None, :, None, None]
    return y, rm, rv


def bn_np(bn: Optional[BatchNormParams]):
    if bn is None:
        return None
    return dict(weight=np_(bn.weight), bias=np_(bn.bias), running_mean=np_(bn.running_mean),
                running_var=np_(bn.running_var), momentum=bn.momentum, eps=bn.eps)


def np_channel_attention(x, conv_w, cfc_w, cfc_b, bn_a, bn_b, training):
    """SPEC section 2. Returns (y, {"a": (rm, rv), "b": (rm, rv)})."""
    c1 = conv_w.shape[0]
    bsz, c, hh, ww = x.shape
    c2, n = c - c1, hh * ww
    x2 = x[:, c1:]
    mu = x2.sum(axis=(2, 3)) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = ((x2 - mu[:, :, None, None]) ** 2).sum(axis=(2, 3)) / (n - 1)  # unbiased
    sigma = np.sqrt(var)
    z = np.zeros((bsz, c2))
    for o in range(c2):
        for i in range(c2):
            z[:, o] += cfc_w[o, i, 0, 0] * mu[:, i] + cfc_w[o, i, 0, 1] * sigma[:, i]
        if cfc_b is not None:
            z[:, o] += cfc_b[o]
    stats = {}
    z4 = z[:, :, None, None]
    if bn_a is not None:
        z4, rm, rv = np_bn(z4, bn_a, training)
        stats["a"] = (rm, rv)
    g = np_hsig(z4)
    y2, rm, rv = np_bn(x2 * g, bn_b, training)
    stats["b"] = (rm, rv)
    y = np.concatenate([np_conv3x3(x[:, :c1], conv_w), y2], axis=1)
    return y, stats


def np_spatial_attention(m, gate_w, conv_w, conv_b, bn_c, bn_d, training):
    """SPEC section 3. Returns (y, {"c": (rm, rv), "d": (rm, rv)})."""
    p = conv_w.shape[0]
    q = m.shape[1] - p
    ma, mb = m[:, :q], m[:, q:]
    s = np.zeros((m.shape[0], m.shape[2], m.shape[3]))
    for j in range(q):
        s += gate_w[0, j, 0, 0] * ma[:, j]
    s = np_hsig(s)
    stats = {}
    ya, rm, rv = np_bn(ma * s[:, None], bn_c, training)
    stats["c"] = (rm, rv)
    if bn_d is not None:
        mb, rm, rv = np_bn(mb, bn_d, training)
        stats["d"] = (rm, rv)
    yb = np.zeros_like(mb)
    for o in range(p):
        for i in range(p):
            yb[:, o] += conv_w[o, i, 0, 0] * mb[:, i]
        if conv_b is not None:
            yb[:, o] += conv_b[o]
    return np.concatenate([ya, yb], axis=1), stats


def np_rpe_attention(q, k, v, table, bucket, scale):
    """SPEC section 4, step 5-6 without dropout: softmax(scale q k^T + table[h, bucket]) v."""
    bsz, heads, n, d = q.shape
    logits = np.zeros((bsz, heads, n, n))
    for t in range(d):
        logits += q[:, :, :, None, t] * k[:, :, None, :, t]
    logits *= scale
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                logits[:, h, i, j] += table[h, int(bucket[i, j])]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    a = e / e.sum(axis=-1, keepdims=True)
    out = np.zeros((bsz, heads, n, d))
    for j in range(n):
        out += a[:, :, :, j, None] * v[:, :, None, j, :]
    return out


def math_bucket_id(dr: int, dc: int) -> int:
    """The iRPE id of one pair from the math module (SPEC section 4, alpha 20, beta 40, gamma 160).

    Python's round() rounds half to even like torch.round. Neither rounding ever meets a tie:
    sqrt of an integer is never k + 1/2 (that would need an integer equal to k^2 + k + 1/4), and
    20 + ln(d / 20) / ln(8) * 20 stays >= 0.01 away from every k + 1/2 for the d that occur
    (checked by test_bucket_formula_has_no_rounding_ties), so float64 here and the package's
    float32 arithmetic agree.
    """
    d = round(math.sqrt(dr * dr + dc * dc))
    if d <= 20:
        pi = d
    else:
        pi = min(40, round(20 + math.log(d / 20) / math.log(160 / 20) * (40 - 20)))
    return pi + 40


def math_buckets(height: int, width: int) -> np.ndarray:
    """(N, N) ids, tokens row-major (i = r * W + c), each pair from math_bucket_id.

    The id depends only on (|dr|, |dc|), so a (H, W) table of math_bucket_id is gathered per pair.
    """
    lut = np.array([[math_bucket_id(dr, dc) for dc in range(width)] for dr in range(height)],
                   dtype=np.int64)
    rows = np.arange(height * width) // width
    cols = np.arange(height * width) % width
    return lut[np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :])]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def make_bn(c: int, g: torch.Generator, *, affine: bool = True, running: bool = True,
            momentum: float = 0.1, eps: float = 1e-5) -> BatchNormParams:
    w = 1.0 + 0.3 * randn(c, g=g) if affine else None
    b = 0.2 * randn(c, g=g) if affine else None
    rm = 0.3 * randn(c, g=g) if running else None
    rv = (0.5 + torch.rand(c, generator=g, dtype=F64)) if running else None
    return BatchNormParams(w, b, rm, rv, momentum, eps)


def clone_bn(bn: Optional[BatchNormParams]) -> Optional[BatchNormParams]:
    if bn is None:
        return None
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return BatchNormParams(c(bn.weight), c(bn.bias), c(bn.running_mean), c(bn.running_var),
                           bn.momentum, bn.eps)


def to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def assert_running(bn: BatchNormParams, expected: Tuple[np.ndarray, np.ndarray]) -> None:
    # equal_nan: with H * W = 1 in PAT_ch, NaN statistics reach the running statistics too
    torch.testing.assert_close(bn.running_mean, to_t(expected[0]), equal_nan=True, **TOL)
    torch.testing.assert_close(bn.running_var, to_t(expected[1]), equal_nan=True, **TOL)


# (B, H, W): 1x1, 1x13, 2x7, 7x2, 13x13 with batch 1 and 3
SHAPES = [(1, 1, 1), (3, 1, 1), (1, 1, 13), (3, 2, 7), (1, 7, 2), (3, 7, 2), (1, 13, 13),
          (3, 13, 13)]
SHAPE_IDS = [f"B{b}-{h}x{w}" for b, h, w in SHAPES]
# (C, C1): channel counts that are not multiples of 8
CHANNELS = [(13, 3), (10, 2)]
CHANNEL_IDS = [f"C{c}-C1_{c1}" for c, c1 in CHANNELS]
FORMATS = [torch.contiguous_format, CL]
FORMAT_IDS = ["nchw", "nhwc"]


# --------------------------------------------------------------------------------------------
# 1. PConv
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("c,c1", CHANNELS, ids=CHANNEL_IDS)
@pytest.mark.parametrize("b,h,w", SHAPES, ids=SHAPE_IDS)
def test_partial_conv3x3_matches_explicit_taps(b, h, w, c, c1, fmt):
    g = gen(1000 * h + w + c)
    x = randn(b, c, h, w, g=g).to(memory_format=fmt)
    weight = randn(c1, c1, 3, 3, g=g, scale=0.4)
    expected = to_t(np_pconv(np_(x), np_(weight)))
    x_before = x.clone()
    y = pk.partial_conv3x3(x, weight, backend="torch")
    assert y.shape == (b, c, h, w) and y.dtype == F64
    torch.testing.assert_close(y, expected, **TOL)
    assert torch.equal(y[:, c1:], x[:, c1:])  # passthrough is bit-identical
    assert torch.equal(x, x_before)  # out of place: x untouched
    y_direct = ref.partial_conv3x3(x, weight)
    torch.testing.assert_close(y_direct, expected, **TOL)
    if fmt is CL:  # same values as the NCHW input
        y_nchw = pk.partial_conv3x3(x.contiguous(), weight, backend="torch")
        torch.testing.assert_close(y, y_nchw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("b,h,w", [(1, 1, 13), (3, 2, 7), (3, 13, 13)],
                         ids=["B1-1x13", "B3-2x7", "B3-13x13"])
def test_partial_conv3x3_inplace(b, h, w, fmt):
    c, c1 = 13, 3
    g = gen(7 + h * w)
    x = randn(b, c, h, w, g=g).to(memory_format=fmt)
    weight = randn(c1, c1, 3, 3, g=g, scale=0.4)
    formula = to_t(np_pconv(np_(x), np_(weight)))
    expected = pk.partial_conv3x3(x, weight, backend="torch")  # out of place
    passthrough = x[:, c1:].clone()
    ptr, strides = x.data_ptr(), x.stride()
    y = pk.partial_conv3x3(x, weight, inplace=True, backend="torch")
    assert y is x
    assert y.data_ptr() == ptr and y.stride() == strides  # same storage, same layout
    assert x.is_contiguous(memory_format=fmt)
    assert torch.equal(x[:, c1:], passthrough)  # passthrough values bit-identical
    assert x[:, c1:].data_ptr() == ptr + c1 * x.stride(1) * x.element_size()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, formula, **TOL)
    y_ref = ref.partial_conv3x3(x.clone(), weight, inplace=True)  # reference directly
    torch.testing.assert_close(y_ref, to_t(np_pconv(np_(x), np_(weight))), **TOL)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_partial_conv3x3_inplace_gradients_match_out_of_place(fmt):
    c, c1 = 10, 2
    g = gen(11)
    x0_data = randn(3, c, 5, 6, g=g).to(memory_format=fmt)
    w_data = randn(c1, c1, 3, 3, g=g, scale=0.4)
    grad_out = randn(3, c, 5, 6, g=g)

    def grads(inplace: bool):
        x0 = x0_data.clone().requires_grad_(True)
        weight = w_data.clone().requires_grad_(True)
        x = x0 * 1.0  # a non-leaf, so that it may be written in place
        y = pk.partial_conv3x3(x, weight, inplace=inplace, backend="torch")
        if inplace:
            assert y is x
        return (y.detach(),) + torch.autograd.grad(y, (x0, weight), grad_out)

    y_ip, gx_ip, gw_ip = grads(True)
    y_op, gx_op, gw_op = grads(False)
    torch.testing.assert_close(y_ip, y_op, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_ip, gx_op, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw_ip, gw_op, rtol=1e-12, atol=1e-12)
    # the passthrough channels get grad_out unchanged; the weight gradient is the correlation
    # of the ORIGINAL X1 with grad_out (explicit taps)
    assert torch.equal(gx_ip[:, c1:], grad_out[:, c1:])
    x1, go = np_(x0_data)[:, :c1], np_(grad_out)[:, :c1]
    hh, ww = x1.shape[2:]
    gw_expected = np.zeros((c1, c1, 3, 3))
    for ky in range(3):
        for kx in range(3):
            dy, dx = ky - 1, kx - 1
            h0, h1 = max(0, -dy), min(hh, hh - dy)
            w0, w1 = max(0, -dx), min(ww, ww - dx)
            for o in range(c1):
                for i in range(c1):
                    gw_expected[o, i, ky, kx] = (go[:, o, h0:h1, w0:w1]
                                                 * x1[:, i, h0 + dy:h1 + dy, w0 + dx:w1 + dx]).sum()
    torch.testing.assert_close(gw_ip, to_t(gw_expected), **TOL)


# --------------------------------------------------------------------------------------------
# 2. PAT_ch
# --------------------------------------------------------------------------------------------
def channel_attention_case(b, h, w, c, c1, seed, *, with_bn_a=True, with_bias=False,
                           momentum_a=0.1, momentum_b=0.1):
    g = gen(seed)
    c2 = c - c1
    x = randn(b, c, h, w, g=g)
    conv_w = randn(c1, c1, 3, 3, g=g, scale=0.4)
    cfc_w = randn(c2, c2, 1, 2, g=g, scale=0.5)
    cfc_b = randn(c2, g=g, scale=0.3) if with_bias else None
    bn_a = make_bn(c2, g, momentum=momentum_a) if with_bn_a else None
    bn_b = make_bn(c2, g, momentum=momentum_b)
    return x, conv_w, cfc_w, cfc_b, bn_a, bn_b


CA_PARAMS = [(b, h, w, c, c1, fmt, training)
             for (b, h, w) in SHAPES for (c, c1) in CHANNELS for fmt in FORMATS
             for training in (False, True)
             if not (training and b < 2)]  # a train-mode BN_a needs a batch of at least 2
CA_IDS = [f"B{b}-{h}x{w}-C{c}-C1_{c1}-{'nhwc' if fmt is CL else 'nchw'}-"
          f"{'train' if tr else 'eval'}" for b, h, w, c, c1, fmt, tr in CA_PARAMS]


@pytest.mark.parametrize("b,h,w,c,c1,fmt,training", CA_PARAMS, ids=CA_IDS)
def test_channel_attention_matches_formula(b, h, w, c, c1, fmt, training):
    x, conv_w, cfc_w, cfc_b, bn_a, bn_b = channel_attention_case(
        b, h, w, c, c1, seed=31 * h + w + c + b, momentum_a=0.1, momentum_b=0.25)
    expected, stats = np_channel_attention(np_(x), np_(conv_w), np_(cfc_w), np_(cfc_b),
                                           bn_np(bn_a), bn_np(bn_b), training)
    bn_a0, bn_b0 = clone_bn(bn_a), clone_bn(bn_b)
    xin = x.to(memory_format=fmt)
    y = pk.channel_attention(xin, conv_w, cfc_w, cfc_b, bn_a, bn_b, training=training,
                             backend="torch")
    assert y.shape == (b, c, h, w)
    torch.testing.assert_close(y, to_t(expected), equal_nan=True, **TOL)
    if h * w == 1:
        # H * W = 1: the unbiased std is 0 / 0 = NaN, so the whole X2 half is NaN; the conv
        # half does not depend on it and stays finite.
        assert torch.isfinite(y[:, :c1]).all()
        assert torch.isnan(y[:, c1:]).all()
    else:
        assert torch.isfinite(y).all()
    if training:
        assert_running(bn_a, stats["a"])
        assert_running(bn_b, stats["b"])
    else:  # eval leaves the running statistics alone
        for now, before in ((bn_a, bn_a0), (bn_b, bn_b0)):
            assert torch.equal(now.running_mean, before.running_mean)
            assert torch.equal(now.running_var, before.running_var)
    # channels_last gives the values of NCHW (fresh BN state for the second call)
    y_other = pk.channel_attention(
        x.contiguous() if fmt is CL else x.to(memory_format=CL), conv_w, cfc_w, cfc_b,
        clone_bn(bn_a0), clone_bn(bn_b0), training=training, backend="torch")
    torch.testing.assert_close(y_other, y, rtol=1e-12, atol=1e-12, equal_nan=True)
    # the reference called directly agrees
    y_ref = ref.channel_attention(x, conv_w, cfc_w, cfc_b, clone_bn(bn_a0), clone_bn(bn_b0),
                                  training)
    torch.testing.assert_close(y_ref, to_t(expected), equal_nan=True, **TOL)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channel_attention_folded_bn_a_with_bias_and_no_affine(training):
    """bn_a=None with a cfc_bias (BN_a folded into W_ch), and a BN_b without affine."""
    x, conv_w, cfc_w, cfc_b, _, _ = channel_attention_case(3, 7, 2, 13, 3, seed=5,
                                                           with_bias=True)
    bn_b = make_bn(10, gen(6), affine=False, momentum=0.3, eps=1e-3)
    expected, stats = np_channel_attention(np_(x), np_(conv_w), np_(cfc_w), np_(cfc_b), None,
                                           bn_np(bn_b), training)
    y = pk.channel_attention(x, conv_w, cfc_w, cfc_b, None, bn_b, training=training,
                             backend="torch")
    torch.testing.assert_close(y, to_t(expected), **TOL)
    if training:
        assert_running(bn_b, stats["b"])


def test_channel_attention_training_without_running_stats():
    x, conv_w, cfc_w, cfc_b, bn_a, bn_b = channel_attention_case(3, 2, 7, 10, 2, seed=8)
    bn_a = bn_a._replace(running_mean=None, running_var=None)
    bn_b = bn_b._replace(running_mean=None, running_var=None)
    expected, _ = np_channel_attention(np_(x), np_(conv_w), np_(cfc_w), None, bn_np(bn_a),
                                       bn_np(bn_b), True)
    y = pk.channel_attention(x, conv_w, cfc_w, None, bn_a, bn_b, training=True,
                             backend="torch")
    torch.testing.assert_close(y, to_t(expected), **TOL)


@pytest.mark.parametrize("b", [1, 3])
def test_channel_attention_single_pixel_is_nan_in_x2_only(b):
    """Documented H * W = 1 behaviour: sigma = NaN (unbiased std of one value), hence Y2 = NaN,
    while Y1 = conv3x3(X1) is finite and exact."""
    x, conv_w, cfc_w, cfc_b, bn_a, bn_b = channel_attention_case(b, 1, 1, 13, 3, seed=9)
    y = pk.channel_attention(x, conv_w, cfc_w, cfc_b, bn_a, bn_b, training=False,
                             backend="torch")
    mean, std = ref.channel_statistics(x[:, 3:])
    torch.testing.assert_close(mean, x[:, 3:, 0, 0], rtol=0, atol=0)
    assert torch.isnan(std).all()
    assert torch.isnan(y[:, 3:]).all()
    assert torch.isfinite(y[:, :3]).all()
    # a 1x1 map: only the centre tap of the 3x3 kernel sees a non-padding value
    expected_y1 = torch.einsum("oi,bi->bo", conv_w[:, :, 1, 1], x[:, :3, 0, 0])
    torch.testing.assert_close(y[:, :3, 0, 0], expected_y1, **TOL)


def test_channel_statistics_explicit():
    x2 = randn(3, 5, 2, 7, g=gen(12))
    mean, std = ref.channel_statistics(x2)
    flat = np_(x2).reshape(3, 5, 14)
    for b in range(3):
        for c in range(5):
            vals = [float(v) for v in flat[b, c]]
            mu = math.fsum(vals) / 14
            sd = math.sqrt(math.fsum((v - mu) ** 2 for v in vals) / 13)
            assert abs(float(mean[b, c]) - mu) < 1e-12
            assert abs(float(std[b, c]) - sd) < 1e-12


# --------------------------------------------------------------------------------------------
# 3. PAT_sp
# --------------------------------------------------------------------------------------------
def spatial_attention_case(b, h, w, c, seed, *, with_bn_d=True, with_bias=False):
    g = gen(seed)
    p = int(0.5 * c)
    q = c - p
    m = randn(b, c, h, w, g=g)
    gate_w = randn(1, q, 1, 1, g=g, scale=0.6)
    conv_w = randn(p, p, 1, 1, g=g, scale=0.5)
    conv_b = randn(p, g=g, scale=0.3) if with_bias else None
    bn_c = make_bn(q, g, momentum=0.2)
    bn_d = make_bn(p, g) if with_bn_d else None
    return m, gate_w, conv_w, conv_b, bn_c, bn_d


SA_PARAMS = [(b, h, w, c, fmt, training, folded)
             for (b, h, w) in SHAPES for c in (13, 10) for fmt in FORMATS
             for training in (False, True) for folded in (False, True)
             if not (training and b < 2) and not (folded and (h, w) not in ((2, 7), (13, 13)))]
SA_IDS = [f"B{b}-{h}x{w}-C{c}-{'nhwc' if fmt is CL else 'nchw'}-{'train' if tr else 'eval'}"
          f"{'-folded' if fo else ''}" for b, h, w, c, fmt, tr, fo in SA_PARAMS]


@pytest.mark.parametrize("b,h,w,c,fmt,training,folded", SA_PARAMS, ids=SA_IDS)
def test_spatial_attention_matches_formula(b, h, w, c, fmt, training, folded):
    """folded: bn_d=None and a conv bias (BN_d folded into the 1x1 conv)."""
    m, gate_w, conv_w, conv_b, bn_c, bn_d = spatial_attention_case(
        b, h, w, c, seed=17 * h + w + c + b, with_bn_d=not folded, with_bias=folded)
    expected, stats = np_spatial_attention(np_(m), np_(gate_w), np_(conv_w), np_(conv_b),
                                           bn_np(bn_c), bn_np(bn_d), training)
    bn_c0, bn_d0 = clone_bn(bn_c), clone_bn(bn_d)
    y = pk.spatial_attention(m.to(memory_format=fmt), gate_w, conv_w, conv_b, bn_c, bn_d,
                             training=training, backend="torch")
    assert y.shape == (b, c, h, w)
    torch.testing.assert_close(y, to_t(expected), **TOL)
    if training:
        assert_running(bn_c, stats["c"])
        if bn_d is not None:
            assert_running(bn_d, stats["d"])
    else:
        assert torch.equal(bn_c.running_mean, bn_c0.running_mean)
        assert torch.equal(bn_c.running_var, bn_c0.running_var)
    y_other = pk.spatial_attention(
        m.contiguous() if fmt is CL else m.to(memory_format=CL), gate_w, conv_w, conv_b,
        clone_bn(bn_c0), clone_bn(bn_d0), training=training, backend="torch")
    torch.testing.assert_close(y_other, y, rtol=1e-12, atol=1e-12)
    y_ref = ref.spatial_attention(m, gate_w, conv_w, conv_b, clone_bn(bn_c0), clone_bn(bn_d0),
                                  training)
    torch.testing.assert_close(y_ref, to_t(expected), **TOL)


# --------------------------------------------------------------------------------------------
# 4. PAT_sf attention and buckets
# --------------------------------------------------------------------------------------------
RPE_CASES = [(1, 1, 1, 1, 5), (3, 4, 2, 7, 6), (1, 2, 3, 5, 3), (3, 2, 7, 7, 6),
             (1, 4, 13, 1, 9), (3, 1, 7, 2, 4)]  # (B, heads, H, W, d)
RPE_IDS = [f"B{b}-h{nh}-{h}x{w}-d{d}" for b, nh, h, w, d in RPE_CASES]


def rpe_case(b, heads, h, w, d, seed):
    g = gen(seed)
    n = h * w
    q, k, v = (randn(b, heads, n, d, g=g) for _ in range(3))
    table = randn(heads, ref.NUM_BUCKETS, g=g)  # random, so the bias matters
    return q, k, v, table, pk.rpe_buckets(h, w)


@pytest.mark.parametrize("b,heads,h,w,d", RPE_CASES, ids=RPE_IDS)
def test_rpe_attention_matches_formula(b, heads, h, w, d):
    q, k, v, table, bucket = rpe_case(b, heads, h, w, d, seed=h * 100 + w + d)
    args = [np_(q), np_(k), np_(v), np_(table), bucket.numpy()]
    y = pk.rpe_attention(q, k, v, table, bucket, backend="torch")
    assert y.shape == q.shape
    torch.testing.assert_close(y, to_t(np_rpe_attention(*args, scale=d ** -0.5)), **TOL)
    # an explicit scale is honoured, and differs from the default
    y_s = pk.rpe_attention(q, k, v, table, bucket, scale=0.37, backend="torch")
    torch.testing.assert_close(y_s, to_t(np_rpe_attention(*args, scale=0.37)), **TOL)
    if h * w > 1:
        assert not torch.allclose(y_s, y)
    # the reference directly, and int32 ids give the same result
    torch.testing.assert_close(ref.rpe_attention(q, k, v, table, bucket), y, rtol=0, atol=0)
    torch.testing.assert_close(pk.rpe_attention(q, k, v, table, bucket.int(), backend="torch"),
                               y, rtol=0, atol=0)


def test_rpe_attention_table_bias_is_used_per_head():
    """A table that is +inf-like on one bucket per head concentrates attention on those pairs."""
    b, heads, h, w, d = 1, 2, 3, 3, 4
    q, k, v, _, bucket = rpe_case(b, heads, h, w, d, seed=3)
    table = torch.zeros(heads, ref.NUM_BUCKETS, dtype=F64)
    table[0, 40] = 60.0  # head 0: each token attends to itself (diagonal = bucket 40)
    y = pk.rpe_attention(q * 0, k * 0, v, table, bucket, backend="torch")
    torch.testing.assert_close(y[:, 0], v[:, 0], rtol=0, atol=1e-20)
    # head 1 has a zero table and zero logits: uniform attention, the mean of v
    torch.testing.assert_close(y[:, 1], v[:, 1].mean(dim=1, keepdim=True).expand_as(y[:, 1]),
                               **TOL)


def test_rpe_attention_dropout():
    b, heads, h, w, d = 1, 2, 2, 3, 4
    q, k, v, table, bucket = rpe_case(b, heads, h, w, d, seed=21)
    p = 0.3
    y0 = pk.rpe_attention(q, k, v, table, bucket, backend="torch")
    torch.manual_seed(1234)
    y1 = pk.rpe_attention(q, k, v, table, bucket, dropout_p=p, backend="torch")
    torch.manual_seed(1234)
    y2 = pk.rpe_attention(q, k, v, table, bucket, dropout_p=p, backend="torch")
    assert torch.equal(y1, y2), "same seed must give the same dropout mask"
    assert not torch.allclose(y1, y0), "dropout_p > 0 must change the output"
    # dropout of the attention weights (scaled by 1 / (1 - p)) is unbiased: the mean over many
    # independent masks approaches the no-dropout output. Many masks at once: a large batch.
    reps = 4000
    big = [t.expand(reps, -1, -1, -1).contiguous() for t in (q, k, v)]
    torch.manual_seed(99)
    y_many = pk.rpe_attention(*big, table, bucket, dropout_p=p, backend="torch")
    mean = y_many.mean(dim=0, keepdim=True)
    # per-element standard error of that mean: sqrt(p / (1 - p) * sum_j A_ij^2 v_j^2 / reps)
    logits = (q * d ** -0.5) @ k.transpose(-2, -1) + table[:, bucket]
    a = logits.softmax(-1)
    se = torch.sqrt(p / (1 - p) * (a ** 2) @ (v ** 2) / reps)
    assert ((mean - y0).abs() <= 6 * se + 1e-12).all(), (mean - y0).abs().max()
    torch.testing.assert_close(mean, y0, rtol=0, atol=0.1)


BUCKET_SHAPES = [(1, 1), (3, 5), (7, 7), (25, 42), (2, 3), (1, 13), (14, 14)]


@pytest.mark.parametrize("h,w", BUCKET_SHAPES, ids=[f"{h}x{w}" for h, w in BUCKET_SHAPES])
def test_rpe_buckets_match_math_formula(h, w):
    ids = pk.rpe_buckets(h, w)
    n = h * w
    assert ids.dtype == torch.int64
    assert ids.shape == (n, n)
    assert ids.device == torch.device("cpu")
    assert torch.equal(ids, ids.T)  # symmetric
    assert (ids.diagonal() == 40).all()
    assert int(ids.min()) >= 40 and int(ids.max()) <= 80
    expected = torch.from_numpy(math_buckets(h, w))
    mism = (ids != expected).nonzero()
    assert mism.numel() == 0, f"{len(mism)} mismatches, first at {mism[:5].tolist()}"
    assert torch.equal(ref.compute_rpe_buckets(h, w), expected)
    # cached: the same object for the same shape and device
    assert pk.rpe_buckets(h, w) is ids
    assert pk.rpe_buckets(h, w, device="cpu") is ids
    assert pk.rpe_buckets(h, w, device=torch.device("cpu")) is ids


def test_rpe_buckets_spot_values():
    """Hand-computed pairs of a 25 x 42 map, row-major token i = r * 42 + c."""
    ids = pk.rpe_buckets(25, 42)
    tok = lambda r, c: r * 42 + c  # noqa: E731
    assert int(ids[tok(0, 0), tok(0, 20)]) == 60          # d = 20: last linear bucket
    assert int(ids[tok(0, 0), tok(0, 21)]) == 40 + 20     # d = 21 -> 20.47 -> 20
    assert int(ids[tok(0, 0), tok(0, 22)]) == 40 + 21     # 20.92 -> 21
    assert int(ids[tok(0, 0), tok(0, 40)]) == 40 + 27     # 26.67 -> 27
    assert int(ids[tok(0, 0), tok(24, 41)]) == 40 + 28    # sqrt(2257) = 47.5 -> 48 -> 28.42
    assert int(ids[tok(3, 4), tok(0, 0)]) == 45           # 3-4-5 triangle
    assert int(ids[tok(1, 1), tok(0, 0)]) == 41           # sqrt(2) = 1.41 -> 1


def test_bucket_formula_has_no_rounding_ties():
    """Why float64 math here and the package's float32 agree: no value lands near x.5.

    sqrt(n) for the squared distances of maps up to 60 x 60, and the logarithmic branch for
    every d up to 160 (it saturates at 40 from there on), stay >= 1e-3 away from a tie, far
    more than float32 rounding (~1e-5 at these magnitudes); and a float32 numpy evaluation of
    the same formula gives the same ids.
    """
    for n in range(0, 2 * 59 ** 2 + 1):
        r = math.sqrt(n)
        assert abs(r - math.floor(r) - 0.5) > 1e-3, n
    ids32 = []
    for d in range(0, 301):
        f = 20 + math.log(d / 20) / math.log(8) * 20 if d else 0.0
        if 20 < d <= 160:  # beyond 160 the value exceeds 40.5 and is clamped to 40 either way
            assert abs(f - math.floor(f) - 0.5) > 1e-3, d
        d32 = np.float32(d)
        far32 = (np.float32(20) + np.log(d32 / np.float32(20)) / np.float32(math.log(8))
                 * np.float32(20)) if d else np.float32(0)
        pi32 = d32 if d <= 20 else min(np.float32(40), np.round(far32))
        ids32.append(int(pi32) + 40)
    assert ids32 == [math_bucket_id(d, 0) for d in range(0, 301)]


def test_rpe_buckets_match_authors_maps():
    maps = torch.load(authors_reference_dir() / "rpe_buckets.pt", weights_only=True)
    expected_keys = {"1x1", "2x3", "7x7", "5x9", "6x6", "14x14", "25x42", "30x30"}
    assert set(maps) == expected_keys, sorted(maps)
    for key, theirs in maps.items():
        h, w = (int(s) for s in key.split("x"))
        assert theirs.shape == (h * w, h * w), key
        ours = pk.rpe_buckets(h, w)
        assert torch.equal(ours, theirs.long()), f"{key}: {(ours != theirs.long()).sum()} differ"
        assert torch.equal(torch.from_numpy(math_buckets(h, w)), theirs.long()), key
    # the large maps reach the logarithmic range
    assert int(maps["25x42"].max()) > 60 and int(maps["30x30"].max()) > 60


# --------------------------------------------------------------------------------------------
# Gradient checks (float64, tiny shapes)
# --------------------------------------------------------------------------------------------
def test_gradcheck_partial_conv3x3():
    g = gen(40)
    x = randn(3, 6, 3, 3, g=g).requires_grad_(True)
    w = randn(2, 2, 3, 3, g=g, scale=0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: pk.partial_conv3x3(x, w, backend="torch"), (x, w))
    assert torch.autograd.gradcheck(
        lambda x, w: pk.partial_conv3x3(x * 1.0, w, inplace=True, backend="torch"), (x, w))
    xc = randn(2, 6, 3, 4, g=g).to(memory_format=CL).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: pk.partial_conv3x3(x * 1.0, w, inplace=True, backend="torch"), (xc, w))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("with_bn_a", [True, False], ids=["bn_a", "folded"])
def test_gradcheck_channel_attention(training, with_bn_a):
    """W.r.t. x, conv_weight, cfc_weight and the BN weights/biases (B = 3, C = 6, 3 x 3).

    folded: bn_a=None with a cfc_bias, which is then differentiated too. In train mode the BNs
    get no running statistics (allowed there), so repeated calls cannot drift; in eval mode
    every call gets fresh copies of them.
    """
    x, conv_w, cfc_w, cfc_b, bn_a, bn_b = channel_attention_case(
        3, 3, 3, 6, 2, seed=41, with_bn_a=with_bn_a, with_bias=not with_bn_a)

    def stats(bn):
        return (None, None) if training else (bn.running_mean.clone(), bn.running_var.clone())

    if with_bn_a:
        def f(x, conv_w, cfc_w, wa, ba, wb, bb):
            a = BatchNormParams(wa, ba, *stats(bn_a))
            b = BatchNormParams(wb, bb, *stats(bn_b))
            return pk.channel_attention(x, conv_w, cfc_w, None, a, b, training=training,
                                        backend="torch")
        inputs = [x, conv_w, cfc_w, bn_a.weight, bn_a.bias, bn_b.weight, bn_b.bias]
    else:
        def f(x, conv_w, cfc_w, cfc_b, wb, bb):
            b = BatchNormParams(wb, bb, *stats(bn_b))
            return pk.channel_attention(x, conv_w, cfc_w, cfc_b, None, b, training=training,
                                        backend="torch")
        inputs = [x, conv_w, cfc_w, cfc_b, bn_b.weight, bn_b.bias]
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_spatial_attention(training):
    m, gate_w, conv_w, conv_b, bn_c, bn_d = spatial_attention_case(3, 3, 3, 7, seed=43,
                                                                   with_bias=True)
    tensors = [m, gate_w, conv_w, conv_b, bn_c.weight, bn_c.bias, bn_d.weight, bn_d.bias]
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    stats = (bn_c.running_mean, bn_c.running_var, bn_d.running_mean, bn_d.running_var)

    def f(m, gate_w, conv_w, conv_b, wc, bc, wd, bd):
        rs = [s.clone() for s in stats]  # fresh running stats per call
        return pk.spatial_attention(m, gate_w, conv_w, conv_b,
                                    BatchNormParams(wc, bc, rs[0], rs[1]),
                                    BatchNormParams(wd, bd, rs[2], rs[3]),
                                    training=training, backend="torch")

    assert torch.autograd.gradcheck(f, tensors)


def test_gradcheck_rpe_attention():
    q, k, v, table, bucket = rpe_case(2, 2, 2, 3, 3, seed=44)
    tensors = [t.clone().requires_grad_(True) for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: pk.rpe_attention(q, k, v, t, bucket, backend="torch"), tensors)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: pk.rpe_attention(q, k, v, t, bucket, scale=0.7, backend="torch"),
        tensors)
