"""Bad input to the functional API raises a clear error, before anything is computed or written.

Each case checks the exception type, a meaningful fragment of its message, and (where the op
could write something: the in-place PConv, the BatchNorm running statistics of a train-mode
call) that nothing changed.
"""
from __future__ import annotations

import re
from typing import Optional

import os

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BackendUnavailableError, BatchNormParams, registry

from conftest import DEVICE, FUSED_BACKENDS, require_fused_backend

F64 = torch.float64
META = torch.device("meta")


# --------------------------------------------------------------------------------------------
# Inputs (valid unless a test breaks one)
# --------------------------------------------------------------------------------------------
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_bn(c: int, seed: int = 0, dtype=F64) -> BatchNormParams:
    g = gen(seed)
    return BatchNormParams(1 + 0.1 * torch.randn(c, generator=g, dtype=dtype),
                           0.1 * torch.randn(c, generator=g, dtype=dtype),
                           0.1 * torch.randn(c, generator=g, dtype=dtype),
                           0.5 + torch.rand(c, generator=g, dtype=dtype))


def snapshot(*bns: Optional[BatchNormParams]):
    return [None if bn is None else (bn.running_mean.clone(), bn.running_var.clone())
            for bn in bns]


def assert_unchanged(before, *bns: Optional[BatchNormParams]) -> None:
    for snap, bn in zip(before, bns):
        if bn is None:
            continue
        assert torch.equal(bn.running_mean, snap[0]), "running_mean changed by a failed call"
        assert torch.equal(bn.running_var, snap[1]), "running_var changed by a failed call"


# partial conv: C = 10, C1 = 2
def pconv_args(dtype=F64):
    g = gen(1)
    return (torch.randn(2, 10, 5, 6, generator=g, dtype=dtype),
            torch.randn(2, 2, 3, 3, generator=g, dtype=dtype))


# channel attention: C = 13, C1 = 3, C2 = 10
def ca_args():
    g = gen(2)
    return dict(x=torch.randn(3, 13, 4, 5, generator=g, dtype=F64),
                conv_weight=torch.randn(3, 3, 3, 3, generator=g, dtype=F64),
                cfc_weight=torch.randn(10, 10, 1, 2, generator=g, dtype=F64),
                cfc_bias=None, bn_a=make_bn(10, 3), bn_b=make_bn(10, 4))


def call_ca(a, training=False, backend="torch"):
    return pk.channel_attention(a["x"], a["conv_weight"], a["cfc_weight"], a["cfc_bias"],
                                a["bn_a"], a["bn_b"], training=training, backend=backend)


# spatial attention: C = 13, P = 6, Q = 7
def sa_args():
    g = gen(5)
    return dict(m=torch.randn(3, 13, 4, 5, generator=g, dtype=F64),
                gate_weight=torch.randn(1, 7, 1, 1, generator=g, dtype=F64),
                conv_weight=torch.randn(6, 6, 1, 1, generator=g, dtype=F64),
                conv_bias=torch.randn(6, generator=g, dtype=F64),
                bn_c=make_bn(7, 6), bn_d=make_bn(6, 7))


def call_sa(a, training=False, backend="torch"):
    return pk.spatial_attention(a["m"], a["gate_weight"], a["conv_weight"], a["conv_bias"],
                                a["bn_c"], a["bn_d"], training=training,
                                residual=a.get("residual"), backend=backend)


# rpe attention: B = 2, heads = 4, 3 x 4 map (N = 12), d = 5
def rpe_args():
    g = gen(8)
    q, k, v = (torch.randn(2, 4, 12, 5, generator=g, dtype=F64) for _ in range(3))
    return dict(q=q, k=k, v=v, table=torch.randn(4, 81, generator=g, dtype=F64),
                bucket=pk.rpe_buckets(3, 4))


def call_rpe(a, **kw):
    kw.setdefault("backend", "torch")
    return pk.rpe_attention(a["q"], a["k"], a["v"], a["table"], a["bucket"], **kw)


def test_valid_inputs_run():
    """The baseline inputs that every error case breaks in one place are valid."""
    x, w = pconv_args()
    assert pk.partial_conv3x3(x, w, backend="torch").shape == x.shape
    a = ca_args()
    assert torch.isfinite(call_ca(a)).all() and torch.isfinite(call_ca(a, training=True)).all()
    s = sa_args()
    assert torch.isfinite(call_sa(s)).all() and torch.isfinite(call_sa(s, training=True)).all()
    r = rpe_args()
    assert call_rpe(r).shape == r["q"].shape


