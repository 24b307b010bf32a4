"""The fused PAT_ch (channel_attention) of each fused backend (Triton, CUDA) against the float64
reference: output, every gradient, and the running statistics, in training and eval.

On the CPU, Triton runs under its interpreter and the CUDA kernels through their CPU emulation
(both set by conftest); on a GPU they run compiled. Shapes are small but odd: H, W in
{1, 2, 7, 13}, C1 not a multiple of 16, batch 1, NCHW and channels_last, fp32 / fp16 / bf16,
BN_a present or folded into W_ch (with a bias). The cases are picked to cover each of those
without the full cross product (interpreter time).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import patnet_kernels as pk
from patnet_kernels import BatchNormParams, registry
from patnet_kernels.ops import channel_attention as ca_ops

from conftest import (DEVICE, assert_within_budget, fused_ops, rel_error,
                      require_fused_backend)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# H * W = 1: the interpreter's numpy warns on the (intended) 0 / 0 of the unbiased std.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


class Case(NamedTuple):
    b: int
    c: int
    c1: int
    h: int
    w: int
    dtype: torch.dtype
    channels_last: bool
    training: bool
    bn_a: bool = True  # False: BN_a folded into W_ch, with a cfc bias
    affine: bool = True  # BN weight and bias present
    running: bool = True  # running statistics present (training only may lack them)
    constant_channel: bool = False  # one X2 channel constant: std = 0 (its gradient is masked)

    def __str__(self):
        return "-".join([f"B{self.b}", f"C{self.c}", f"C1_{self.c1}", f"{self.h}x{self.w}",
                         str(self.dtype).split(".")[1], "nhwc" if self.channels_last else "nchw",
                         "train" if self.training else "eval",
                         "bn_a" if self.bn_a else "folded"]
                        + (["no_affine"] if not self.affine else [])
                        + (["no_running"] if not self.running else [])
                        + (["const"] if self.constant_channel else []))


# Training with BN_a uses batches of 3 or more: at B = 2 its normalised output is +-1 whatever
# z is, so the gradients of W_ch through it are pure rounding noise (about eps / var).
CASES = [
    # fp32
    Case(3, 20, 5, 7, 13, F32, False, True, constant_channel=True),
    Case(1, 20, 5, 13, 13, F32, True, True, bn_a=False),  # batch 1 trains with BN_a folded
    Case(2, 12, 3, 1, 1, F32, False, False),  # H * W = 1: Y2 NaN
    Case(2, 100, 25, 7, 7, F32, True, True, bn_a=False, affine=False, running=False),
    Case(3, 40, 10, 13, 2, F32, False, False, bn_a=False),
    # fp16
    Case(3, 22, 5, 13, 7, F16, True, True),
    Case(1, 12, 3, 2, 2, F16, False, False),
    Case(1, 12, 3, 1, 1, F16, True, False, bn_a=False),
    Case(4, 28, 7, 7, 7, F16, False, True, bn_a=False, constant_channel=True),
    Case(2, 36, 9, 2, 7, F16, True, False, affine=False),
    # bf16
    Case(2, 20, 5, 7, 7, BF16, False, True, bn_a=False),
    Case(3, 12, 3, 1, 1, BF16, True, True),  # H * W = 1 in training: NaN batch statistics
    Case(2, 36, 9, 2, 7, BF16, True, False, bn_a=False),
    Case(1, 20, 5, 13, 13, BF16, False, False),
    Case(3, 72, 18, 7, 13, BF16, True, True, running=False),
    Case(1, 40, 10, 7, 2, BF16, True, True, bn_a=False),
]


def _bn(c2, gen, affine, running, momentum, eps):
    def rand(scale, shift):
        return torch.rand(c2, generator=gen, dtype=torch.float64) * scale + shift
    weight, bias = (rand(1.0, 0.5), torch.randn(c2, generator=gen, dtype=torch.float64) * 0.3) \
        if affine else (None, None)
    stats = (torch.randn(c2, generator=gen, dtype=torch.float64) * 0.3, rand(1.0, 0.5)) \
        if running else (None, None)
    return BatchNormParams(weight, bias, *stats, momentum, eps)


def _inputs(case: Case, seed: int = 0) -> Dict[str, object]:
    """The float64 tensors of one case (on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    c2 = case.c - case.c1
    x = torch.randn(case.b, case.c, case.h, case.w, generator=gen, dtype=torch.float64) + 0.2
    if case.constant_channel:
        x[:, case.c1 + 1] = 0.75
    return dict(
        x=x,
        conv_weight=torch.randn(case.c1, case.c1, 3, 3, generator=gen, dtype=torch.float64)
        / (3 * case.c1 ** 0.5),
        cfc_weight=torch.randn(c2, c2, 1, 2, generator=gen, dtype=torch.float64)
        * (1.5 / c2 ** 0.5),
        cfc_bias=None if case.bn_a else torch.randn(c2, generator=gen, dtype=torch.float64) * 0.5,
        bn_a=_bn(c2, gen, case.affine, case.running, 0.1, 1e-5) if case.bn_a else None,
        bn_b=_bn(c2, gen, case.affine, case.running, 0.25, 1e-3),
        grad=torch.randn(case.b, case.c, case.h, case.w, generator=gen, dtype=torch.float64),
    )


def _cast_bn(bn: Optional[BatchNormParams], dtype) -> Optional[BatchNormParams]:
    if bn is None:
        return None
    leaf = [None if t is None else t.detach().to(DEVICE, dtype).clone().requires_grad_()
            for t in bn[:2]]
    stats = [None if t is None else t.detach().to(DEVICE, dtype).clone() for t in bn[2:4]]
    return BatchNormParams(*leaf, *stats, bn.momentum, bn.eps)


def _run(inputs, case: Case, dtype, backend) -> Dict[str, torch.Tensor]:
    """Output, every gradient and the running statistics after one call, by name."""
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = inputs["x"].to(DEVICE, dtype, memory_format=fmt, copy=True).requires_grad_()
    grad = inputs["grad"].to(DEVICE, dtype).to(memory_format=fmt)
    params = {name: None if inputs[name] is None
              else inputs[name].to(DEVICE, dtype).clone().requires_grad_()
              for name in ("conv_weight", "cfc_weight", "cfc_bias")}
    bn_a, bn_b = _cast_bn(inputs["bn_a"], dtype), _cast_bn(inputs["bn_b"], dtype)
    x_before = x.detach().clone()
    y = pk.channel_attention(x, params["conv_weight"], params["cfc_weight"], params["cfc_bias"],
                             bn_a, bn_b, training=case.training, backend=backend)
    y.backward(grad)
    assert torch.equal(x.detach(), x_before)  # the input is never written
    out = {"y": y.detach(), "grad_x": x.grad}
    out.update({f"grad_{name}": t.grad for name, t in params.items() if t is not None})
    for prefix, bn in (("bn_a", bn_a), ("bn_b", bn_b)):
        if bn is None:
            continue
        for field in ("weight", "bias"):
            if getattr(bn, field) is not None:
                out[f"grad_{prefix}_{field}"] = getattr(bn, field).grad
        for field in ("running_mean", "running_var"):
            if getattr(bn, field) is not None:
                out[f"{prefix}_{field}"] = getattr(bn, field)
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case: Case, fused_backend):
    inputs = _inputs(case, seed=CASES.index(case))
    ours = _run(inputs, case, case.dtype, fused_backend)
    exact = _run(inputs, case, torch.float64, "torch")
    in_dtype = _run(inputs, case, case.dtype, "torch")
    assert ours.keys() == exact.keys()
    for name in exact:
        assert ours[name] is not None, name
        assert ours[name].dtype == case.dtype, name
        assert_within_budget(name, ours[name], exact[name], in_dtype[name], case.dtype)
    y = ours["y"]
    assert y.is_contiguous(memory_format=torch.channels_last if case.channels_last
                           else torch.contiguous_format)
    assert ours["grad_x"].stride() == y.stride()
    if case.h * case.w == 1:  # the documented NaN pattern: X2 half NaN, conv half finite
        assert torch.isnan(y[:, case.c1:]).all() and torch.isfinite(y[:, :case.c1]).all()
    else:
        assert all(torch.isfinite(t).all() for t in ours.values())
    if not case.training:  # eval leaves the running statistics bit for bit as they were
        for prefix in ("bn_a", "bn_b"):
            bn = inputs[prefix]
            if bn is not None:
                for field in ("running_mean", "running_var"):
                    assert torch.equal(ours[f"{prefix}_{field}"],
                                       getattr(bn, field).to(DEVICE, case.dtype))


