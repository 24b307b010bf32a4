"""PAT_sf's LayerNorm + qkv projection for inference (layer_norm_linear) on each fused backend that
has it (Triton: the patch conv's kernel with k = 1 and its LayerNorm prologue): against the
float64 reference in every dtype and layout, with and without bias, PAT_sf's 7 x 7 map read as a
channel slice of a wider one (its X2), input widths that are not a multiple of 16 or 64 and one
wider than a channel step, outputs of two and three channel blocks, several samples in
channels_last (tiled as rows of one sample: tiles spanning two samples, the last one partial)
and one pixel per sample; the output's shape, layout and dtype; the variance of inputs whose
mean is far larger than their spread (two passes, no cancellation); eps honoured; the input
read in its own dtype (float32 tokens into half weights, half tokens into float32 weights, and
under autocast); strided inputs, weights and biases; the gradient
refusal; bad input; float64 refused; opcheck. (The models' inference path running it:
tests/test_inference.py; under autocast: tests/test_fused_amp.py.)"""
from __future__ import annotations

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import registry

from conftest import (BUDGET_FACTOR, BUDGET_FLOOR, DEVICE, TRITON_ONLY, assert_within_budget,
                      backends_of, fused_ops, rel_error)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = registry.OPS["layer_norm_linear"].backends
ON_ITS_BACKENDS = backends_of("layer_norm_linear")

SHAPES = {  # (B, C1, C_IN, C_OUT, H, W): x = x_full[:, C1:], x_full (B, C1 + C_IN, H, W)
    # PAT_sf-like: X2 of a wider map, 3 x 49 = 147 tokens (a tile spans two samples in
    # channels_last, the last tile partial), C_OUT = 144 in two output-channel blocks
    "sf 3x(8+20)-144 7x7": (3, 8, 20, 144, 7, 7),
    "1x72-40 5x3": (1, 0, 72, 40, 5, 3),                  # C_IN 72: not a multiple of 64
    "2x(16+144)-48 3x5": (2, 16, 144, 48, 3, 5),          # C_IN > 128: several channel steps
    "3x(4+24)-260 1x1": (3, 4, 24, 260, 1, 1),            # one token per sample, 3 blocks
}


def _inputs(b, c1, c_in, c_out, h, w, dtype, channels_last=False, seed=0, x_dtype=None):
    """[x, weight, bias] on DEVICE: x = x_full[:, c1:] in ``x_dtype`` (default ``dtype``), each
    token with its own mean and spread, the weight (C_OUT, C_IN) and bias in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c1 + c_in, h, w, generator=gen, dtype=torch.float64)
    x = x * (0.5 + torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)) \
        + torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, generator=gen, dtype=torch.float64) * c_in ** -0.5
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.3
    x = x.to(DEVICE, x_dtype or dtype)
    if channels_last:  # (NHWC strides for 1 x 1 maps too, which .contiguous() leaves NCHW)
        x = torch.empty_like(x.permute(0, 2, 3, 1), memory_format=torch.contiguous_format
                             ).copy_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return [x[:, c1:], weight.to(DEVICE, dtype), bias.to(DEVICE, dtype)]


def _call(inputs, backend, bias=True, **kwargs):
    x, weight, b = inputs
    with torch.no_grad():
        return pk.layer_norm_linear(x, weight, b if bias else None, backend=backend, **kwargs)


def _exact(inputs, bias=True, **kwargs):
    """The float64 reference."""
    return _call([v.double() for v in inputs], "torch", bias, **kwargs)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_float64_reference(shape, channels_last, dtype, fused_backend):
    inputs = _inputs(*shape, dtype, channels_last)
    b, _, _, c_out, h, w = shape
    for bias in (True, False):
        ours = _call(inputs, fused_backend, bias)
        assert ours.shape == (b, h * w, c_out) and ours.dtype == dtype and ours.is_contiguous()
        assert_within_budget(f"y (bias={bias})", ours, _exact(inputs, bias),
                             _call(inputs, "torch", bias), dtype)


@TRITON_ONLY
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_the_shapes_above_take_both_tilings(shape, fused_backend):
    """(What the tests above cover) the launcher tiles channels_last samples as rows of one
    sample where B > 1 (a tile then spans samples), NCHW samples each on their own."""
    from patnet_kernels.triton._common import samples_as_rows

    b, _, _, c_out, h, w = shape
    y = torch.empty(b, h * w, c_out, device=DEVICE).view(b, h, w, c_out).permute(0, 3, 1, 2)
    for channels_last in (False, True):
        x = _inputs(*shape, torch.float32, channels_last)[0]
        assert samples_as_rows(x, y) == (channels_last and b > 1)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_mean_far_larger_than_the_spread(channels_last, dtype, fused_backend):
    """Tokens offset by 100 x a per-token constant (|mean| ~ 100 x std): the variance taken
    about the mean (two passes), not as E[x^2] - mean^2, which in float32 loses ~1e-3 of it
    here (checked: such a one-pass variance is out of the float32 budget)."""
    x, weight, bias = _inputs(3, 4, 40, 48, 5, 6, dtype, channels_last)
    offset = 100 * torch.randn(3, 1, 5, 6, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64).abs().add(1)
    x = (x.double() + offset.to(DEVICE)).to(dtype)  # (the same layout as x's)
    inputs = [x, weight, bias]
    ours, exact, in_dtype = _call(inputs, fused_backend), _exact(inputs), _call(inputs, "torch")
    assert_within_budget("y", ours, exact, in_dtype, dtype)
    if dtype == torch.float32:  # (the test tells the two apart)
        tokens = x.flatten(2).transpose(1, 2).float()
        mean = tokens.mean(-1, keepdim=True)
        one_pass = (tokens * tokens).mean(-1, keepdim=True) - mean * mean
        naive = torch.nn.functional.linear((tokens - mean) * (one_pass + 1e-5).rsqrt(),
                                           weight, bias)
        budget = BUDGET_FACTOR * rel_error(in_dtype, exact) + BUDGET_FLOOR[dtype]
        assert rel_error(naive, exact) > budget


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
# (eps = 0: the interpreter's rsqrt(0) on the masked rows past the last token, not stored)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_eps_is_honoured(channels_last, fused_backend):
    """Tokens of spread ~0.05 (variance ~ eps = 1e-2): eps = 1e-2 and 1e-6 give results 10s of
    percent apart, each the reference's with that eps; no eps is eps = 1e-5."""
    x, weight, bias = _inputs(2, 0, 24, 32, 4, 5, torch.float32, channels_last)
    inputs = [x * 0.05, weight, bias]
    results = {}
    for eps in (1e-2, 1e-6, 0):
        results[eps] = ours = _call(inputs, fused_backend, eps=eps)
        assert_within_budget(f"y (eps={eps})", ours, _exact(inputs, eps=eps),
                             _call(inputs, "torch", eps=eps), torch.float32)
    assert rel_error(results[1e-2], results[1e-6]) > 0.05
    assert torch.equal(_call(inputs, fused_backend), _call(inputs, fused_backend, eps=1e-5))