# --------------------------------------------------------------------------------------------
# partial_conv3x3
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(10, 5, 6), (2, 10, 5, 6, 1), (10,)])
def test_pconv_not_4d(shape):
    _, w = pconv_args()
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got a \d-D tensor"):
        pk.partial_conv3x3(torch.zeros(shape, dtype=F64), w)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("weight_shape,match", [
    ((11, 11, 3, 3), r"weight covers C1=11 channels .*channel split needs"),
    ((0, 0, 3, 3), r"weight covers C1=0 channels .*channel split needs"),
    ((2, 3, 3, 3), r"weight must be \(C1, C1, 3, 3\), got \(2, 3, 3, 3\)"),
    ((2, 2, 5, 5), r"weight must be \(C1, C1, 3, 3\), got \(2, 2, 5, 5\)"),
    ((2, 2, 3, 1), r"weight must be \(C1, C1, 3, 3\)"),
    ((2, 2, 3), r"weight must be \(C1, C1, 3, 3\)"),
], ids=["C1>C", "C1=0", "non_square", "kernel5", "kernel3x1", "3d"])
def test_pconv_bad_weight_changes_nothing(weight_shape, match, inplace):
    x, _ = pconv_args()
    before = x.clone()
    with pytest.raises(ValueError, match=match):
        pk.partial_conv3x3(x, torch.zeros(weight_shape, dtype=F64), inplace=inplace)
    assert torch.equal(x, before)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_pconv_dtype_mismatch(inplace):
    x, w = pconv_args()
    before = x.clone()
    with pytest.raises(TypeError, match=r"weight is torch.float32 but x is torch.float64"):
        pk.partial_conv3x3(x, w.float(), inplace=inplace)
    assert torch.equal(x, before)


