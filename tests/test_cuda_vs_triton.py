"""The CUDA and Triton backends agree: the same inputs through both, output and every gradient
(and PAT_ch's running statistics), in fp32 / fp16 / bf16, NCHW and channels_last (for
rpe_attention: contiguous q, k, v and the strided views PAT_sf makes), within the dtype's
tolerance. With dropout and the same torch seed, both draw the same mask (the CUDA kernels
reproduce Triton's Philox stream; PAT_sf's output mask is drawn by the functional API).

Each backend is checked against the float64 reference by tests/test_fused_*.py; this checks
them against each other, which catches a difference the reference budget would let through (a
mask, a layout, a NaN pattern). The inputs and runners are those tests' own.
"""
from __future__ import annotations

import functools

import pytest
import torch

import patnet_kernels as pk

import test_fused_channel_attention as chan
import test_fused_partial_conv as pconv
import test_fused_rpe_attention as rpe
import test_fused_self_mixer as mixer
from conftest import FUSED_BACKENDS, rel_error, require_fused_backend

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
# ||cuda - triton|| / ||triton||: both accumulate in fp32 and round once to the dtype, in
# different orders (a few units of the dtype's rounding).
TOLERANCE = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
LAYOUTS = {"nchw": False, "nhwc": True}

# H * W = 1: the interpreter's numpy warns on the (intended) 0 / 0 of the unbiased std.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def both_backends():
    for backend in FUSED_BACKENDS:
        require_fused_backend(backend)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def assert_agree(names, cuda, triton, dtype):
    """Each pair: same dtype, shape and strides, NaNs in the same places, close elsewhere. A
    tensor that is exactly 0 on one backend (an attention over one key has no dQ, dK, dtable)
    may be rounding noise on the other: it is measured against the largest of the group."""
    assert len(cuda) == len(triton) == len(names)
    largest = max(t.double().nan_to_num().norm().item() for t in triton if t is not None)
    for name, c, t in zip(names, cuda, triton):
        assert (c is None) == (t is None), name
        if t is None:
            continue
        assert c.dtype == t.dtype == dtype, (name, c.dtype, t.dtype)
        assert c.shape == t.shape, (name, c.shape, t.shape)
        assert c.stride() == t.stride(), (name, c.stride(), t.stride())
        nan = t.isnan()
        assert torch.equal(c.isnan(), nan), f"{name}: NaNs differ"
        c, t = c.masked_fill(nan, 0), t.masked_fill(nan, 0)
        error = rel_error(c, t, floor=0.0 if t.any() and c.any() else largest)
        assert error <= TOLERANCE[dtype], (f"{name}: CUDA and Triton differ by {error:.3g} "
                                           f"(tolerance {TOLERANCE[dtype]:.1g} in {dtype})")


def _both(run):
    """run(backend) for CUDA and Triton, each from the same torch seed."""
    results = []
    for backend in ("cuda", "triton"):
        torch.manual_seed(1234)
        results.append(run(backend))
    return results


# ------------------------------------------------------------------------------ PConv
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(2, 20, 5, 7, 13), (1, 8, 2, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_partial_conv3x3(shape, dtype, layout, inplace):
    x, weight, grad = pconv._inputs(shape, dtype, LAYOUTS[layout], seed=21)
    cuda, triton = _both(lambda backend: pconv._run(x, weight, grad, backend, inplace))
    assert_agree(("y", "grad_x", "grad_weight"), cuda, triton, dtype)


# ------------------------------------------------------------------------------ PAT_ch
CHANNEL_CASES = [chan.Case(3, 22, 5, 7, 9, dtype, channels_last, training, bn_a=bn_a)
                 for dtype in DTYPES for channels_last in (False, True)
                 for training, bn_a in ((True, True), (False, False))]
# H * W = 1: the NaN half (unbiased std of one value) in the same places.
CHANNEL_CASES += [chan.Case(2, 12, 3, 1, 1, F32, True, False)]


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=str)
def test_channel_attention(case):
    inputs = chan._inputs(case, seed=22)
    cuda, triton = _both(lambda backend: chan._run(inputs, case, case.dtype, backend))
    assert cuda.keys() == triton.keys()
    names = sorted(triton)
    assert_agree(names, [cuda[n] for n in names], [triton[n] for n in names], case.dtype)


# ------------------------------------------------------------------------------ rpe_attention
def _rpe(backend, **kw):
    return functools.partial(pk.rpe_attention, backend=backend, **kw)


# (batch, height, width, head dim, dtype, q, k, v as views of one qkv tensor): every dtype and
# layout at N = 49 (one key block); N = 130 (several key blocks: the interpreter's slowest) and
# N = 1 (no gradient but dV) in two of them each.
RPE_CASES = [(2, 7, 7, 48, dtype, qkv) for dtype in DTYPES for qkv in (False, True)]
RPE_CASES += [(1, 10, 13, 72, F32, False), (1, 10, 13, 72, F16, True),
              (3, 1, 1, 64, BF16, False), (3, 1, 1, 64, F32, True)]


def _rpe_id(case):
    batch, height, width, d, dtype, qkv_layout = case
    return (f"B{batch}-{height}x{width}-d{d}-{_dtype_id(dtype)}-"
            f"{'qkv_views' if qkv_layout else 'contiguous'}")


@pytest.mark.parametrize("batch, height, width, d, dtype, qkv_layout", RPE_CASES,
                         ids=[_rpe_id(c) for c in RPE_CASES])
def test_rpe_attention(batch, height, width, d, dtype, qkv_layout):
    args = rpe._inputs(batch, 4, height, width, d, dtype, seed=23, qkv_layout=qkv_layout)
    cuda, triton = _both(lambda backend: rpe._run(_rpe(backend), *args))
    assert_agree(rpe.GRADS, cuda, triton, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_rpe_attention_dropout_draws_the_same_mask(dtype):
    """Same torch seed: same kernel seed, same Philox mask, so the same output and gradients;
    another seed changes them (the mask is really applied)."""
    args = rpe._inputs(2, 4, 7, 7, 48, dtype, seed=24, qkv_layout=True)
    cuda, triton = _both(lambda backend: rpe._run(_rpe(backend, dropout_p=0.3), *args))
    assert_agree(rpe.GRADS, cuda, triton, dtype)
    torch.manual_seed(4321)
    other = rpe._run(_rpe("cuda", dropout_p=0.3), *args)
    assert rel_error(other[0], cuda[0]) > 10 * TOLERANCE[dtype]


# ------------------------------------------------------------------------------ PAT_sf output
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_self_mixer_output(dtype, layout, dropout_p):
    inputs = mixer._inputs(2, 20, 5, 7, 9, dtype, LAYOUTS[layout], seed=25)
    cuda, triton = _both(lambda backend: mixer._run(inputs, backend, dropout_p=dropout_p))
    assert_agree(mixer.NAMES, cuda, triton, dtype)