def _infer(inputs, case: Case, dtype, backend) -> torch.Tensor:
    """The output of one eval call without autograd (no input requires a gradient)."""
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = inputs["x"].to(DEVICE, dtype, memory_format=fmt, copy=True)
    params = [None if inputs[name] is None else inputs[name].to(DEVICE, dtype)
              for name in ("conv_weight", "cfc_weight", "cfc_bias")]
    bns = [None if bn is None else BatchNormParams(
        *[None if t is None else t.to(DEVICE, dtype) for t in bn[:4]], bn.momentum, bn.eps)
        for bn in (inputs["bn_a"], inputs["bn_b"])]
    with torch.no_grad():
        return pk.channel_attention(x, *params, *bns, training=False, backend=backend)


EVAL_CASES = [case for case in CASES if not case.training]


@pytest.mark.parametrize("case", EVAL_CASES, ids=str)
def test_inference_matches_float64_reference(case: Case, fused_backend):
    """In eval without autograd the Triton backend runs the gate as one kernel
    (``channel_attention_gate``: the mix, BN_a, the hard-sigmoid, BN_b folded), three launches
    in all; the CUDA backend the autograd Function's gate. Both within the budget."""
    inputs = _inputs(case, seed=CASES.index(case))
    ours = _infer(inputs, case, case.dtype, fused_backend)
    exact = _infer(inputs, case, torch.float64, "torch")
    assert_within_budget("y", ours, exact, _infer(inputs, case, case.dtype, "torch"),
                         case.dtype)
    assert ours.dtype == case.dtype