def test_pconv_device_mismatch():
    x, w = pconv_args()
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu.*device"):
        pk.partial_conv3x3(x, w.to(META))
    with pytest.raises(ValueError, match=r"device"):
        pk.partial_conv3x3(x.to(META), w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_pconv_integer_input(dtype):
    x, w = pconv_args()
    with pytest.raises(TypeError, match=r"x must be floating point.*got torch\."):
        pk.partial_conv3x3(x.to(dtype), w)


def test_pconv_not_a_tensor():
    _, w = pconv_args()
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        pk.partial_conv3x3([[1.0]], w)


# --------------------------------------------------------------------------------------------
# channel_attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv_shape,match", [
    ((13, 13, 3, 3), r"conv_weight covers C1=13 channels .*channel split needs"),  # no X2 left
    ((3, 2, 3, 3), r"conv_weight must be \(C1, C1, 3, 3\)"),
    ((3, 3, 1, 1), r"conv_weight must be \(C1, C1, 3, 3\)"),
], ids=["C1=C", "non_square", "kernel1"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_ca_bad_conv_weight(conv_shape, match, training):
    a = ca_args()
    a["conv_weight"] = torch.zeros(conv_shape, dtype=F64)
    before = snapshot(a["bn_a"], a["bn_b"])
    with pytest.raises(ValueError, match=match):
        call_ca(a, training=training)
    assert_unchanged(before, a["bn_a"], a["bn_b"])


@pytest.mark.parametrize("cfc_shape", [(10, 10, 2, 1), (13, 13, 1, 2), (10, 10, 1, 1),
                                       (10, 1, 1, 2)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_ca_bad_cfc_weight_changes_nothing(cfc_shape, training):
    a = ca_args()
    a["cfc_weight"] = torch.zeros(cfc_shape, dtype=F64)
    before = snapshot(a["bn_a"], a["bn_b"])
    with pytest.raises(ValueError,
                       match=r"cfc_weight must have shape \(10, 10, 1, 2\) \(C2 = C - C1 = 10\)"):
        call_ca(a, training=training)
    assert_unchanged(before, a["bn_a"], a["bn_b"])


def test_ca_bad_cfc_bias():
    a = ca_args()
    a["cfc_bias"] = torch.zeros(13, dtype=F64)
    with pytest.raises(ValueError, match=r"cfc_bias must have shape \(10,\)"):
        call_ca(a)


@pytest.mark.parametrize("x_dtype, cfc_dtype, bias_dtype, error", [
    (torch.bfloat16, torch.float16, None, r"cfc_weight is torch.float16 but x is torch.bfloat16"),
    (F64, torch.float32, None, r"cfc_weight is torch.float32 but x is torch.float64"),
    (torch.float16, torch.float32, torch.float16,
     r"cfc_bias is torch.float16 but cfc_weight is torch.float32"),
    (torch.bfloat16, torch.float32, torch.float32, None),  # (the gate in float32)
])
def test_ca_cfc_dtype(x_dtype, cfc_dtype, bias_dtype, error):
    """W_ch and its bias: x's dtype, or float32 beside half x (as autocast leaves them)."""
    a = ca_args()
    a["x"], a["conv_weight"] = a["x"].to(x_dtype), a["conv_weight"].to(x_dtype)
    a["cfc_weight"] = a["cfc_weight"].to(cfc_dtype)
    if bias_dtype is not None:
        a["cfc_bias"] = torch.zeros(10, dtype=bias_dtype)
    a["bn_a"], a["bn_b"] = make_bn(10, 3, torch.float32), make_bn(10, 4, torch.float32)
    if error is None:
        assert call_ca(a).dtype == x_dtype
        return
    with pytest.raises(TypeError, match=error):
        call_ca(a)


def test_ca_missing_or_wrong_bn():
    a = ca_args()
    a["bn_b"] = None
    with pytest.raises(ValueError, match=r"bn_b is required"):
        call_ca(a)
    a = ca_args()
    a["bn_a"] = torch.nn.BatchNorm2d(10).double()
    with pytest.raises(TypeError, match=r"bn_a must be a patnet_kernels.BatchNormParams"):
        call_ca(a)


@pytest.mark.parametrize("name", ["conv_weight", "cfc_weight"])
def test_ca_dtype_mismatch(name):
    a = ca_args()
    a[name] = a[name].float()
    with pytest.raises(TypeError, match=rf"{name} is torch.float32 but x is torch.float64"):
        call_ca(a, training=True)


@pytest.mark.parametrize("name", ["conv_weight", "cfc_weight", "bn_a", "bn_b"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_ca_device_mismatch_changes_nothing(name, training):
    a = ca_args()
    if name.startswith("bn"):
        a[name] = a[name]._replace(weight=a[name].weight.to(META))
    else:
        a[name] = a[name].to(META)
    keep = {k: a[k] for k in ("bn_a", "bn_b") if k != name}
    before = snapshot(*keep.values())
    with pytest.raises(ValueError, match=r"is on meta but .* is on cpu; move them to one device"):
        call_ca(a, training=training)
    assert_unchanged(before, *keep.values())


def test_ca_train_batch_of_one_changes_nothing():
    """Train-mode BN_a normalises a 1x1 map over the batch: a batch of 1 cannot work."""
    a = ca_args()
    a["x"] = a["x"][:1]
    before = snapshot(a["bn_a"], a["bn_b"])
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        call_ca(a, training=True)
    assert_unchanged(before, a["bn_a"], a["bn_b"])


# --------------------------------------------------------------------------------------------
# spatial_attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv_shape,match", [
    ((13, 13, 1, 1), r"conv_weight covers P=13 channels .*channel split needs P >= 1"),  # no Ma
    ((6, 5, 1, 1), r"conv_weight must be \(P, P, 1, 1\)"),
    ((6, 6, 3, 3), r"conv_weight must be \(P, P, 1, 1\)"),
], ids=["P=C", "non_square", "kernel3"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sa_bad_conv_weight_changes_nothing(conv_shape, match, training):
    a = sa_args()
    a["conv_weight"] = torch.zeros(conv_shape, dtype=F64)
    before = snapshot(a["bn_c"], a["bn_d"])
    with pytest.raises(ValueError, match=match):
        call_sa(a, training=training)
    assert_unchanged(before, a["bn_c"], a["bn_d"])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sa_bad_gate_and_bias_change_nothing(training):
    a = sa_args()
    a["gate_weight"] = torch.zeros(1, 6, 1, 1, dtype=F64)
    before = snapshot(a["bn_c"], a["bn_d"])
    with pytest.raises(ValueError, match=r"gate_weight must have shape \(1, 7, 1, 1\) "
                                         r"\(Q = C - P = 7\)"):
        call_sa(a, training=training)
    a = sa_args()
    a["conv_bias"] = torch.zeros(7, dtype=F64)
    with pytest.raises(ValueError, match=r"conv_bias must have shape \(6,\)"):
        call_sa(a, training=training)
    assert_unchanged(before, a["bn_c"], a["bn_d"])


@pytest.mark.parametrize("residual,error,match", [
    (torch.zeros(3, 13, 4, 4, dtype=F64), ValueError,
     r"residual must have shape \(3, 13, 4, 5\) \(m's shape\), got \(3, 13, 4, 4\)"),
    (torch.zeros(3, 13, 4, 5), TypeError, r"residual is torch.float32 but m is torch.float64"),
    (torch.zeros(3, 13, 20, dtype=F64), ValueError, r"residual must be \(B, C, H, W\)"),
], ids=["shape", "dtype", "dims"])
def test_sa_bad_residual(residual, error, match):
    a = sa_args()
    a["residual"] = residual
    with pytest.raises(error, match=match):
        call_sa(a)


@pytest.mark.parametrize("statistics_of", [13, -1, True, 2.0])
def test_sa_bad_statistics_of(statistics_of):
    a = sa_args()
    with pytest.raises(ValueError, match=r"statistics_of must be the next PAT_ch block's C1 "
                                         r"\(the first channel of the statistics\), an int in "
                                         r"\[0, 13\)"):
        pk.spatial_attention(a["m"], a["gate_weight"], a["conv_weight"], a["conv_bias"],
                             a["bn_c"], a["bn_d"], statistics_of=statistics_of)


@pytest.mark.parametrize("name", ["gate_weight", "conv_weight", "conv_bias", "residual"])
def test_sa_dtype_and_device_mismatch(name):
    a = sa_args()
    a["residual"] = a["m"].flip(0)
    a[name] = a[name].float()
    with pytest.raises(TypeError, match=rf"{name} is torch.float32 but m is torch.float64"):
        call_sa(a)
    a = sa_args()
    a["residual"] = a["m"].flip(0)
    a[name] = a[name].to(META)
    with pytest.raises(ValueError, match=rf"{name} is on meta but m is on cpu"):
        call_sa(a)


# --------------------------------------------------------------------------------------------
# batch_norm_act
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,error,match", [
    (dict(activation="silu"), ValueError, r"activation must be one of relu, gelu, got 'silu'"),
    (dict(bn=make_bn(5)), ValueError, r"bn\.weight must have shape \(6,\)"),
    (dict(x=torch.zeros(2, 6, 3)), ValueError, r"x must be \(B, C, H, W\)"),
    (dict(x=torch.zeros(2, 6, 3, 3)), TypeError,
     r"bn.weight is torch.float64 but the input is torch.float32"),
], ids=["activation", "bn_channels", "dims", "dtype"])
def test_bn_act_bad_arguments_change_nothing(change, error, match):
    args = dict(x=torch.randn(2, 6, 3, 3, dtype=F64), bn=make_bn(6), activation="relu")
    args.update(change)
    before = snapshot(args["bn"])
    with pytest.raises(error, match=match):
        pk.batch_norm_act(args["x"], args["bn"], args["activation"], training=True)
    assert_unchanged(before, args["bn"])


# --------------------------------------------------------------------------------------------
# checks shared by channel_attention and spatial_attention (the two ops that carry BatchNorms)
# --------------------------------------------------------------------------------------------
BN_OPS = {
    "channel_attention": dict(args=ca_args, call=call_ca, input="x", bns=("bn_a", "bn_b")),
    "spatial_attention": dict(args=sa_args, call=call_sa, input="m", bns=("bn_c", "bn_d")),
}
BN_CASES = [(op, bn) for op, spec in BN_OPS.items() for bn in spec["bns"]]


@pytest.mark.parametrize("op", list(BN_OPS))
def test_bn_op_not_4d(op):
    spec = BN_OPS[op]
    a = spec["args"]()
    a[spec["input"]] = a[spec["input"]][0]
    with pytest.raises(ValueError, match=rf"{spec['input']} must be \(B, C, H, W\), got a 3-D"):
        spec["call"](a)


@pytest.mark.parametrize("op", list(BN_OPS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_bn_op_integer_input(op, dtype):
    spec = BN_OPS[op]
    a = spec["args"]()
    a[spec["input"]] = a[spec["input"]].to(dtype)
    with pytest.raises(TypeError, match=rf"{spec['input']} must be floating point"):
        spec["call"](a)


@pytest.mark.parametrize("op,which", BN_CASES)
@pytest.mark.parametrize("field", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batch_norm_wrong_channel_count_changes_nothing(op, which, field, training):
    spec = BN_OPS[op]
    a = spec["args"]()
    c = a[which].weight.shape[0]
    a[which] = a[which]._replace(**{field: torch.ones(13, dtype=F64)})
    others = [a[k] for k in spec["bns"] if k != which]
    before = snapshot(*others)
    with pytest.raises(ValueError, match=rf"{which}\.{field} must have shape \({c},\) "
                                         rf"\(one value per channel of {c}\)"):
        spec["call"](a, training=training)
    assert_unchanged(before, *others)


@pytest.mark.parametrize("op,which", BN_CASES)
def test_eval_without_running_stats(op, which):
    spec = BN_OPS[op]
    a = spec["args"]()
    a[which] = a[which]._replace(running_mean=None, running_var=None)
    with pytest.raises(ValueError, match=rf"{which} has no running statistics.*training=True"):
        spec["call"](a, training=False)
    out = spec["call"](a, training=True)  # fine in training mode
    assert out.shape == a[spec["input"]].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("op,which", BN_CASES)
def test_batch_norm_dtype_mismatch_changes_nothing(op, which):
    """A BatchNormParams of another dtype is a dtype mismatch like any other (TypeError, before
    anything runs): no running statistics may be updated by the failed train-mode call."""
    spec = BN_OPS[op]
    a = spec["args"]()
    a[which] = make_bn(a[which].weight.shape[0], 9, dtype=torch.float32)
    bns = [a[k] for k in spec["bns"]]
    before = snapshot(*bns)
    with pytest.raises(TypeError, match=r"float32.*float64|float64.*float32"):
        spec["call"](a, training=True)
    assert_unchanged(before, *bns)


# --------------------------------------------------------------------------------------------
# rpe_attention
# --------------------------------------------------------------------------------------------
def test_rpe_not_4d():
    a = rpe_args()
    a["q"] = a["q"][0]
    with pytest.raises(ValueError, match=r"q must be \(B, heads, N, d\), got a 3-D tensor"):
        call_rpe(a)


@pytest.mark.parametrize("name", ["k", "v"])
def test_rpe_kv_shape_mismatch(name):
    a = rpe_args()
    a[name] = a[name][..., :4]
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 4, 12, 5\) "
                                         rf"\({name} must match q\), got \(2, 4, 12, 4\)"):
        call_rpe(a)


@pytest.mark.parametrize("table_shape", [(3, 81), (81,), (4, 81, 1)])
def test_rpe_table_heads_mismatch(table_shape):
    a = rpe_args()
    a["table"] = torch.zeros(table_shape, dtype=F64)
    with pytest.raises(ValueError, match=r"table must be \(heads, num_buckets\) = \(4, "):
        call_rpe(a)


@pytest.mark.parametrize("bucket_shape", [(12, 11), (11, 11), (12,), (1, 12, 12)])
def test_rpe_bucket_wrong_shape(bucket_shape):
    a = rpe_args()
    a["bucket"] = torch.full(bucket_shape, 40, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bucket must have shape \(12, 12\) \(N x N for the "
                                         r"N = 12 tokens of q\)"):
        call_rpe(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_rpe_bucket_not_integer(dtype):
    a = rpe_args()
    a["bucket"] = a["bucket"].to(dtype)
    with pytest.raises(TypeError, match=r"bucket must be an int64 or int32 tensor of ids"):
        call_rpe(a)


def test_rpe_bucket_not_a_tensor():
    a = rpe_args()
    a["bucket"] = a["bucket"].tolist()
    with pytest.raises(TypeError, match=r"bucket must be an int64 or int32 tensor"):
        call_rpe(a)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8],
                         ids=["int32", "int16", "int8", "uint8"])
def test_rpe_bucket_other_integer_dtypes(dtype):
    """int32 ids give the int64 result; narrower integer ids (the authors' maps are int16) are
    refused up front with a TypeError naming bucket and what to pass, not an IndexError from
    deep inside a backend."""
    a = rpe_args()
    expected = call_rpe(a)
    a["bucket"] = a["bucket"].to(dtype)
    if dtype == torch.int32:
        torch.testing.assert_close(call_rpe(a), expected, rtol=0, atol=0)
        return
    with pytest.raises(TypeError, match=r"bucket must be an int64 or int32 tensor"):
        call_rpe(a)


@pytest.mark.parametrize("q_dtype, table_dtype, error", [
    (torch.float16, torch.bfloat16, r"table is torch.bfloat16 but q is torch.float16"),
    (torch.float32, F64, r"table is torch.float64 but q is torch.float32"),
    (torch.bfloat16, torch.float32, None),  # (the bias added in float32)
])
def test_rpe_table_dtype(q_dtype, table_dtype, error):
    """The table: q's dtype, or float32 beside half q (as autocast leaves it)."""
    a = rpe_args()
    q, k, v = (a[name].to(q_dtype) for name in "qkv")
    table = a["table"].to(table_dtype)
    if error is None:
        assert pk.rpe_attention(q, k, v, table, a["bucket"], backend="torch").dtype == q_dtype
        return
    with pytest.raises(TypeError, match=error):
        pk.rpe_attention(q, k, v, table, a["bucket"], backend="torch")


def test_rpe_table_too_small_for_map():
    g = gen(11)
    q = torch.randn(1, 4, 196, 8, generator=g, dtype=F64)
    bucket = pk.rpe_buckets(14, 14)
    assert int(bucket.max()) == 58
    with pytest.raises(ValueError, match=r"bucket ids span \[40, 58\] but the table has only "
                                         r"45 buckets per head; this map needs a table of at "
                                         r"least 59"):
        pk.rpe_attention(q, q, q, torch.zeros(4, 45, dtype=F64), bucket)
    # an uncached map (not from rpe_buckets) is checked just the same
    with pytest.raises(ValueError, match=r"at least 59"):
        pk.rpe_attention(q, q, q, torch.zeros(4, 45, dtype=F64), bucket.clone())
    # 59 buckets are enough
    assert pk.rpe_attention(q, q, q, torch.zeros(4, 59, dtype=F64), bucket).shape == q.shape


def test_rpe_negative_ids():
    a = rpe_args()
    bucket = a["bucket"].clone()
    bucket[3, 5] = -1
    a["bucket"] = bucket
    with pytest.raises(ValueError, match=r"bucket ids span \[-1, "):
        call_rpe(a)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_rpe_bad_dropout(p):
    a = rpe_args()
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        call_rpe(a, dropout_p=p)


@pytest.mark.parametrize("name", ["k", "v", "table"])
def test_rpe_dtype_mismatch(name):
    a = rpe_args()
    a[name] = a[name].float()
    with pytest.raises(TypeError, match=rf"{name} is torch.float32 but q is torch.float64"):
        call_rpe(a)


@pytest.mark.parametrize("name", ["k", "v", "table", "bucket"])
def test_rpe_device_mismatch(name):
    a = rpe_args()
    a[name] = a[name].to(META)
    with pytest.raises(ValueError, match=rf"{name} is on meta but q is on cpu.*device"):
        call_rpe(a)


def test_rpe_integer_input():
    a = rpe_args()
    with pytest.raises(TypeError, match=r"q must be floating point"):
        pk.rpe_attention(a["q"].long(), a["k"], a["v"], a["table"], a["bucket"])


# --------------------------------------------------------------------------------------------
# rpe_buckets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,bad", [(0, 3, "height"), (3, 0, "width"), (-1, 3, "height"),
                                     (2.5, 3, "height"), (3, 2.0, "width"), (True, 3, "height"),
                                     ("3", 3, "height"), (None, 3, "height")])
def test_rpe_buckets_bad_size(h, w, bad):
    value = h if bad == "height" else w
    pattern = rf"{bad} must be a positive int, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=pattern):
        pk.rpe_buckets(h, w)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
def _calls():
    x, w = pconv_args()
    mlp = _mlp_weights(x.shape[1])
    return {
        "partial_conv3x3": lambda backend: pk.partial_conv3x3(x, w, backend=backend),
        "partial_conv3x3_inplace": lambda backend: pk.partial_conv3x3(x, w, inplace=True,
                                                                      backend=backend),
        "channel_attention": lambda backend: call_ca(ca_args(), backend=backend),
        "spatial_attention": lambda backend: call_sa(sa_args(), backend=backend),
        "rpe_attention": lambda backend: call_rpe(rpe_args(), backend=backend),
        "pointwise_mlp": lambda backend: pk.pointwise_mlp(x, *mlp, residual=x, backend=backend),
        "partial_block": lambda backend: pk.partial_block(x, w, *mlp, backend=backend),
        "batch_norm_act": lambda backend: pk.batch_norm_act(x, make_bn(x.shape[1], 3),
                                                            backend=backend),
    }, x


def _mlp_weights(c: int):
    """(w1, b1, w2) of a C -> 2C -> C MLP, float64 like pconv_args."""
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2 * c, c, 1, 1, generator=gen, dtype=F64) / c ** 0.5,
            torch.randn(2 * c, generator=gen, dtype=F64),
            torch.randn(c, 2 * c, 1, 1, generator=gen, dtype=F64) / (2 * c) ** 0.5)


