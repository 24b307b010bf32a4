"""Triton act(BN(x)) (batch_norm_act) against the float64 reference: output, every gradient and
the running statistics, in training and eval, ReLU and exact GELU, both layouts, all three
dtypes.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set by conftest) and compiled
on a GPU. Shapes are small but odd (C = 20, H x W = 9 x 11), with one case larger than the
interpreter's blocks (several pixel tiles and channel blocks).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BatchNormParams

from conftest import DEVICE, assert_within_budget

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (shape, dtype, channels_last, training, activation): every dtype, layout, mode and
# activation, over two shapes; and the large shape once per mode (in training its statistics'
# rows, 3 samples x 2 pixel chunks under the interpreter, take two steps of the merge, the
# second partial, and its chunks are uneven: 256 + 43 pixels).
CASES = [((3, 20, 9, 11),) + combo for combo in itertools.product(
    DTYPES, (False, True), (True, False), ("relu", "gelu"))
    if (DTYPES.index(combo[0]) + combo[1] + combo[2]) % 2 == 0]
CASES += [((2, 20, 1, 7),) + combo for combo in itertools.product(
    DTYPES, (False, True), (True, False), ("relu", "gelu"))
    if (DTYPES.index(combo[0]) + combo[1] + combo[2]) % 2 == 1]
CASES += [((3, 80, 23, 13), torch.bfloat16, True, True, "gelu"),
          ((2, 80, 23, 13), torch.float32, False, False, "relu")]


def _ids(case):
    shape, dtype, channels_last, training, activation = case
    return (f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'nhwc' if channels_last else 'nchw'}"
            f"-{'train' if training else 'eval'}-{activation}")


def _make(shape, seed, affine=True):
    """Float64 (x, [weight, bias, running_mean, running_var], dY)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    bn = [torch.randn(c, generator=gen, dtype=torch.float64) * 0.3 + 1.0 if affine else None,
          torch.randn(c, generator=gen, dtype=torch.float64) * 0.3 if affine else None,
          torch.randn(c, generator=gen, dtype=torch.float64) * 0.3,
          torch.rand(c, generator=gen, dtype=torch.float64) + 0.5]
    return x, bn, torch.randn(shape, generator=gen, dtype=torch.float64)


def _run(inputs, dtype, channels_last, training, activation, backend):
    """y, the gradients of x, weight and bias, and the running statistics after."""
    x, bn, grad = inputs
    leaf = x.to(DEVICE, dtype, copy=True).requires_grad_()
    params = [None if t is None else t.to(DEVICE, dtype, copy=True).requires_grad_()
              for t in bn[:2]]
    stats = [t.to(DEVICE, dtype, copy=True) for t in bn[2:]]
    xin = leaf.to(memory_format=torch.channels_last) if channels_last else leaf * 1
    y = pk.batch_norm_act(xin, BatchNormParams(*params, *stats, 0.2, 1e-5), activation,
                          training=training, backend=backend)
    y.backward(grad.to(DEVICE, dtype))
    return {"y": y.detach(), "grad_x": leaf.grad,
            "grad_weight": None if params[0] is None else params[0].grad,
            "grad_bias": None if params[1] is None else params[1].grad,
            "running_mean": stats[0], "running_var": stats[1]}


def _check(inputs, dtype, channels_last, training, activation):
    ours = _run(inputs, dtype, channels_last, training, activation, "triton")
    exact = _run(inputs, torch.float64, channels_last, training, activation, "torch")
    in_dtype = _run(inputs, dtype, channels_last, training, activation, "torch")
    for name, e in exact.items():
        o = ours[name]
        assert (o is None) == (e is None), name
        if e is None:
            continue
        if not training and "running" in name:  # eval leaves them alone
            assert torch.equal(o, in_dtype[name]), name
            continue
        assert o.dtype == dtype, name
        assert_within_budget(name, o, e, in_dtype[name], dtype)
    return ours


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_matches_float64_reference(case):
    shape, dtype, channels_last, training, activation = case
    ours = _check(_make(shape, sum(shape)), dtype, channels_last, training, activation)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ours["y"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_without_affine(training):
    _check(_make((2, 12, 5, 6), 3, affine=False), torch.float32, False, training, "gelu")


def test_uncontiguous_pixels():
    """A crop of H and W (pixels that do not flatten to one stride: the op copies them)."""
    x, bn, grad = _make((2, 12, 9, 11), 5)
    crop = torch.nn.functional.pad(x, (2, 1, 1, 3))[:, :, 1:-3, 2:-1]
    for training in (False, True):
        _check((crop, bn, grad), torch.float32, False, training, "relu")


def test_training_needs_two_values_per_channel():
    x, bn, _ = _make((1, 4, 1, 1), 7)
    params = BatchNormParams(*(t.float() for t in bn), 0.1, 1e-5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        pk.batch_norm_act(x.float(), params, training=True, backend="triton")


def test_deterministic_and_running_statistics_updated():
    """Bitwise identical on a rerun (fixed-order reductions); the running statistics moved by
    momentum towards the batch's (unbiased variance), as F.batch_norm."""
    inputs = _make((3, 20, 7, 6), 11)
    runs = [_run(inputs, torch.float32, True, True, "relu", "triton") for _ in range(2)]
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
    reference = _run(inputs, torch.float32, True, True, "relu", "torch")
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(runs[0][name], reference[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training, channels_last, activation",
                         [(True, False, "relu"), (False, True, "gelu")],
                         ids=["train-nchw-relu", "eval-nhwc-gelu"])
def test_opcheck(training, channels_last, activation):
    x, bn, grad = _make((2, 6, 3, 5), 12)
    x, grad = x.float(), grad.float()
    if channels_last:
        x, grad = (t.to(memory_format=torch.channels_last) for t in (x, grad))
    params = [t.float() for t in bn]
    ops = torch.ops.patnet_triton
    args = (x, *params, 0.1, 1e-5, activation, training)
    torch.library.opcheck(ops.batch_norm_act.default, args)
    _, mean, var = ops.batch_norm_act(*args)
    if not training:
        assert mean.shape == var.shape == (0,)
        mean, var = params[2], params[3]
    torch.library.opcheck(ops.batch_norm_act_backward.default,
                          (grad, x, mean, var, params[0], params[1], 1e-5, activation, training))


def test_compile_fullgraph_matches_eager():
    """A training step compiled with fullgraph=True: output, gradients and running statistics
    as in eager mode."""
    x, bn, grad = _make((2, 10, 5, 7), 13)

    def step(x, bn):
        return pk.batch_norm_act(x, bn, "gelu", training=True, backend="triton") * 2

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaf = x.float().requires_grad_()
        params = [t.float().clone().requires_grad_() for t in bn[:2]]
        stats = [t.float().clone() for t in bn[2:]]
        y = fn(leaf, BatchNormParams(*params, *stats, 0.1, 1e-5))
        y.backward(grad.float())
        results.append([y.detach(), leaf.grad, params[0].grad, params[1].grad] + stats)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