def test_inference_gate_is_one_kernel():
    """Triton's eval path: statistics, gate, apply, and no autograd Function (the registered
    ops it runs, as a dispatch mode sees them)."""
    require_fused_backend("triton")
    case = EVAL_CASES[0]
    called = []

    class FusedOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "patnet_triton":
                called.append(func.name().split("::")[1])
            return func(*args, **(kwargs or {}))

    with FusedOps():
        _infer(_inputs(case), case, F32, "triton")
    assert called == ["channel_attention_stats", "channel_attention_gate",
                      "channel_attention_apply"]


class GateCase(NamedTuple):
    b: int
    c2: int
    training: bool
    bn_a: bool = True  # False: BN_a folded into W_ch, with a cfc bias
    affine: bool = True
    nan: bool = False  # one sample's std NaN (H * W = 1)

    def __str__(self):
        return "-".join([f"B{self.b}", f"C2_{self.c2}", "train" if self.training else "eval",
                         "bn_a" if self.bn_a else "folded"]
                        + (["no_affine"] if not self.affine else [])
                        + (["nan"] if self.nan else []))


# Under the interpreter the gate kernels take blocks of up to 64 samples and channels: 70 of
# either spans two (the last one partial).
GATE_CASES = [GateCase(3, 12, True), GateCase(70, 9, True), GateCase(5, 70, True, affine=False),
              GateCase(4, 11, True, bn_a=False), GateCase(70, 70, False),
              GateCase(2, 10, False, bn_a=False), GateCase(3, 12, True, nan=True)]


def _gate_args(case: GateCase):
    """The gate ops' arguments of one case, fp32 on DEVICE: (forward's, backward's inputs)."""
    gen = torch.Generator().manual_seed(case.b * 100 + case.c2)
    b, c2 = case.b, case.c2

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(DEVICE)

    mean, std = randn(b, c2, shift=0.3), randn(b, c2, scale=0.2, shift=1.0).abs()
    if case.nan:
        std[1] = float("nan")
    bn_a = _bn(c2, gen, case.affine, True, 0.1, 1e-5) if case.bn_a else None
    bn_b = _bn(c2, gen, case.affine, True, 0.25, 1e-3)

    def f32(t):
        return None if t is None else t.to(DEVICE, torch.float32)

    a = bn_a if bn_a is not None else BatchNormParams(None, None, None, None)
    forward = (mean, std, 49, randn(c2, c2, 1, 2, scale=1.5 / c2 ** 0.5),
               None if case.bn_a else randn(c2, scale=0.5), *map(f32, a[:4]), 1e-5,
               *map(f32, bn_b[:4]), 1e-3, case.bn_a, case.training)
    backward = (randn(b, c2), randn(b, c2, scale=3.0))  # sum_xg, sum_g
    return forward, backward