OPS = ["partial_conv3x3", "partial_conv3x3_inplace", "channel_attention", "spatial_attention",
       "rpe_attention", "pointwise_mlp", "partial_block", "batch_norm_act"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["nope", "Torch", "", "gpu"])
def test_unknown_backend(op, name):
    calls, x = _calls()
    before = x.clone()
    with pytest.raises(ValueError, match=rf"unknown backend {name!r}; choose one of "
                                         r"auto, torch, triton, cuda"):
        calls[op](name)
    assert torch.equal(x, before)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name,why", [("cuda", r"CUDA tensors.*PATNET_CUDA_EMULATE=1")])
def test_unavailable_backend(op, name, why, monkeypatch):
    """No CUDA kernel takes CPU tensors (outside the CPU emulation, which conftest turns on and
    this test turns off): named explicitly, the backend is refused with the reason and the way
    out; nothing falls back silently and nothing is written. (Triton takes CPU tensors under
    its interpreter; tests/test_triton_backend.py covers its refusals.)"""
    monkeypatch.setenv("PATNET_CUDA_EMULATE", "0")
    calls, x = _calls()
    before = x.clone()
    with pytest.raises(BackendUnavailableError,
                       match=rf"backend='{name}' is unavailable: .*{why}"):
        calls[op](name)
    assert torch.equal(x, before)
    assert issubclass(BackendUnavailableError, RuntimeError)


