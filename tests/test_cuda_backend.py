"""The CUDA backend's refusals: its ops called directly (``torch.ops.patnet_cuda``) refuse bad
input with the informative RuntimeError of csrc/bindings.cpp's checks ("patnet_cuda: ..."), and
the op it has no kernel for (spatial_attention) is refused by name, pointing to Triton.

The functional API checks its inputs before any backend runs (tests/test_functional_errors.py);
these are the C++ checks behind it, for callers of the ops themselves. On the CPU the ops are
the CPU emulation build (PATNET_CUDA_EMULATE=1, set by conftest), whose checks are the same.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BatchNormParams

from conftest import DEVICE, fused_ops

F32, F16, F64 = torch.float32, torch.float16, torch.float64


@pytest.fixture(scope="module")
def ops():
    return fused_ops("cuda")


def _randn(*shape, dtype=F32):
    return torch.randn(*shape, generator=_GEN, dtype=F64).to(DEVICE, dtype)


_GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _inputs_from_one_seed():
    """Each test draws its inputs from the same seed, whatever ran before it (-k, xdist)."""
    _GEN.manual_seed(0)


def _conv():
    """x (2, 8, 5, 6), weight (2, 2, 3, 3): C1 = 2, C2 = 6."""
    return _randn(2, 8, 5, 6), _randn(2, 2, 3, 3)


def _coef(*shape, dtype=F32):
    return _randn(*shape, dtype=dtype)


def _attention(n=6, d=8, heads=2):
    q, k, v = (_randn(1, heads, n, d) for _ in range(3))
    table = _randn(heads, 81)
    bucket = torch.zeros(n, n, dtype=torch.int64, device=DEVICE)
    return q, k, v, table, bucket


def _seed(value=(1 << 32) + 7, dtype=torch.int64):
    return torch.tensor(value, dtype=dtype)


def _mixer():
    """x (2, 8, 5, 6), conv_weight (2, 2, 3, 3), tokens (2, 30, 6), proj_weight (6, 6), bias."""
    x, w = _conv()
    return x, w, _randn(2, 30, 6), _randn(6, 6), _randn(6)


def _rpe_bwd(q, k, v, table, bucket, scale=0.35, p=0.0, seed=None, grad=None):
    grad = q if grad is None else grad
    return (grad, q, k, v, q, torch.zeros(q.shape[:3], device=DEVICE), table, bucket, scale, p,
            seed, True)


def _bigger_than(limit_n=None, limit_d=None):
    n, d = (limit_n + 1, 8) if limit_n else (4, limit_d + 8)
    q, k, v = (torch.zeros(1, 1, n, d, device=DEVICE) for _ in range(3))
    return q, k, v, torch.zeros(1, 81, device=DEVICE), torch.zeros(n, n, dtype=torch.int64,
                                                                   device=DEVICE)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


# name -> (op, a function making its arguments, the message that must be in the error)
CHECKED = {
    # PConv
    "pconv-x_float64": ("partial_conv3x3", lambda: tuple(t.double() for t in _conv()),
                        "patnet_cuda: x must be float32, float16 or bfloat16, got Double; use "
                        "backend='torch'"),
    "pconv-x_int": ("partial_conv3x3", lambda: tuple(t.int() for t in _conv()),
                    "patnet_cuda: x must be float32, float16 or bfloat16, got Int"),
    "pconv-weight_dtype": ("partial_conv3x3", lambda: _replace(_conv(), 1, _conv()[1].half()),
                           "patnet_cuda: weight is Half but x is Float"),
    "pconv-weight_not_square": ("partial_conv3x3", lambda: (_conv()[0], _randn(2, 3, 3, 3)),
                                "patnet_cuda: weight must be (C1, C1, 3, 3) with 1 <= C1 <= C "
                                "= 8, got [2, 3, 3, 3]"),
    "pconv-weight_5x5": ("partial_conv3x3", lambda: (_conv()[0], _randn(2, 2, 5, 5)),
                         "must be (C1, C1, 3, 3) with 1 <= C1 <= C = 8, got [2, 2, 5, 5]"),
    "pconv-c1_above_c": ("partial_conv3x3", lambda: (_conv()[0], _randn(9, 9, 3, 3)),
                         "must be (C1, C1, 3, 3) with 1 <= C1 <= C = 8, got [9, 9, 3, 3]"),
    "pconv-weight_dims": ("partial_conv3x3", lambda: (_conv()[0], _randn(2, 2, 3)),
                          "patnet_cuda: weight must have 4 dimensions, got [2, 2, 3]"),
    "pconv-x_dims": ("partial_conv3x3", lambda: (_conv()[0][0], _conv()[1]),
                     "patnet_cuda: x must have 4 dimensions, got [8, 5, 6]"),
    "pconv_-x_float64": ("partial_conv3x3_", lambda: tuple(t.double() for t in _conv()),
                         "patnet_cuda: x must be float32, float16 or bfloat16, got Double"),
    "pconv_-weight_shape": ("partial_conv3x3_", lambda: (_conv()[0], _randn(2, 3, 3, 3)),
                            "must be (C1, C1, 3, 3)"),
    "pconv_input_grad-float64": ("partial_conv3x3_input_grad",
                                 lambda: tuple(t.double() for t in _conv()),
                                 "patnet_cuda: grad_y must be float32, float16 or bfloat16"),
    "weight_grad-shapes": ("conv3x3_weight_grad", lambda: (_randn(2, 2, 5, 6), _randn(2, 8, 5, 7),
                                                   _randn(2, 2, 3, 3)),
                           "patnet_cuda: grad_y [2, 8, 5, 7] does not fit x1 [2, 2, 5, 6]"),
    "weight_grad-dtypes": ("conv3x3_weight_grad",
                           lambda: (_randn(2, 2, 5, 6), _randn(2, 8, 5, 6, dtype=F16),
                                    _randn(2, 2, 3, 3)),
                           "patnet_cuda: grad_y and x1 differ in dtype"),
    "weight_grad-int": ("conv3x3_weight_grad",
                        lambda: (_randn(2, 2, 5, 6).long(), _randn(2, 8, 5, 6).long(),
                                 _randn(2, 2, 3, 3).long()),
                        "patnet_cuda: x1 must be float32, float16 or bfloat16, got Long"),
    # PAT_ch
    "stats-c1_is_c": ("channel_attention_stats", lambda: (_conv()[0], 8),
                      "patnet_cuda: c1 = 8 must be in [0, 8)"),
    "stats-c1_negative": ("channel_attention_stats", lambda: (_conv()[0], -1),
                          "patnet_cuda: c1 = -1 must be in [0, 8)"),
    "stats-float64": ("channel_attention_stats", lambda: (_conv()[0].double(), 2),
                      "patnet_cuda: x must be float32, float16 or bfloat16, got Double"),
    "apply-coef_shape": ("channel_attention_apply",
                         lambda: _conv() + (_coef(2, 5), _coef(2, 5)),
                         "patnet_cuda: per-(b, c) coefficients must be (B, C2) = (2, 6), got "
                         "[2, 5]"),
    "apply-coef_dtype": ("channel_attention_apply",
                         lambda: _conv() + (_coef(2, 6, dtype=F16), _coef(2, 6)),
                         "patnet_cuda: the per-(b, c) coefficient scale must be float32, got "
                         "Half; cast it with .float()"),
    "apply-weight_shape": ("channel_attention_apply",
                           lambda: (_conv()[0], _randn(3, 2, 3, 3), _coef(2, 6), _coef(2, 6)),
                           "must be (C1, C1, 3, 3)"),
    "grad_sums-shapes": ("channel_attention_grad_sums",
                         lambda: (_conv()[0], _randn(2, 8, 5, 5), _coef(2, 6)),
                         "patnet_cuda: grad_y must match x in shape and dtype"),
    "grad_sums-dtypes": ("channel_attention_grad_sums",
                         lambda: (_conv()[0], _randn(2, 8, 5, 6, dtype=F16), _coef(2, 6)),
                         "patnet_cuda: grad_y must match x in shape and dtype"),
    "grad_sums-mean_shape": ("channel_attention_grad_sums",
                             lambda: (_conv()[0], _randn(2, 8, 5, 6), _coef(3, 6)),
                             "per-(b, c) coefficients must be (B, C2) = (2, 6), got [3, 6]"),
    "input_grad-x_shape": ("channel_attention_input_grad",
                           lambda: (_conv()[0], _randn(2, 8, 4, 6), _conv()[1])
                           + tuple(_coef(2, 6) for _ in range(4)),
                           "patnet_cuda: x must match grad_y in shape and dtype"),
    "input_grad-coef_shape": ("channel_attention_input_grad",
                              lambda: _conv()[:1] + _conv()
                              + (_coef(2, 6), _coef(2, 6), _coef(2, 7), _coef(2, 6)),
                              "per-(b, c) coefficients must be (B, C2) = (2, 6), got [2, 7]"),
    # PAT_sf: rpe_attention
    "rpe-float64": ("rpe_attention_fwd",
                    lambda: tuple(t.double() for t in _attention()[:4]) + (
                        _attention()[4], 0.35, 0.0, None),
                    "patnet_cuda: q must be float32, float16 or bfloat16, got Double"),
    "rpe-int": ("rpe_attention_fwd",
                lambda: tuple(t.int() for t in _attention()) + (0.35, 0.0, None),
                "patnet_cuda: q must be float32, float16 or bfloat16, got Int"),
    "rpe-k_shape": ("rpe_attention_fwd",
                    lambda: _replace(_attention(), 1, _attention()[1][:, :, :5]) + (
                        0.35, 0.0, None),
                    "patnet_cuda: k must match q in shape and dtype"),
    "rpe-v_dtype": ("rpe_attention_fwd",
                    lambda: _replace(_attention(), 2, _attention()[2].half()) + (
                        0.35, 0.0, None),
                    "patnet_cuda: v must match q in shape and dtype"),
    "rpe-q_dims": ("rpe_attention_fwd",
                   lambda: _replace(_attention(), 0, _attention()[0][0]) + (0.35, 0.0, None),
                   "patnet_cuda: q must have 4 dimensions, got [2, 6, 8]"),
    "rpe-table_heads": ("rpe_attention_fwd",
                        lambda: _replace(_attention(), 3, _randn(3, 81)) + (0.35, 0.0, None),
                        "patnet_cuda: table must be (heads, num_buckets)"),
    "rpe-table_dims": ("rpe_attention_fwd",
                       lambda: _replace(_attention(), 3, _randn(2 * 81)) + (0.35, 0.0, None),
                       "patnet_cuda: table must have 2 dimensions, got [162]"),
    "rpe-bucket_shape": ("rpe_attention_fwd",
                         lambda: _replace(_attention(), 4, _attention()[4][:5]) + (
                             0.35, 0.0, None),
                         "patnet_cuda: bucket must be (N, N)"),
    "rpe-too_many_tokens": ("rpe_attention_fwd",
                            lambda: _bigger_than(limit_n=1024) + (0.35, 0.0, None),
                            "patnet_cuda: rpe_attention runs N <= 1024 tokens, got 1025; use "
                            "backend='triton'"),
    "rpe-head_dim": ("rpe_attention_fwd", lambda: _bigger_than(limit_d=256) + (0.35, 0.0, None),
                     "patnet_cuda: rpe_attention runs head dims <= 256, got 264; use "
                     "backend='torch'"),
    "rpe-dropout_p": ("rpe_attention_fwd", lambda: _attention() + (0.35, 1.0, _seed()),
                      "patnet_cuda: dropout_p must be in [0, 1)"),
    "rpe-no_seed": ("rpe_attention_fwd", lambda: _attention() + (0.35, 0.2, None),
                    "patnet_cuda: rpe_attention with dropout_p > 0 needs a seed"),
    "rpe-seed_range": ("rpe_attention_fwd", lambda: _attention() + (0.35, 0.2, _seed(5)),
                       "patnet_cuda: dropout seed must be in [2^32, 2^62), got 5"),
    "rpe-seed_dtype": ("rpe_attention_fwd",
                       lambda: _attention() + (0.35, 0.2, _seed(7, torch.int32)),
                       "patnet_cuda: the dropout seed must be an int64 CPU tensor of shape ()"),
    "rpe_bwd-grad_shape": ("rpe_attention_bwd",
                           lambda: _rpe_bwd(*_attention(), grad=_randn(1, 2, 6, 4)),
                           "patnet_cuda: grad_out must match q in shape and dtype"),
    "rpe_bwd-float64": ("rpe_attention_bwd",
                        lambda: _rpe_bwd(*(t.double() for t in _attention()[:4]),
                                         _attention()[4]),
                        "patnet_cuda: q must be float32, float16 or bfloat16, got Double"),
    "rpe_bwd-no_seed": ("rpe_attention_bwd", lambda: _rpe_bwd(*_attention(), p=0.2),
                        "patnet_cuda: rpe_attention with dropout_p > 0 needs a seed"),
    # PAT_sf: the mixer output
    "mixer-float64": ("self_mixer_output",
                      lambda: tuple(t.double() for t in _mixer()) + (None, False),
                      "patnet_cuda: x must be float32, float16 or bfloat16, got Double"),
    "mixer-conv_weight_shape": ("self_mixer_output",
                                lambda: _replace(_mixer(), 1, _randn(2, 2, 1, 1)) + (None, False),
                                "must be (C1, C1, 3, 3) with 1 <= C1 <= C = 8, got [2, 2, 1, 1]"),
    "mixer-tokens_dims": ("self_mixer_output",
                          lambda: _replace(_mixer(), 2, _mixer()[2][0]) + (None, False),
                          "patnet_cuda: tokens must have 3 dimensions, got [30, 6]"),
    "mixer-proj_weight_dims": ("self_mixer_output",
                               lambda: _replace(_mixer(), 3, _randn(36)) + (None, False),
                               "patnet_cuda: proj_weight must have 2 dimensions, got [36]"),
    "mixer_bwd-float64": ("self_mixer_output_backward",
                          lambda: (_conv()[0].double(),) + tuple(
                              t.double() for t in _mixer()[:4]) + (None,),
                          "patnet_cuda: grad_y must be float32, float16 or bfloat16, got Double"),
}

CHECKED.update({
    "rpe-bucket_float": ("rpe_attention_fwd",
                         lambda: _replace(_attention(), 4, _attention()[4].float()) + (
                             0.35, 0.0, None),
                         "patnet_cuda: bucket must be"),
    "mixer-tokens_shape": ("self_mixer_output",
                           lambda: _replace(_mixer(), 2, _mixer()[2][:, :-1]) + (None, False),
                           "patnet_cuda: tokens must be"),
    "mixer-proj_weight_shape": ("self_mixer_output",
                                lambda: _replace(_mixer(), 3, _randn(6, 5)) + (None, False),
                                "patnet_cuda: proj_weight must be"),
    "mixer-tokens_dtype": ("self_mixer_output",
                           lambda: _replace(_mixer(), 2, _mixer()[2].half()) + (None, False),
                           "patnet_cuda: tokens"),
    "mixer-keep_shape": ("self_mixer_output", lambda: _mixer() + (_randn(2, 30, 5), False),
                         "patnet_cuda: keep"),
})

# Refused since the first GPU run (each checked before anything is allocated or launched).
CHECKED.update({
    # a size the kernels' 32-bit sizes cannot hold (an expand()ed view: no memory behind it)
    "pconv-x_too_large": ("partial_conv3x3",
                          lambda: (_randn(1, 8, 5, 6).expand(1 << 31, 8, 5, 6), _conv()[1]),
                          "patnet_cuda: x has shape [2147483648, 8, 5, 6]; the kernels take at "
                          "most 2^31 - 1 elements along a dimension"),
    # the in-place op would write elements that share memory
    "pconv_-x_overlapping": ("partial_conv3x3_",
                             lambda: (_randn(1, 8, 5, 6).expand(2, 8, 5, 6), _conv()[1]),
                             "patnet_cuda: x has elements that share memory (an expand()ed "
                             "view?) and cannot be written in place"),
    "apply-coef_dims": ("channel_attention_apply", lambda: _conv() + (_coef(12), _coef(2, 6)),
                        "patnet_cuda: scale must have 2 dimensions, got [12]"),
    # C2 is read off mean: wider than C would have made C1 negative
    "grad_sums-mean_too_wide": ("channel_attention_grad_sums",
                                lambda: (_conv()[0], _randn(2, 8, 5, 6), _coef(2, 9)),
                                "patnet_cuda: mean must be (B, C2) with 1 <= C2 <= C = 8"),
    "grad_sums-mean_dims": ("channel_attention_grad_sums",
                            lambda: (_conv()[0], _randn(2, 8, 5, 6), _coef(12)),
                            "patnet_cuda: mean must have 2 dimensions, got [12]"),
    "grad_sums-mean_dtype": ("channel_attention_grad_sums",
                             lambda: (_conv()[0], _randn(2, 8, 5, 6), _coef(2, 6).double()),
                             "patnet_cuda: the per-(b, c) coefficient mean must be float32, got "
                             "Double"),
    "input_grad-offset_dtype": ("channel_attention_input_grad",
                                lambda: _conv()[:1] + _conv()
                                + (_coef(2, 6), _coef(2, 6), _coef(2, 6), _coef(2, 6).half()),
                                "patnet_cuda: the per-(b, c) coefficient offset must be float32"),
    "rpe-table_int": ("rpe_attention_fwd",
                      lambda: _replace(_attention(), 3, _attention()[3].long()) + (
                          0.35, 0.0, None),
                      "patnet_cuda: table must be a floating point tensor of biases, got Long"),
    "rpe-no_buckets": ("rpe_attention_fwd",
                       lambda: _replace(_attention(), 3, _randn(2, 0)) + (0.35, 0.0, None),
                       "patnet_cuda: table must be (heads, num_buckets) = (2, >= 1), got [2, 0]"),
    "rpe-head_dim_zero": ("rpe_attention_fwd",
                          lambda: tuple(_randn(1, 2, 6, 0) for _ in range(3))
                          + _attention()[3:] + (0.35, 0.0, None),
                          "patnet_cuda: q, k and v must have a head dim >= 1, got [1, 2, 6, 0]"),
    "rpe-dropout_nan": ("rpe_attention_fwd", lambda: _attention() + (0.35, float("nan"), _seed()),
                        "patnet_cuda: dropout_p must be in [0, 1)"),
    "rpe_bwd-lse_dtype": ("rpe_attention_bwd",
                          lambda: _replace(_rpe_bwd(*_attention()), 5,
                                           torch.zeros(1, 2, 6, device=DEVICE).half()),
                          "patnet_cuda: lse must be the forward's float32 (B, heads, N)"),
    "mixer-bias_shape": ("self_mixer_output",
                         lambda: _replace(_mixer(), 4, _randn(5)) + (None, False),
                         "patnet_cuda: proj_bias must be (C2,) = [6] (C2 = C - C1), got [5]"),
    "mixer_bwd-keep_dtype": ("self_mixer_output_backward",
                             lambda: (_conv()[0],) + _mixer()[:4]
                             + (_randn(2, 30, 6, dtype=F16),),
                             "patnet_cuda: keep is Half but x is Float"),
})


@pytest.mark.parametrize("case", list(CHECKED))
def test_op_refuses_bad_input(ops, case):
    op, make_args, message = CHECKED[case]
    with pytest.raises(RuntimeError) as info:
        getattr(ops, op)(*make_args())
    assert message in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="a wrong-device argument needs a CUDA device (CPU tensors are the "
                           "emulation's own device)")
def test_op_refuses_a_cpu_argument_with_cuda_input(ops):
    x, weight = _conv()
    with pytest.raises(RuntimeError, match="patnet_cuda: weight must be a CUDA tensor, got one "
                                           "on cpu"):
        ops.partial_conv3x3(x, weight.cpu())
    q, k, v, table, bucket = _attention()
    with pytest.raises(RuntimeError, match="patnet_cuda: bucket must be a CUDA tensor"):
        ops.rpe_attention_fwd(q, k, v, table, bucket.cpu(), 0.35, 0.0, None)
    with pytest.raises(RuntimeError, match="patnet_cuda: shift must be a CUDA tensor"):
        ops.channel_attention_apply(x, weight, _coef(2, 6), _coef(2, 6).cpu())
    with pytest.raises(RuntimeError, match="patnet_cuda: mean must be a CUDA tensor"):
        ops.channel_attention_grad_sums(x, x, _coef(2, 6).cpu())
    with pytest.raises(RuntimeError, match="patnet_cuda: keep must be a CUDA tensor"):
        ops.self_mixer_output(*_mixer(), _randn(2, 30, 6).cpu(), False)
    with pytest.raises(RuntimeError, match="patnet_cuda: x must be a CUDA tensor"):
        ops.channel_attention_stats(x.cpu(), 2)


# Every case of CHECKED in a child process, which must survive them all: on the first GPU run
# (gpu-reports/h200-2026-12-04) bad input to these ops killed the pytest worker instead of
# raising, 13 times, with nothing to say why. A crash here fails this one test with the child's
# stderr (faulthandler's stack, or C++'s "terminate called after ...") and the case it died in.
_SURVIVE_CHECKED = textwrap.dedent("""
    import faulthandler, sys
    faulthandler.enable()
    sys.path.insert(0, sys.argv[1])
    import test_cuda_backend as t
    ops = t.fused_ops("cuda")
    for case, (op, make_args, message) in t.CHECKED.items():
        print("case", case, flush=True)
        try:
            getattr(ops, op)(*make_args())
        except RuntimeError as exc:
            print("raised" if message in str(exc) else "wrong message", flush=True)
        else:
            print("did not raise", flush=True)
    print("all cases done", flush=True)
