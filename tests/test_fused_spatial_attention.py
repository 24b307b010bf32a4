"""Triton PAT_sp (spatial_attention) against the float64 reference: outputs, every gradient and
the running statistics, in training and eval, with and without BN_d.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set by conftest) and compiled
on a GPU. Shapes are small but odd: H, W in {1, 2, 7, 13}, P and Q odd (C = 10, 18), batch 1,
and one case larger than the interpreter's blocks (several pixel tiles, channel blocks and GEMM
blocks per program).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BatchNormParams
from patnet_kernels._types import chunk_pixels

from conftest import DEVICE, assert_same_arithmetic, assert_within_budget

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, C, H, W); P = C // 2, Q = C - P
SHAPES = [(2, 18, 7, 13), (1, 10, 13, 7), (3, 40, 2, 2), (1, 18, 1, 13), (2, 10, 1, 1),
          (1, 40, 13, 13), (1, 10, 1, 1)]
# Every (dtype, layout, mode, BN_d) combination for every shape would be 24 cases a shape; this
# rotation gives each shape a third of them (every dtype and mode) and each combination two
# shapes. B * H * W = 1 cannot train (see test_training_needs_two_values_per_channel).
_COMBOS = list(itertools.product(DTYPES, (False, True), (False, True), (True, False)))
CASES = [(shape,) + combo for i, shape in enumerate(SHAPES) for j, combo in enumerate(_COMBOS)
         if (j + i) % 3 == 0 and not (combo[2] and shape[0] * shape[2] * shape[3] == 1)]
# Larger than the interpreter's blocks (256 pixels, 64 channels): several pixel tiles, channel
# blocks, GEMM K steps and N blocks per launch. Every kernel and flag once.
CASES += [((1, 140, 17, 16), torch.float32, False, True, True),
          ((1, 140, 17, 16), torch.bfloat16, True, False, True),
          ((1, 140, 17, 16), torch.float16, True, True, False)]


def _ids(case):
    shape, dtype, channels_last, training, with_bn_d = case
    return (f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'nhwc' if channels_last else 'nchw'}"
            f"-{'train' if training else 'eval'}-{'bn_d' if with_bn_d else 'folded'}")


def _make(shape, with_bn_d, seed=0, affine=True, running=True):
    """Float64 inputs: (tensors, bn_c tensors, bn_d tensors or None, dY)."""
    b, c, h, w = shape
    p = c // 2
    q = c - p
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0, shift=0.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift

    def bn(n):
        return [randn(n, scale=0.3, shift=1.0) if affine else None,
                randn(n, scale=0.3) if affine else None,
                randn(n, scale=0.3) if running else None,
                (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5) if running else None]

    m = randn(b, c, h, w, shift=0.3)
    tensors = [m, randn(1, q, 1, 1, scale=0.6), randn(p, p, 1, 1, scale=p ** -0.5),
               randn(p, scale=0.3) if not with_bn_d or seed % 2 else None]
    return tensors, bn(q), (bn(p) if with_bn_d else None), randn(b, c, h, w)


def _run(inputs, dtype, channels_last, training, backend, momentum=0.2, residual=None):
    """y, every gradient (None where the input is None) and the running statistics after.

    ``channels_last``: a bool, or a function making the op's input m from the leaf;
    ``residual``: None or a float64 tensor added by the op (its gradient is returned too)."""
    tensors, bn_c, bn_d, grad = inputs

    def make(values, grad_too):
        out = [None if t is None else t.to(DEVICE, dtype, copy=True) for t in values]
        return [t.requires_grad_() if grad_too and t is not None else t for t in out]

    leaves = make(tensors, True)
    c_params, c_stats = make(bn_c[:2], True), make(bn_c[2:], False)
    bnc = BatchNormParams(*c_params, *c_stats, momentum, 1e-5)
    d_params, d_stats, bnd = [], [], None
    if bn_d is not None:
        d_params, d_stats = make(bn_d[:2], True), make(bn_d[2:], False)
        bnd = BatchNormParams(*d_params, *d_stats, 0.1, 1e-3)
    if callable(channels_last):
        m = channels_last(leaves[0])
    else:
        m = leaves[0].to(memory_format=torch.channels_last) if channels_last else leaves[0] * 1
    if residual is not None:
        residual = residual.to(DEVICE, dtype, copy=True).requires_grad_()
    y = pk.spatial_attention(m, leaves[1], leaves[2], leaves[3], bnc, bnd, training=training,
                             residual=residual, backend=backend)
    y.backward(grad.to(DEVICE, dtype))
    names = ["grad_m", "grad_gate_weight", "grad_conv_weight", "grad_conv_bias",
             "grad_bn_c_weight", "grad_bn_c_bias", "grad_bn_d_weight", "grad_bn_d_bias"]
    grads = [t.grad if t is not None else None for t in leaves + c_params + d_params]
    out = {"y": y.detach()}
    out.update({n: g for n, g in zip(names, grads)})
    if residual is not None:
        out["grad_residual"] = residual.grad
    out.update({"bn_c_running_mean": c_stats[0], "bn_c_running_var": c_stats[1]})
    if d_stats:
        out.update({"bn_d_running_mean": d_stats[0], "bn_d_running_var": d_stats[1]})
    return out


def _check(ours, exact, in_dtype, dtype, training):
    for name, e in exact.items():
        o = ours[name]
        assert (o is None) == (e is None), name
        if e is None or (not training and "running" in name):
            continue  # eval: the running statistics are compared bit for bit by the caller
        assert o.dtype == dtype, name
        assert_within_budget(name, o, e, in_dtype[name], dtype)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_matches_float64_reference(case):
    shape, dtype, channels_last, training, with_bn_d = case
    inputs = _make(shape, with_bn_d, seed=sum(shape))
    ours = _run(inputs, dtype, channels_last, training, "triton")
    exact = _run(inputs, torch.float64, channels_last, training, "torch")
    in_dtype = _run(inputs, dtype, channels_last, training, "torch")
    _check(ours, exact, in_dtype, dtype, training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ours["y"].is_contiguous(memory_format=fmt)
    if not training:  # eval leaves the running statistics alone
        for name in ("bn_c_running_mean", "bn_c_running_var", "bn_d_running_mean",
                     "bn_d_running_var"):
            if name in ours:
                bn = inputs[1] if name.startswith("bn_c") else inputs[2]
                assert torch.equal(ours[name], bn[2 if "mean" in name else 3].to(dtype))


# (dtype, channels_last, training): eval with BN_d folded (the inference copy's call), training
# with BN_d
RESIDUAL_CASES = [(torch.float32, False, False), (torch.float16, True, False),
                  (torch.bfloat16, False, True), (torch.float32, True, True)]


@pytest.mark.parametrize("dtype, channels_last, training", RESIDUAL_CASES,
                         ids=["fp32-nchw-eval", "fp16-nhwc-eval", "bf16-nchw-train",
                              "fp32-nhwc-train"])
def test_residual(dtype, channels_last, training):
    """residual + PAT_sp(m), the sum taken in the op's kernel; the residual's gradient is dY.
    A shape with several pixel tiles and GEMM blocks."""
    inputs = _make((2, 140, 9, 31), training, seed=17)
    residual = torch.randn(inputs[0][0].shape, generator=torch.Generator().manual_seed(18),
                           dtype=torch.float64)
    ours, exact, in_dtype = (_run(inputs, t, channels_last, training, backend, residual=residual)
                             for t, backend in ((dtype, "triton"), (torch.float64, "torch"),
                                                (dtype, "torch")))
    _check(ours, exact, in_dtype, dtype, training)
    assert torch.equal(ours["grad_residual"], inputs[3].to(DEVICE, dtype))


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-nchw", "bf16-nhwc"])
def test_statistics_for_the_next_block(dtype, channels_last):
    """``statistics_of=C1`` (the inference copy's call, BN_d folded, with the residual): per
    pixel chunk the mean and sum of squared deviations of y[:, C1:] as stored, in
    partial_block's ``statistics`` form (several chunks here, the last one shorter); y as
    without them."""
    tensors, bn_c, _, _ = _make((2, 140, 9, 31), False, seed=19)
    m, gate, conv_w, conv_b = (t.to(DEVICE, dtype) for t in tensors)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    bnc = BatchNormParams(*(t.to(DEVICE, dtype) for t in bn_c), 0.1, 1e-5)
    residual = m.flip(0)
    args = (m, gate, conv_w, conv_b, bnc, None)
    y, (mean, m2) = pk.spatial_attention(*args, residual=residual, statistics_of=35,
                                         backend="triton")
    assert_same_arithmetic(y, pk.spatial_attention(*args, residual=residual, backend="triton"))
    b, c, h, w = y.shape
    chunks = mean.shape[1]
    assert chunks > 1 and mean.shape == m2.shape == (b, chunks, c - 35)
    size = chunk_pixels(h * w, chunks)
    y2 = y[:, 35:].float().flatten(2)
    for t in range(chunks):
        part = y2[..., t * size:(t + 1) * size]
        expected = part.mean(-1)
        torch.testing.assert_close(mean[:, t], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m2[:, t], (part - expected[..., None]).square().sum(-1),
                                   rtol=1e-4, atol=1e-4)
    # y against the float64 reference within the dtype's budget; the reference's statistics
    # (one chunk) those of its own y
    y_ref, (mean_ref, m2_ref) = pk.spatial_attention(*args, residual=residual, statistics_of=35,
                                                     backend="torch")
    exact_args = (*(t.double() for t in args[:4]),
                  BatchNormParams(*(t.double() for t in bnc[:4]), 0.1, 1e-5), None)
    y_exact = pk.spatial_attention(*exact_args, residual=residual.double(), backend="torch")
    assert_within_budget("y", y, y_exact, y_ref, dtype)
    assert mean_ref.shape == m2_ref.shape == (b, 1, c - 35)
    ref2 = y_ref[:, 35:].float().flatten(2)
    torch.testing.assert_close(mean_ref[:, 0], ref2.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2_ref[:, 0], (ref2 - ref2.mean(-1, keepdim=True)).square().sum(-1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_without_affine_or_running_stats(training):
    """BN weight/bias None; in training also no running statistics."""
    inputs = _make((2, 18, 7, 5), True, seed=3, affine=False, running=not training)
    ours = _run(inputs, torch.float32, False, training, "triton")
    exact = _run(inputs, torch.float64, False, training, "torch")
    in_dtype = _run(inputs, torch.float32, False, training, "torch")
    _check(ours, exact, in_dtype, torch.float32, training)


STRIDED = {
    # a crop of H and W: pixels that do not flatten to one stride (the op copies them)
    "crop": lambda m: torch.nn.functional.pad(m, (2, 1, 1, 3))[:, :, 1:-3, 2:-1],
    # a channel slice of a bigger channels_last tensor (no copy)
    "channel_slice": lambda m: torch.nn.functional.pad(
        m, (0, 0, 0, 0, 3, 2)).to(memory_format=torch.channels_last)[:, 3:-2],
}


@pytest.mark.parametrize("layout", list(STRIDED))
def test_strided_inputs(layout):
    inputs = _make((2, 18, 9, 11), True, seed=5)
    for training in (False, True):
        ours = _run(inputs, torch.float32, STRIDED[layout], training, "triton")
        exact = _run(inputs, torch.float64, STRIDED[layout], training, "torch")
        in_dtype = _run(inputs, torch.float32, STRIDED[layout], training, "torch")
        _check(ours, exact, in_dtype, torch.float32, training)


def test_training_needs_two_values_per_channel():
    """B * H * W = 1 in training: F.batch_norm's error, raised before anything is written."""
    tensors, bn_c, bn_d, _ = _make((1, 10, 1, 1), True, seed=7)
    m, gate, conv_w = (t.float() for t in tensors[:3])
    stats = [t.float() for t in bn_c + bn_d]
    before = [t.clone() for t in stats]
    messages = []
    for backend in ("torch", "triton"):
        bnc = BatchNormParams(*stats[:4], 0.1, 1e-5)
        bnd = BatchNormParams(*stats[4:], 0.1, 1e-5)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when "
                                             "training") as info:
            pk.spatial_attention(m, gate, conv_w, None, bnc, bnd, training=True,
                                 backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert all(torch.equal(a, b) for a, b in zip(before, stats))


def test_refuses_float64():
    tensors, bn_c, _, _ = _make((1, 10, 2, 2), False, seed=8)
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        pk.spatial_attention(*tensors, BatchNormParams(*bn_c, 0.1, 1e-5), None,
                             backend="triton")


def test_deterministic_and_no_concatenation():
    """Bitwise identical on a rerun (fixed-order reductions); no copy of an activation."""
    inputs = _make((3, 18, 7, 6), True, seed=11)
    runs = [_run(inputs, torch.float32, True, True, "triton") for _ in range(2)]
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
    tensors, bn_c, bn_d, _ = inputs
    args = [t.float() for t in tensors] + [BatchNormParams(*(t.float() for t in bn), 0.1, 1e-5)
                                           for bn in (bn_c, bn_d)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        pk.spatial_attention(*args, training=True, backend="triton")
    # Only per-channel vectors (1-D, 2-D) go through torch ops; no activation is copied.
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::cat", "aten::copy_", "aten::clone", "aten::_to_copy")
              and any(len(shape) == 4 for shape in e.input_shapes)]
    assert not copies, copies


def _op_inputs(training, with_bn_d, channels_last, residual, stats_first=-1, seed=12):
    tensors, bn_c, bn_d, grad = _make((2, 10, 3, 5), with_bn_d, seed=seed)
    f = [None if t is None else t.float() for t in tensors + bn_c + (bn_d or [None] * 4)]
    m, grad = f[0], grad.float()
    if channels_last:
        m, grad = (t.to(memory_format=torch.channels_last) for t in (m, grad))
    return [m] + f[1:8] + [1e-5] + f[8:12] + [1e-3, with_bn_d, training,
                                              grad.flip(0) if residual else None,
                                              stats_first], grad


# (training, with_bn_d, channels_last, residual, stats_first)
OP_CASES = [(True, True, False, False, -1), (False, False, True, True, 3),
            (True, False, True, True, 0), (False, True, False, False, -1)]


@pytest.mark.parametrize("training, with_bn_d, channels_last, residual, stats_first", OP_CASES,
                         ids=["train-bn_d-nchw", "eval-folded-nhwc-residual-stats",
                              "train-folded-nhwc-residual-stats", "eval-bn_d-nchw"])
def test_opcheck(training, with_bn_d, channels_last, residual, stats_first):
    args, grad = _op_inputs(training, with_bn_d, channels_last, residual, stats_first)
    ops = torch.ops.patnet_triton
    torch.library.opcheck(ops.spatial_attention.default, args)
    m, gate, conv_w = args[:3]
    _, z, c_stats, d_stats, mean, m2 = ops.spatial_attention(*args)
    assert mean.shape == m2.shape == ((2, 1, 10 - stats_first) if stats_first >= 0 else (2, 0, 0))
    if training:
        assert c_stats.shape == (2, 10 // 2) and d_stats.shape == (2, 5 if with_bn_d else 0)
    else:  # (eval: the running statistics, which the backward is given)
        assert c_stats.shape == d_stats.shape == (2, 0)
        c_stats = torch.stack(args[6:8])
        d_stats = torch.stack(args[11:13]) if with_bn_d else d_stats
    backward_args = (grad, m, z, gate, conv_w, c_stats, args[4], args[8], d_stats, args[9],
                     args[10], args[13], with_bn_d, training)
    torch.library.opcheck(ops.spatial_attention_backward.default, backward_args)


def test_compile_fullgraph_matches_eager():
    """Training step compiled with fullgraph=True: output, every gradient and the running
    statistics as in eager mode."""
    tensors, bn_c, bn_d, grad = _make((2, 18, 5, 7), True, seed=13)

    def step(m, gate, conv_w, conv_b, bnc, bnd):
        y = pk.spatial_attention(m, gate, conv_w, conv_b, bnc, bnd, training=True,
                                 backend="triton")
        return y.relu() + m

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.float().requires_grad_() for t in tensors if t is not None]
        leaves += [None] * (4 - len(leaves))
        bns = [[t.float().clone() for t in bn] for bn in (bn_c, bn_d)]
        for bn in bns:
            bn[0].requires_grad_()
            bn[1].requires_grad_()
        bnc, bnd = (BatchNormParams(*bn, 0.1, 1e-5) for bn in bns)
        y = fn(*leaves, bnc, bnd)
        y.backward(grad.float())
        results.append([y.detach()] + [t.grad for t in leaves if t is not None]
                       + [bn[0].grad for bn in bns] + [bn[1].grad for bn in bns]
                       + [t for bn in bns for t in bn[2:]])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