@pytest.mark.parametrize("op", OPS)
def test_auto_and_torch_backends_agree_on_cpu(op):
    calls, _ = _calls()
    torch.testing.assert_close(calls[op]("auto"), calls[op]("torch"), rtol=0, atol=0)


def test_resolve_backend():
    assert pk.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert pk.resolve_backend("torch") == "torch"
    assert pk.BACKENDS == ("auto", "torch", "triton", "cuda")
    with pytest.raises(ValueError, match=r"choose one of auto, torch, triton, cuda"):
        pk.resolve_backend("tpu")


def test_info():
    info = pk.info()
    assert info["torch"] == torch.__version__
    backends = info["backends"]
    assert set(backends) >= {"torch", "triton", "cuda"}
    assert backends["torch"]["available"] is True
    for name in ("triton", "cuda"):
        entry = backends[name]
        assert isinstance(entry["available"], bool)
        assert isinstance(entry["reason"], str) and entry["reason"].strip(), name
    assert backends["torch"]["reason"].strip()
    assert info["auto"]["cpu"] == "torch"
    if not torch.cuda.is_available():
        assert info["cuda_device"] is None
        assert set(info["auto"]) == {"cpu"}
        # (on CPU tensors the CUDA backend is its emulation, which conftest turns on)
        emulated = os.environ.get("PATNET_CUDA_EMULATE", "0") not in ("", "0")
        assert backends["cuda"]["available"] is emulated
        assert "PATNET_CUDA_EMULATE" in backends["cuda"]["reason"]
        assert backends["triton"]["available"] is (os.environ.get("TRITON_INTERPRET") == "1")