@pytest.mark.parametrize("case", GATE_CASES, ids=str)
def test_gate_kernels_match_torch_gate(case):
    """Triton's gate ops (one kernel forward, three backward) against the torch functions of
    the same signature that the CUDA backend runs (:func:`ca_ops.gate_forward`,
    :func:`ca_ops.gate_backward`): every output, NaNs in the same places."""
    require_fused_backend("triton")
    ops = fused_ops("triton")
    forward, (sum_xg, sum_g) = _gate_args(case)
    ours = ops.channel_attention_gate(*forward)
    torch_gate = ca_ops.gate_forward(*forward)
    names = ("scale", "shift", "z", "moments", "batch statistics")
    for name, got, want in zip(names, ours, torch_gate):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6, equal_nan=True, msg=name)
    mean, std, pixels, cfc_weight, _, a_weight, a_bias, *_ = forward
    b_weight = forward[10]
    backward = (sum_xg, sum_g, mean, std, pixels, ours[2], ours[3], cfc_weight, a_weight,
                a_bias, b_weight, case.bn_a, case.training)
    names = ("slope", "offset", "grad cfc_weight", "grad vectors")
    for name, got, want in zip(names, ops.channel_attention_gate_backward(*backward),
                               ca_ops.gate_backward(*backward)):
        # (atol: with BN_a in training the bias gradient is 0 up to rounding of sums of ~10)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gate_opcheck(training):
    require_fused_backend("triton")
    ops = fused_ops("triton")
    forward, (sum_xg, sum_g) = _gate_args(GateCase(3, 12, training))
    torch.library.opcheck(ops.channel_attention_gate.default, forward)
    _, _, z, moments, _ = ops.channel_attention_gate(*forward)
    mean, std, pixels, cfc_weight, _, a_weight, a_bias, *_ = forward
    torch.library.opcheck(ops.channel_attention_gate_backward.default,
                          (sum_xg, sum_g, mean, std, pixels, z, moments, cfc_weight, a_weight,
                           a_bias, forward[10], True, training))


def test_training_step_launches():
    """A Triton training step of PAT_ch is its kernels and the running statistics' update:
    forward statistics, gate, apply; backward the weight gradient, the gradient sums, the
    gate's backward (three kernels) and the input gradient; no torch op of the gate."""
    require_fused_backend("triton")
    from benchmarks import traffic
    case = Case(3, 20, 5, 7, 13, F32, False, True)
    inputs = _inputs(case)
    x = inputs["x"].to(DEVICE, F32).requires_grad_()
    conv_weight, cfc_weight = (inputs[name].to(DEVICE, F32).requires_grad_()
                               for name in ("conv_weight", "cfc_weight"))
    bn_a, bn_b = _cast_bn(inputs["bn_a"], F32), _cast_bn(inputs["bn_b"], F32)
    grad = inputs["grad"].to(DEVICE, F32)
    recorder = traffic.TrafficRecorder()
    with recorder:
        y = pk.channel_attention(x, conv_weight, cfc_weight, None, bn_a, bn_b, training=True,
                                 backend="triton")
        y.backward(grad)
    fused = [(op.name.split("::")[1], op.kernels) for op in recorder.ops
             if op.name.startswith("patnet_triton::")]
    assert fused == [("channel_attention_stats", 1), ("channel_attention_gate", 1),
                     ("channel_attention_apply", 1), ("conv3x3_weight_grad", 1),
                     ("channel_attention_grad_sums", 1), ("channel_attention_gate_backward", 3),
                     ("channel_attention_input_grad", 1)]
    others = [op.name for op in recorder.ops if not op.inside and op.kernels
              and not op.name.startswith("patnet_triton::")]
    # the running statistics: one op per momentum (BN_a's 0.1, BN_b's 0.25 here)
    assert others == ["aten::_foreach_lerp_"] * 2


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_large_mean_and_many_pixel_tiles(training, fused_backend):
    """X2 = 300 + N(0, 1): the statistics must not cancel (E[x^2] - E[x]^2 in fp32 loses
    everything here), and a 20 x 20 map spans several pixel tiles of every kernel."""
    case = Case(3, 14, 3, 20, 20, F32, channels_last=training, training=training)
    inputs = _inputs(case, seed=7)
    inputs["x"] += 300.0
    ours = _run(inputs, case, F32, fused_backend)
    exact = _run(inputs, case, torch.float64, "torch")
    in_dtype = _run(inputs, case, F32, "torch")
    for name in exact:
        assert_within_budget(name, ours[name], exact[name], in_dtype[name], F32)
    x = inputs["x"].to(DEVICE, F32)
    mean, std = fused_ops(fused_backend).channel_attention_stats(x, 3)
    flat = inputs["x"][:, 3:].flatten(2).to(DEVICE)
    assert rel_error(mean, flat.mean(-1)) < 1e-6
    assert rel_error(std, flat.std(-1)) < 1e-5