@ON_ITS_BACKENDS
@pytest.mark.parametrize("x_dtype,dtype", [(torch.float32, torch.float16),
                                           (torch.float32, torch.bfloat16),
                                           (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_reads_its_input_as_it_is(channels_last, x_dtype, dtype, fused_backend):
    """Tokens in another float dtype than the weight: normalised in float32 from the values as
    they are, then converted to the weight's dtype (the output's), as the reference does; and
    under autocast the functional API casts the weight and bias, not x."""
    x, weight, bias = _inputs(3, 8, 20, 144, 7, 7, dtype, channels_last, x_dtype=x_dtype)
    assert x.dtype == x_dtype
    ours = _call([x, weight, bias], fused_backend)
    assert ours.dtype == dtype and ours.is_contiguous()
    assert_within_budget("y", ours, _exact([x, weight, bias]), _call([x, weight, bias], "torch"),
                         dtype)
    device_type = torch.device(DEVICE).type
    autocast_dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype):
        cast = pk.layer_norm_linear(x, weight.float(), bias.float(), backend=fused_backend)
    assert cast.dtype == autocast_dtype
    w, b = weight.to(autocast_dtype), bias.to(autocast_dtype)
    assert_within_budget("y (autocast)", cast, _exact([x, w, b]), _call([x, w, b], "torch"),
                         autocast_dtype)


@ON_ITS_BACKENDS
def test_strided_inputs(fused_backend):
    """x as an H x W-transposed layout, a channel slice of one and of an NCHW map with one
    channel per sample left (the samples then tiled as rows of one; each token normalised
    to 0: y = bias); a weight stored transposed ([in, out])."""
    x, weight, bias = _inputs(2, 0, 24, 40, 6, 5, torch.float32)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    for view in (transposed, transposed[:, 3:19], x[:, 5:6]):
        w = weight[:, :view.shape[1]]
        for layout in (w.contiguous(), w.t().contiguous().t()):
            ours = _call([view, layout, bias], fused_backend)
            assert ours.is_contiguous() and ours.shape == (2, 30, 40)
            assert rel_error(ours, _exact([view, w, bias])) < 1e-6


@ON_ITS_BACKENDS
def test_a_strided_bias(fused_backend):
    """A bias that is a view with stride 2 (every other value of a longer vector)."""
    x, weight, bias = _inputs(2, 0, 24, 40, 6, 5, torch.float32)
    strided = torch.stack([bias, -bias], 1)[:, 0]
    assert strided.stride() == (2,) and torch.equal(strided, bias)
    assert rel_error(_call([x, weight, strided], fused_backend), _exact([x, weight, bias])) < 1e-6


@ON_ITS_BACKENDS
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_a_gradient_is_refused_by_name_and_taken_by_auto(which, fused_backend):
    inputs = _inputs(2, 0, 8, 16, 4, 4, torch.float32)
    index = ["x", "weight", "bias"].index(which)
    inputs[index] = inputs[index].detach().requires_grad_()
    with pytest.raises(ValueError, match=r"for inference only .* torch.no_grad\(\)"):
        pk.layer_norm_linear(*inputs, backend=fused_backend)
    y = pk.layer_norm_linear(*inputs, backend="auto")  # the reference
    y.sum().backward()
    grad = inputs[index].grad
    assert grad is not None and torch.isfinite(grad).all()


def _bad(name):
    x, weight, bias = _inputs(2, 0, 8, 16, 4, 4, torch.float32)
    calls = {
        "weight in": ((x, weight[:, :4], bias), {}, ValueError,
                      r"weight must be \(C_OUT, C_IN\) with C_IN = 8"),
        "weight 4-D": ((x, weight[:, :, None, None], bias), {}, ValueError,
                       r"weight must be \(C_OUT, C_IN\) with C_IN = 8"),
        "bias": ((x, weight, bias[:3]), {}, ValueError, r"bias must have shape \(16,\)"),
        "bias 2-D": ((x, weight, bias[None]), {}, ValueError, r"bias must have shape \(16,\)"),
        "bias dtype": ((x, weight, bias.half()), {}, TypeError,
                       r"bias is torch.float16 but weight is torch.float32"),
        "x 3-D": ((x[0], weight, bias), {}, ValueError, r"x must be \(B, C, H, W\)"),
        "integer x": ((x.long(), weight, bias), {}, TypeError, r"x must be floating point"),
        "integer weight": ((x, weight.long(), None), {}, TypeError,
                           r"weight must be floating point"),
        "float64 weight": ((x, weight.double(), None), {}, TypeError,
                           r"weight is torch.float64 but x is torch.float32"),
        "eps negative": ((x, weight, bias), dict(eps=-1e-5), ValueError,
                         r"eps must be a finite number >= 0, got -1e-05"),
        "eps nan": ((x, weight, bias), dict(eps=float("nan")), ValueError,
                    r"eps must be a finite number >= 0, got nan"),
        "eps str": ((x, weight, bias), dict(eps="1e-5"), ValueError,
                    r"eps must be a finite number >= 0, got '1e-5'"),
        "eps bool": ((x, weight, bias), dict(eps=True), ValueError,
                     r"eps must be a finite number >= 0, got True"),
        "x elsewhere": ((x.to("meta"), weight, bias), {}, ValueError,
                        r"x is on meta but weight is on"),
        "bias elsewhere": ((x, weight, bias.to("meta")), {}, ValueError,
                           r"bias is on meta but weight is on"),
    }
    return calls[name]


@pytest.mark.parametrize("case", ["weight in", "weight 4-D", "bias", "bias 2-D", "bias dtype",
                                  "x 3-D", "integer x", "integer weight", "float64 weight",
                                  "eps negative", "eps nan", "eps str", "eps bool",
                                  "x elsewhere", "bias elsewhere"])
@pytest.mark.parametrize("backend", ("torch",) + BACKENDS)
def test_bad_input_is_refused_before_any_kernel(case, backend):
    args, kwargs, error, message = _bad(case)
    with torch.no_grad(), pytest.raises(error, match=message):
        pk.layer_norm_linear(*args, backend=backend, **kwargs)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("weight_dtype", (torch.float64, torch.float32), ids=str)
def test_float64_is_refused_by_the_fused_backends(weight_dtype, fused_backend):
    """A float64 x, into float64 weights or (read as it is) into float32 ones."""
    x, weight, bias = _inputs(1, 0, 8, 16, 2, 2, weight_dtype, x_dtype=torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match=r"runs float32, float16 and bfloat16"):
        pk.layer_norm_linear(x, weight, bias, backend=fused_backend)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_opcheck(bias, channels_last, fused_backend):
    x, weight, b = _inputs(2, 4, 8, 16, 3, 5, torch.float32, channels_last)
    torch.library.opcheck(fused_ops(fused_backend).layer_norm_linear.default,
                          (x, weight, b if bias else None, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_normalises_half_tokens_in_their_dtype(dtype):
    """The reference normalises tokens already in the weight's float16 / bfloat16 with
    ``layer_norm`` in that dtype (float32 inside, rounded once): no cast of the tokens to
    float32 and one back (two kernels a call, 8 a PATNet-T2 forward in a half model, that the
    authors' LayerNorm does not launch), and no less exact than through float32."""
    import torch.nn.functional as F

    from benchmarks.traffic import TrafficRecorder

    inputs = _inputs(*SHAPES["sf 3x(8+20)-144 7x7"], dtype)
    recorder = TrafficRecorder()
    with recorder:
        y = _call(inputs, "torch")
    assert not [op.name for op in recorder.ops if op.short_name == "_to_copy"]
    x, weight, bias = inputs
    normed = F.layer_norm(x.flatten(2).transpose(1, 2).float(), (x.shape[1],), eps=1e-5)
    through_float32 = F.linear(normed.to(dtype), weight, bias)
    exact = _exact(inputs)
    assert rel_error(y, exact) <= 1.1 * rel_error(through_float32, exact)