# --------------------------------------------------------------------------------------------
# Arguments of the wrong kind: None or a list for a tensor, a string or a tensor for a flag,
# empty dimensions, BatchNorm settings out of range (each found by a read of the API)
# --------------------------------------------------------------------------------------------
def _mlp_args(c=8, hidden=16):
    g = gen(9)
    return (torch.randn(2, c, 4, 4, generator=g, dtype=torch.float32),
            torch.randn(hidden, c, 1, 1, generator=g), torch.randn(hidden, generator=g),
            torch.randn(c, hidden, 1, 1, generator=g))


@pytest.mark.parametrize("case", ["weight None", "weight list", "table None", "tokens None",
                                  "bias list", "bn field list"])
def test_not_a_tensor_is_a_type_error(case):
    x, w = pconv_args()
    a, c = rpe_args(), ca_args()
    calls = {
        "weight None": lambda: pk.partial_conv3x3(x, None),
        "weight list": lambda: pk.partial_conv3x3(x, [[1.0]]),
        "table None": lambda: call_rpe(dict(a, table=None)),
        "tokens None": lambda: pk.self_mixer_output(x, w, None, torch.zeros(8, 8, dtype=F64)),
        "bias list": lambda: pk.patch_conv(x, torch.zeros(4, 10, 2, 2, dtype=F64), [0.0] * 4),
        "bn field list": lambda: call_ca(dict(c, bn_b=c["bn_b"]._replace(weight=[1.0] * 10))),
    }
    name = {"weight None": "weight", "weight list": "weight", "table None": "table",
            "tokens None": "tokens", "bias list": "bias", "bn field list": "bn_b.weight"}[case]
    with pytest.raises(TypeError, match=rf"{re.escape(name)} must be a torch.Tensor, got"):
        calls[case]()