def test_backend_dispatches_here(fused_backend, monkeypatch):
    """pk.channel_attention(backend=...) runs that backend's function of the registry, the
    autograd Function of ops/channel_attention.py over the backend's namespace."""
    require_fused_backend(fused_backend)
    case = CASES[0]
    inputs = _inputs(case)
    registry.load("channel_attention", fused_backend)
    function = registry.implementation("channel_attention", fused_backend)
    assert function.__module__ == ca_ops.__name__
    ran = []
    monkeypatch.setattr(registry._IMPLEMENTATIONS[("channel_attention", fused_backend)],
                        "function", lambda *args: ran.append(args) or function(*args))
    _run(inputs, case, F32, fused_backend)
    assert len(ran) == 1


def test_training_with_batch_norm_over_one_value_is_refused(fused_backend):
    """BN_a in training needs a batch of at least 2 (F.batch_norm's error), on every backend."""
    inputs = _inputs(Case(1, 12, 3, 5, 5, F32, False, True))
    for backend in ("torch", fused_backend):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            _run(inputs, Case(1, 12, 3, 5, 5, F32, False, True), F32, backend)


def _op_args(channels_last: bool):
    case = Case(2, 14, 3, 5, 6, F32, channels_last, True)
    inputs = _inputs(case, seed=4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = inputs["x"].to(DEVICE, F32).to(memory_format=fmt)
    grad = inputs["grad"].to(DEVICE, F32).to(memory_format=fmt)
    w = inputs["conv_weight"].to(DEVICE, F32)
    gen = torch.Generator().manual_seed(5)
    coef = [torch.randn(2, 11, generator=gen).to(DEVICE) for _ in range(4)]
    return {
        "channel_attention_stats": (x, 3),
        "channel_attention_apply": (x, w, coef[0], coef[1]),
        "channel_attention_grad_sums": (x, grad, coef[2]),
        "channel_attention_input_grad": (grad, x, w, *coef),
    }


@pytest.mark.parametrize("op", ["channel_attention_stats", "channel_attention_apply",
                                "channel_attention_grad_sums", "channel_attention_input_grad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(op, channels_last, fused_backend):
    torch.library.opcheck(getattr(fused_ops(fused_backend), op).default,
                          _op_args(channels_last)[op])


def test_compile_fullgraph_matches_eager(fused_backend):
    """A compiled training step through the fused op equals eager: output, grads, statistics."""
    case = Case(3, 16, 4, 7, 9, F32, False, True)
    inputs = _inputs(case, seed=6)

    def step(x, conv_w, cfc_w, bn_a, bn_b):
        y = pk.channel_attention(x, conv_w, cfc_w, None, bn_a, bn_b, training=True,
                                 backend=fused_backend)
        return y.relu() + x

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = inputs["x"].to(DEVICE, F32, copy=True).requires_grad_()
        conv_w, cfc_w = (inputs[k].to(DEVICE, F32, copy=True).requires_grad_()
                         for k in ("conv_weight", "cfc_weight"))
        bn_a, bn_b = _cast_bn(inputs["bn_a"], F32), _cast_bn(inputs["bn_b"], F32)
        y = fn(x, conv_w, cfc_w, bn_a, bn_b)
        y.backward(inputs["grad"].to(DEVICE, F32))
        results.append([y.detach(), x.grad, conv_w.grad, cfc_w.grad]
                       + [t.grad for t in (*bn_a[:2], *bn_b[:2])]
                       + [*bn_a[2:4], *bn_b[2:4]])
    for eager, comp in zip(*results):  # fp32 rounding apart (inductor fuses the gate math)
        assert rel_error(comp, eager) < 1e-5