""")


def test_bad_input_never_kills_the_process(ops):
    proc = subprocess.run([sys.executable, "-c", _SURVIVE_CHECKED, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=900)
    cases = [line[len("case "):] for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert proc.returncode == 0 and "all cases done" in proc.stdout, (
        f"the process died (exit status {proc.returncode}) in case "
        f"{cases[-1] if cases else '(none: before the first)'}; its stderr:\n"
        f"{proc.stderr[-6000:]}")
    outcomes = proc.stdout.splitlines()
    wrong = [f"{line[len('case '):]}: {outcome}" for line, outcome in zip(outcomes, outcomes[1:])
             if line.startswith("case ") and outcome != "raised"]
    assert not wrong, wrong


# ------------------------------------------------------------------ spatial_attention
def _spatial_inputs():
    m = _randn(2, 10, 3, 4)
    bn_c = BatchNormParams(_randn(5), _randn(5), _randn(5), _randn(5).abs() + 0.5, 0.1, 1e-5)
    return (m, _randn(1, 5, 1, 1), _randn(5, 5, 1, 1), None, bn_c, None)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_spatial_attention_has_no_cuda_kernel(ops, training):
    """backend="cuda" for PAT_sp says which backend to use, and nothing is computed or written
    (the running statistics stay as they were)."""
    args = _spatial_inputs()
    before = [t.clone() for t in args[4][2:4]]
    with pytest.raises(pk.BackendUnavailableError,
                       match=r"backend='cuda' has no kernel for spatial_attention; use "
                             r"backend='triton' or 'auto'"):
        pk.spatial_attention(*args, training=training, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(before, args[4][2:4]))