@pytest.mark.parametrize("backend", ("torch",) + FUSED_BACKENDS)
def test_empty_dimensions_are_refused_but_the_batch(backend):
    """A map with no channels or no pixels, or an MLP with no hidden or output channels, is
    refused alike on every backend (they used to disagree or crash); an empty batch runs
    through each op the backend has."""
    if backend != "torch":
        require_fused_backend(backend)
    x, w = (t.to(DEVICE) for t in pconv_args(torch.float32))
    for bad in (x[:, :, :0], x[:, :, :, :0]):
        with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) with no empty dimension "
                                             r"but the batch"):
            pk.partial_conv3x3(bad, w, backend=backend)
    assert pk.partial_conv3x3(x[:0], w, backend=backend).shape == (0, 10, 5, 6)
    x, w1, b1, w2 = (t.to(DEVICE) for t in _mlp_args())
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"no empty dimension"):
            pk.patch_conv(x, torch.zeros(0, 8, 2, 2, device=DEVICE), backend=backend)
        with pytest.raises(ValueError, match=r"w1 and w2 must have at least one output"):
            pk.pointwise_mlp(x, w1[:0], None, w2[:, :0], backend=backend)
        # an empty batch through the ops that reshape per sample (the reference's did not)
        bn = BatchNormParams(*(t.to(DEVICE) for t in (torch.ones(6), torch.zeros(6),
                                                      torch.zeros(6), torch.ones(6))))
        conv = torch.zeros(2, 2, 3, 3, device=DEVICE)
        cfc = torch.zeros(6, 6, 1, 2, device=DEVICE)
        calls = {
            "channel_attention": lambda: pk.channel_attention(x[:0], conv, cfc, None, None, bn,
                                                              backend=backend),
            "partial_block": lambda: pk.partial_block(x[:0], conv, w1, b1, w2, cfc_weight=cfc,
                                                      bn_b=bn, backend=backend),
            "self_mixer_output": lambda: pk.self_mixer_output(
                x[:0], conv, torch.zeros(0, 16, 6, device=DEVICE),
                torch.zeros(6, 6, device=DEVICE), backend=backend),
        }
        for op, call in calls.items():
            if backend in ("torch",) + registry.OPS[op].backends:
                assert call().shape == (0, 8, 4, 4), op


@pytest.mark.parametrize("flag", ["inplace", "training", "residual", "return_statistics",
                                  "eval_form"])
def test_flags_must_be_bools(flag):
    """A string or a tensor for a flag is refused (its truth would have been taken: "no" is
    true)."""
    x, w = pconv_args()
    c = ca_args()
    calls = {
        "inplace": lambda: pk.partial_conv3x3(x, w, inplace="no"),
        "training": lambda: call_ca(c, training="no"),
        "residual": lambda: pk.self_mixer_output(
            x, w, torch.zeros(2, 30, 8, dtype=F64), torch.zeros(8, 8, dtype=F64),
            residual=torch.ones(())),
        "return_statistics": lambda: pk.partial_block(
            torch.zeros(2, 8, 4, 4), torch.zeros(2, 2, 3, 3), *_mlp_args()[1:],
            return_statistics="no"),
        "eval_form": lambda: pk.channel_attention(
            c["x"], c["conv_weight"], c["cfc_weight"], c["cfc_bias"], c["bn_a"], c["bn_b"],
            backend="torch", eval_form="yes"),
    }
    before = snapshot(c["bn_a"], c["bn_b"])
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got"):
        calls[flag]()
    assert_unchanged(before, c["bn_a"], c["bn_b"])


