"""Mixed precision (torch.autocast) and channels_last on each fused backend (Triton, CUDA).

Under autocast the functional API casts activations and weights to the autocast dtype and runs
the op with autocast off (``patnet_kernels.functional.autocast_aware``); BatchNorm tensors and
the parameters an op reads in float32 (PAT_ch's W_ch, the iRPE table) stay float32, and on the
fused backends get float32 gradients, not rounded to the autocast dtype. So:

- each op under autocast returns the autocast dtype and is bit for bit the op called outside
  autocast with its activations and weights cast explicitly (same backend), forward, backward
  and the updated running statistics;
- a whole fused model under autocast is as close to the float64 reference model as the
  reference (backend "torch") model under the same autocast is: output, input gradient and
  every parameter gradient, in eval and in training (backward outside autocast, as usual),
  within BUDGET_FACTOR x the reference's error + the dtype's floor (conftest);
- a channels_last model on a channels_last input, float32, equals the reference within the
  float32 budget, forward and backward (the output's layout is whatever PyTorch gives).

On the CPU autocast runs on "cpu" (bfloat16 and float16), the kernels under the Triton
interpreter / the CUDA emulation; on a GPU on "cuda". The models are small (embed_dim 16, one
block per stage) for interpreter time; every block type is in them: PAT_ch, PAT_sf and (Triton)
PAT_sp in the PATNet, PConv in the FasterNet.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import patnet
import patnet_kernels as pk
from patnet.testing import randomize_norms
from patnet_kernels import BatchNormParams, registry

from conftest import (BUDGET_FACTOR, BUDGET_FLOOR, DEVICE, rel_error,
                      require_fused_backend)

AMP_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), drop_path_rate=0.0)
# On the CPU, 64 x 32 images (stage 4: a 2 x 1 token grid, the smallest input whose attention
# is not trivial; interpreter time barely depends on it); on a GPU 224 x 224.
AMP_INPUT = (224, 224) if DEVICE.type == "cuda" else (64, 32)


def _tiny_model(family: str, backend: str) -> torch.nn.Module:
    """A small model with every block type the backend has: PATNet (PAT_ch, PAT_sf, and PAT_sp
    except on CUDA, which has no PAT_sp kernel) or FasterNet (PConv)."""
    if family == "fasternet":
        return patnet.create_model("fasternet_t0", backend=backend, **TINY)
    return patnet.create_model("patnet_t1", backend=backend, attn_drop=0.0, proj_drop=0.0,
                               use_spatial_attn=backend != "cuda", **TINY)


def _models(family: str, backend: str, mode: str):
    """(float64 reference, float32 reference, fused model): the same weights, non-trivial norms."""
    torch.manual_seed(0)
    reference = _tiny_model(family, backend)
    patnet.set_backend(reference, "torch")
    randomize_norms(reference, seed=1)
    ours = _tiny_model(family, backend)
    ours.load_state_dict(reference.state_dict())
    exact = copy.deepcopy(reference).double()
    return [m.to(DEVICE).train(mode == "train") for m in (exact, reference, ours)]


def _inputs(family: str, mode: str):
    """AMP_INPUT images, batch 2, or 3 to train PATNet (at 2, BN_a's output is +-1 and its
    gradients are noise)."""
    gen = torch.Generator().manual_seed(2)
    batch = 3 if mode == "train" and family == "patnet" else 2
    x = torch.randn(batch, 3, *AMP_INPUT, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, 1000, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), grad.to(DEVICE)


def _forward_backward(model, x, grad, autocast_dtype=None, memory_format=None):
    """Output, input gradient and parameter gradients (by name); the forward under autocast
    when ``autocast_dtype`` is given, the backward outside it."""
    x = x.clone()
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    with (contextlib.nullcontext() if autocast_dtype is None
          else torch.autocast(DEVICE.type, dtype=autocast_dtype)):
        out = model(x)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


def _assert_within(what, ours, references, exact, dtype, floor=0.0):
    """rel_error(ours, exact) <= BUDGET_FACTOR x the largest rel_error(reference, exact) of
    ``references`` + the floor of ``dtype`` (``exact`` is float64; ``references`` the torch
    backend in the same precision: one run, or several equally valid ones)."""
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: not finite"
    ours_err = rel_error(ours, exact, floor)
    ref_err = max(rel_error(reference, exact, floor) for reference in references)
    budget = BUDGET_FACTOR * ref_err + BUDGET_FLOOR[dtype]
    assert ours_err <= budget, (f"{what}: relative error {ours_err:.3g} vs float64 exceeds the "
                                f"budget {budget:.3g} ({BUDGET_FACTOR} x the reference's "
                                f"{ref_err:.3g} in {dtype} + {BUDGET_FLOOR[dtype]:.1g})")


def _assert_results(exact, references, ours, dtype):
    """Output, input gradient and each parameter gradient of ``ours`` against ``exact``,
    within the budget that ``references`` (a list of results in the same precision) set."""
    (out_x, gx_x, gp_x), (out_o, gx_o, gp_o) = exact, ours
    _assert_within("output", out_o, [r[0] for r in references], out_x, dtype)
    _assert_within("input gradient", gx_o, [r[1] for r in references], gx_x, dtype)
    assert set(gp_o) == set(gp_x)
    largest = max(g.norm().item() for g in gp_x.values())
    for key, g in gp_x.items():  # (a floor for gradients that are tiny next to the others)
        assert gp_o[key].dtype == torch.float32, key  # the parameters' own dtype
        _assert_within(f"gradient of {key}", gp_o[key], [r[2][key] for r in references], g,
                       dtype, floor=1e-3 * largest)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", ["patnet", "fasternet"])
def test_model_under_autocast(family, mode, dtype, fused_backend):
    exact, reference, ours = _models(family, fused_backend, mode)
    x, grad = _inputs(family, mode)
    results_x = _forward_backward(exact, x, grad)
    results_r = _forward_backward(reference, x.float(), grad.float(), autocast_dtype=dtype)
    results_o = _forward_backward(ours, x.float(), grad.float(), autocast_dtype=dtype)
    assert results_o[0].dtype == results_r[0].dtype  # what autocast makes of the head
    assert results_o[1].dtype == torch.float32  # the input's own dtype
    _assert_results(results_x, [results_r], results_o, dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("family", ["patnet", "fasternet"])
def test_inference_copy_under_autocast(family, dtype, layout, fused_backend):
    """The fused inference copy under autocast (the model benchmark's configuration: AMP,
    channels_last) is as close to the float64 eval model as the reference eval model under
    the same autocast and layout is, within the budget (its folded BatchNorms, fused blocks
    and the statistics one block hands the next included)."""
    exact, reference, model = _models(family, fused_backend, "eval")
    fast = patnet.optimize_for_inference(model, backend=fused_backend)
    x, _ = _inputs(family, "eval")
    x_in = x.float()
    if layout == "channels_last":
        cl = torch.channels_last
        reference, fast, x_in = reference.to(memory_format=cl), fast.to(memory_format=cl), \
            x_in.contiguous(memory_format=cl)
    with torch.no_grad():
        expected = exact(x)
        with torch.autocast(DEVICE.type, dtype=dtype):
            out_r, out_o = reference(x_in), fast(x_in)
    assert out_o.dtype == out_r.dtype
    _assert_within("output", out_o.float(), [out_r.float()], expected, dtype)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", ["patnet", "fasternet"])
def test_backward_inside_autocast_is_backward_outside(family, mode, fused_backend):
    """``loss.backward()`` written inside the autocast region (PyTorch advises against it; users
    write it) gives the gradients of a backward outside it, bit for bit: the fused autograd
    Functions run their backward with autocast off, as their forward
    (``ops.backward_without_autocast``). Before, the CUDA backend's PAT_ch backward computed
    its gate gradients in bfloat16 in training and, in eval, handed its float32-only kernel a
    bfloat16 offset, which refused it."""
    _, _, outside = _models(family, fused_backend, mode)
    inside = copy.deepcopy(outside)
    x, grad = _inputs(family, mode)
    gradients = []
    for model, backward_inside in ((outside, False), (inside, True)):
        x_in = x.float().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = model(x_in)
            if backward_inside:
                out.backward(grad.to(out.dtype))
        if not backward_inside:
            out.backward(grad.to(out.dtype))
        gradients.append({"input": x_in.grad, **{k: p.grad for k, p in model.named_parameters()}})
    for key, expected in gradients[0].items():
        assert torch.equal(gradients[1][key], expected), key


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", ["patnet", "fasternet"])
def test_channels_last_model(family, mode, fused_backend):
    """float32; the budget is set by the reference model channels_last and NCHW (two equally
    valid roundings: an ill-conditioned training gradient can be lucky in one)."""
    exact, reference, ours = _models(family, fused_backend, mode)
    cl = torch.channels_last
    reference_nchw = copy.deepcopy(reference)
    reference, ours = reference.to(memory_format=cl), ours.to(memory_format=cl)
    x, grad = _inputs(family, mode)
    results_x = _forward_backward(exact, x, grad)
    results_r = [_forward_backward(reference, x.float(), grad.float(), memory_format=cl),
                 _forward_backward(reference_nchw, x.float(), grad.float())]
    results_o = _forward_backward(ours, x.float(), grad.float(), memory_format=cl)
    _assert_results(results_x, results_r, results_o, torch.float32)
    if mode == "train":  # the fused BatchNorm statistics, updated from channels_last maps
        states = [m.state_dict() for m in (exact, reference, reference_nchw, ours)]
        for key, value in states[0].items():
            if key.endswith(("running_mean", "running_var")):
                _assert_within(key, states[3][key], [states[1][key], states[2][key]], value,
                               torch.float32)


# ---------------------------------------------------------------- the functional API under autocast

def _bn(channels: int, gen: torch.Generator) -> BatchNormParams:
    """float32 BatchNorm tensors (as nn.BatchNorm2d's stay under autocast)."""
    def rand(scale, shift):
        return (torch.rand(channels, generator=gen) * scale + shift).to(DEVICE)
    return BatchNormParams(rand(1.0, 0.5).requires_grad_(), rand(0.6, -0.3).requires_grad_(),
                           rand(0.6, -0.3), rand(1.0, 0.5))


def _op_case(op: str, gen: torch.Generator):
    """(fn, tensors): the float32 tensors of one small call of ``op``, and fn(tensors, bns,
    training, backend) making the call. BN tensors are in ``bns``, outside the cast."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    if op == "partial_conv3x3":
        tensors = [randn(2, 12, 5, 6), randn(3, 3, 3, 3, scale=0.2)]
        return (lambda t, bns, training, backend:
                pk.partial_conv3x3(t[0], t[1], backend=backend)), tensors, []
    if op == "channel_attention":
        tensors = [randn(3, 12, 5, 6), randn(3, 3, 3, 3, scale=0.2), randn(9, 9, 1, 2, scale=0.3)]
        return (lambda t, bns, training, backend: pk.channel_attention(
            t[0], t[1], t[2], None, bns[0], bns[1], training=training, backend=backend)), \
            tensors, [_bn(9, gen), _bn(9, gen)]
    if op == "spatial_attention":
        tensors = [randn(3, 12, 5, 6), randn(1, 6, 1, 1, scale=0.4), randn(6, 6, 1, 1, scale=0.4)]
        return (lambda t, bns, training, backend: pk.spatial_attention(
            t[0], t[1], t[2], None, bns[0], bns[1], training=training, backend=backend)), \
            tensors, [_bn(6, gen), _bn(6, gen)]
    if op == "batch_norm_act":
        return (lambda t, bns, training, backend: pk.batch_norm_act(
            t[0], bns[0], "gelu", training=training, backend=backend)), \
            [randn(3, 12, 5, 6)], [_bn(12, gen)]
    if op == "rpe_attention":
        bucket = pk.rpe_buckets(2, 3, DEVICE)
        tensors = [randn(2, 2, 6, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8), randn(2, 81)]
        return (lambda t, bns, training, backend:
                pk.rpe_attention(t[0], t[1], t[2], t[3], bucket, backend=backend)), tensors, []
    if op == "pointwise_mlp":
        tensors = [randn(2, 12, 5, 6), randn(24, 12, 1, 1, scale=0.3), randn(24),
                   randn(12, 24, 1, 1, scale=0.2), randn(2, 12, 5, 6)]
        return (lambda t, bns, training, backend: pk.pointwise_mlp(
            t[0], t[1], t[2], t[3], residual=t[4], activation="gelu", backend=backend)), \
            tensors, []
    if op == "partial_block":
        tensors = [randn(2, 12, 5, 6), randn(3, 3, 3, 3, scale=0.2), randn(24, 12, 1, 1, scale=0.3),
                   randn(24), randn(12, 24, 1, 1, scale=0.2), randn(9, 9, 1, 2, scale=0.3)]
        return (lambda t, bns, training, backend: pk.partial_block(
            t[0], t[1], t[2], t[3], t[4], cfc_weight=t[5], bn_b=bns[0], backend=backend)), \
            tensors, [_bn(9, gen)]
    if op == "patch_conv":  # (under autocast it reads its float32 input as it is, converted in
        # the kernel: values exact in bfloat16 and float16, since Triton's interpreter truncates
        # to bfloat16 where a GPU and torch round to nearest)
        tensors = [randn(2, 3, 9, 12).bfloat16().float(), randn(16, 3, 4, 4, scale=0.2),
                   randn(16)]
        return (lambda t, bns, training, backend: pk.patch_conv(
            t[0], t[1], t[2], statistics_of=4, backend=backend)[0]), tensors, []
    if op == "layer_norm_linear":  # (reads its input as it is: values exact in both dtypes)
        tensors = [randn(2, 12, 3, 4).bfloat16().float()[:, 4:], randn(18, 8, scale=0.3),
                   randn(18)]
        return (lambda t, bns, training, backend: pk.layer_norm_linear(
            t[0], t[1], t[2], eps=1e-6, backend=backend)), tensors, []
    assert op == "self_mixer_output"
    tensors = [randn(2, 12, 2, 3), randn(3, 3, 3, 3, scale=0.2), randn(2, 6, 9),
               randn(9, 9, scale=0.3), randn(9)]
    return (lambda t, bns, training, backend: pk.self_mixer_output(
        t[0], t[1], t[2], t[3], t[4], backend=backend)), tensors, []


# The tensors of each _op_case that autocast leaves float32 (the op reads them in float32:
# patnet_kernels.functional.autocast_aware's ``keep``): PAT_ch's W_ch, the iRPE table.
KEPT_FLOAT32 = {"channel_attention": {2}, "partial_block": {5}, "rpe_attention": {3}}


def _cast(op, tensors, dtype):
    """The tensors of ``op``'s case as autocast hands them to the op, cast explicitly."""
    kept = KEPT_FLOAT32.get(op, set())
    return [t if i in kept else t.to(dtype) for i, t in enumerate(tensors)]


def _call(op, fn, tensors, bns, training, backend, dtype, under_autocast, grad=True):
    """Output, the float32 leaves' gradients and the BN state after one call: under autocast,
    or outside it with the tensors cast to ``dtype`` explicitly (a differentiable cast).
    ``grad=False`` (an inference op): no gradient, under torch.no_grad()."""
    if not grad:
        with torch.no_grad():
            if under_autocast:
                with torch.autocast(DEVICE.type, dtype=dtype):
                    return fn(tensors, bns, training, backend), [], []
            return fn(_cast(op, tensors, dtype), bns, training, backend), [], []
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    bns = [BatchNormParams(bn.weight.detach().clone().requires_grad_(),
                           bn.bias.detach().clone().requires_grad_(),
                           bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    if under_autocast:
        with torch.autocast(DEVICE.type, dtype=dtype):
            y = fn(leaves, bns, training, backend)
    else:
        y = fn(_cast(op, leaves, dtype), bns, training, backend)
    gen = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype))
    state = [t for bn in bns for t in (bn.weight.grad, bn.bias.grad, bn.running_mean,
                                       bn.running_var)]
    return y.detach(), [t.grad for t in leaves], state


BN_OPS = ("channel_attention", "spatial_attention", "batch_norm_act")


# Every op of every backend that has kernels for it (patnet_kernels.registry).
OP_CASES = [pytest.param(backend, op, id=f"{backend}-{op}")
            for backend in ("torch",) + registry.FUSED_BACKENDS
            for op in registry.ops_of(backend)]


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("backend, op", OP_CASES)
def test_op_under_autocast_is_the_explicitly_cast_op(backend, op, dtype):
    if backend != "torch":
        require_fused_backend(backend)
    fn, tensors, bns = _op_case(op, torch.Generator().manual_seed(0))
    grad = not registry.OPS[op].inference
    for training in ((False, True) if op in BN_OPS else (False,)):
        y_auto, grads_auto, state_auto = _call(op, fn, tensors, bns, training, backend, dtype,
                                               True, grad)
        y_cast, grads_cast, state_cast = _call(op, fn, tensors, bns, training, backend, dtype,
                                               False, grad)
        assert y_auto.dtype == dtype, f"{op} under autocast returned {y_auto.dtype}"
        assert torch.equal(y_auto, y_cast), f"{op} (training={training}): outputs differ"
        for index, (a, c) in enumerate(zip(grads_auto, grads_cast)):
            assert a.dtype == torch.float32, f"{op}: gradient {index} is {a.dtype}"
            assert torch.equal(a, c), f"{op} (training={training}): gradient {index} differs"
            # (not rounded to the autocast dtype by the fused kernels; the reference casts W_ch
            # to the activations' dtype, as eager autocast casts a conv's weight)
            if backend != "torch" and index in KEPT_FLOAT32.get(op, ()):
                assert not torch.equal(a, a.to(dtype).float()), \
                    f"{op}: the float32 parameter {index}'s gradient was rounded to {dtype}"
        for index, (a, c) in enumerate(zip(state_auto, state_cast)):
            assert a.dtype == torch.float32, f"{op}: BatchNorm tensor {index} is {a.dtype}"
            assert torch.equal(a, c), \
                f"{op} (training={training}): BatchNorm tensor {index} differs"


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_op_called_with_keywords_only_under_autocast(dtype):
    """An op whose tensors are all passed by keyword is cast as the same call by position:
    autocast finds the device from a keyword tensor too (before, such a call ran float32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEVICE)
    weight = torch.randn(2, 2, 3, 3, generator=gen).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        by_keyword = pk.partial_conv3x3(x=x, weight=weight, backend="torch")
        by_position = pk.partial_conv3x3(x, weight, backend="torch")
    assert by_keyword.dtype == dtype and torch.equal(by_keyword, by_position)


def test_autocast_is_back_on_after_an_op_and_after_its_error():
    """An op runs with autocast off and leaves the region as it found it (enabled, its dtype):
    also when the op raises (the functional API turns autocast off without the context
    manager, ``autocast_aware``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEVICE)
    weight = torch.randn(2, 2, 3, 3, generator=gen).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        pk.partial_conv3x3(x, weight, backend="torch")
        assert torch.is_autocast_enabled(DEVICE.type)
        assert torch.get_autocast_dtype(DEVICE.type) == torch.bfloat16
        with pytest.raises(ValueError):
            pk.partial_conv3x3(x, weight[:, :1], backend="torch")
        assert torch.is_autocast_enabled(DEVICE.type)
        assert torch.get_autocast_dtype(DEVICE.type) == torch.bfloat16
        assert torch.nn.functional.linear(x[0, 0], x[0, 0]).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled(DEVICE.type)


@pytest.mark.parametrize("backend, op", [case for case in OP_CASES if case.values[1] in BN_OPS])
def test_batch_norm_gradients_under_fp16_autocast_stay_float32(backend, op):
    """Under fp16 autocast with a GradScaler-sized loss scale (2^12 here), each BatchNorm's
    parameter gradients, sums over every pixel of the batch, come back float32 and finite, as
    nn.BatchNorm2d's do: past fp16's largest value (65504) in this case, where a gradient
    rounded to the activations' dtype on its way would be inf (and GradScaler would skip the
    step and shrink its scale, again and again)."""
    if backend != "torch":
        require_fused_backend(backend)
    fn, tensors, bns = _op_case(op, torch.Generator().manual_seed(0))
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = fn(leaves, bns, True, backend)
    y.backward(torch.full_like(y, 2.0 ** 12))
    grads = [g for bn in bns for g in (bn.weight.grad, bn.bias.grad)]
    for index, g in enumerate(grads):
        assert g.dtype == torch.float32, f"{op}: BatchNorm gradient {index} is {g.dtype}"
        assert torch.isfinite(g).all(), f"{op}: BatchNorm gradient {index} is not finite: {g}"
    assert max(g.abs().max().item() for g in grads) > torch.finfo(torch.float16).max