def test_every_eval_form_flag_must_be_a_bool():
    """Each op with a CPU eval form takes ``eval_form`` and refuses a non-bool for it."""
    x, w = pconv_args()
    c = ca_args()
    image = torch.randn(1, 3, 8, 8, dtype=F64)
    calls = {
        "partial_conv3x3": lambda flag: pk.partial_conv3x3(x, w, eval_form=flag),
        "channel_attention": lambda flag: pk.channel_attention(
            c["x"], c["conv_weight"], c["cfc_weight"], c["cfc_bias"], c["bn_a"], c["bn_b"],
            eval_form=flag),
        "rpe_attention": lambda flag: pk.rpe_attention(**rpe_args(), eval_form=flag),
        "self_mixer_output": lambda flag: pk.self_mixer_output(
            x, w, torch.zeros(2, 30, 8, dtype=F64), torch.zeros(8, 8, dtype=F64),
            eval_form=flag),
        "pointwise_mlp": lambda flag: pk.pointwise_mlp(*_mlp_args(), eval_form=flag),
        "patch_conv": lambda flag: pk.patch_conv(image, torch.zeros(4, 3, 4, 4, dtype=F64),
                                                 eval_form=flag),
        "layer_norm_linear": lambda flag: pk.layer_norm_linear(
            x, torch.zeros(6, 10, dtype=F64), eval_form=flag),
    }
    assert sorted(calls) == sorted(op for op, declared in registry.OPS.items()
                                   if declared.eval_form)
    for op, call in calls.items():
        with pytest.raises(TypeError, match=r"eval_form must be True or False, got 'yes'"):
            call("yes")
        assert isinstance(call(True), (torch.Tensor, tuple)), op


def test_inplace_on_an_expanded_view_is_refused():
    x, w = pconv_args()
    expanded = x[:1].expand(3, -1, -1, -1)
    with pytest.raises(ValueError, match=r"x is an expanded view .* pass x.contiguous\(\)"):
        pk.partial_conv3x3(expanded, w, inplace=True)
    assert pk.partial_conv3x3(expanded, w).shape == expanded.shape  # (out of place: fine)


@pytest.mark.parametrize("change,error,match", [
    (dict(eps=-1.0), ValueError, r"bn_b.eps must be a finite number >= 0, got -1.0"),
    (dict(eps=float("inf")), ValueError, r"bn_b.eps must be a finite number >= 0"),
    (dict(eps="x"), ValueError, r"bn_b.eps must be a finite number >= 0, got 'x'"),
    (dict(momentum=None), ValueError, r"bn_b.momentum must be a number in \[0, 1\], got None"),
    (dict(momentum=1.5), ValueError, r"bn_b.momentum must be a number in \[0, 1\]"),
])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batch_norm_settings(change, error, match, training):
    """A BatchNorm's eps and momentum out of range, or its tensors in two dtypes, are refused
    (the Triton kernels returned NaN for eps < 0 where F.batch_norm raised)."""
    c = ca_args()
    c["bn_b"] = c["bn_b"]._replace(**change)
    before = snapshot(c["bn_a"], c["bn_b"])
    with pytest.raises(error, match=match):
        call_ca(c, training=training)
    assert_unchanged(before, c["bn_a"], c["bn_b"])
    # a half input's BatchNorm in float32 or its dtype, each field alike
    x = torch.randn(2, 10, 3, 3).half()
    bn = make_bn(10, dtype=torch.float32)
    pk.batch_norm_act(x, bn, training=training)
    with pytest.raises(TypeError, match=r"bn's tensors mix dtypes \(torch.float16, "
                                        r"torch.float32\); cast them to one"):
        pk.batch_norm_act(x, bn._replace(running_mean=bn.running_mean.half()),
                          training=training)


def test_rpe_scale_and_dropout_are_numbers():
    a = rpe_args()
    for scale in ("a", float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"scale must be a finite number >= 0, got"):
            call_rpe(a, scale=scale)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\), got None"):
        call_rpe(a, dropout_p=None)


def test_inference_ops_refuse_a_gradient_through_batch_norm_weights():
    """A fused inference op has no backward: a BatchNorm weight requiring a gradient (PAT_ch's
    gate, PAT_sp's) is refused as x and the conv weights are (the reference takes it)."""
    x, w1, b1, w2 = _mlp_args()
    conv = torch.zeros(2, 2, 3, 3)
    cfc = torch.zeros(6, 6, 1, 2)
    bn = BatchNormParams(torch.ones(6, requires_grad=True), torch.zeros(6), torch.zeros(6),
                         torch.ones(6))
    with pytest.raises(ValueError, match=r"runs partial_block for inference only"):
        pk.partial_block(x, conv, w1, b1, w2, cfc_weight=cfc, bn_b=bn, backend="triton")
    y = pk.partial_block(x, conv, w1, b1, w2, cfc_weight=cfc, bn_b=bn, backend="torch")
    assert y.requires_grad
