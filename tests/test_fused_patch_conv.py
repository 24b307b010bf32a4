"""The stem and the merging layers for inference (patch_conv) on each fused backend that has it
(Triton): against the float64 reference in every dtype and layout, with and without bias, the
stem's 4 x 4 patches from 3 channels and the merging layers' 2 x 2, odd sizes (the last row and
column dropped), wide outputs; the output in the layout asked (an NCHW image into
channels_last); the input read in its own dtype (a float32 image with half
weights, as under autocast, with no cast pass); its output statistics as partial_block takes
them; strided inputs; the gradient refusal; bad input; opcheck. (The models' inference path
running it: tests/test_inference.py and tests/test_fused_partial_block.py.)"""
from __future__ import annotations

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import registry
from patnet_kernels.reference.channel_attention import output_statistics

from conftest import (DEVICE, assert_same_arithmetic, assert_within_budget, backends_of,
                      fused_ops, merged_statistics, rel_error)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = registry.OPS["patch_conv"].backends
ON_ITS_BACKENDS = backends_of("patch_conv")

SHAPES = {  # (B, C_IN, C_OUT, k, H, W)
    "stem 2x3-32 k4 16x20": (2, 3, 32, 4, 16, 20),
    "merge 2x8-16 k2 6x10": (2, 8, 16, 2, 6, 10),
    "merge 1x40-80 k2 7x9": (1, 40, 80, 2, 7, 9),      # odd H, W: last row, column dropped
    "merge 1x96-192 k2 2x2": (1, 96, 192, 2, 2, 2),    # one output pixel, two channel blocks
    "stem 1x3-20 k4 13x4": (1, 3, 20, 4, 13, 4),       # W // k = 1
}


def _inputs(b, c_in, c_out, k, h, w, dtype, channels_last=False, seed=0, x_dtype=None):
    """[x, weight, bias] on DEVICE: x in ``x_dtype`` (default ``dtype``), the rest in
    ``dtype`` (unit-gain weights)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) * (
        c_in * k * k) ** -0.5
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.3
    x = x.to(DEVICE, x_dtype or dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype)]


def _call(inputs, backend, bias=True, statistics_of=None):
    x, weight, b = inputs
    with torch.no_grad():
        return pk.patch_conv(x, weight, b if bias else None, statistics_of=statistics_of,
                             backend=backend)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_float64_reference(shape, channels_last, dtype, fused_backend):
    inputs = _inputs(*shape, dtype, channels_last)
    for bias in (True, False):
        ours = _call(inputs, fused_backend, bias)
        exact = _call([v.double() for v in inputs], "torch", bias)
        in_dtype = _call(inputs, "torch", bias)
        assert ours.dtype == dtype
        assert_within_budget(f"y (bias={bias})", ours, exact, in_dtype, dtype)
        assert ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("statistics_of", [None, 8], ids=["plain", "statistics"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_writes_the_layout_asked_whatever_x_has(channels_last, statistics_of, fused_backend):
    """channels_last=True / False: y in that layout from an x in the other (the inference
    copy's stem: an NCHW image in, channels_last out), the same values and statistics as
    when y takes x's layout (the reference's statistics to float32 rounding)."""
    inputs = _inputs(2, 3, 32, 4, 16, 20, torch.float16, channels_last=not channels_last)
    x, weight, bias = inputs
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for backend in (fused_backend, "torch"):
        with torch.no_grad():
            ours = pk.patch_conv(x, weight, bias, statistics_of=statistics_of,
                                 channels_last=channels_last, backend=backend)
        own = _call(inputs, backend, statistics_of=statistics_of)
        y, y_own = (ours, own) if statistics_of is None else (ours[0], own[0])
        assert y.is_contiguous(memory_format=layout) and not y_own.is_contiguous(
            memory_format=layout), backend
        assert_same_arithmetic(y, y_own, backend)
        if statistics_of is not None:  # (torch's reductions' order follows the layout)
            for a, b in zip(ours[1], own[1]):
                if backend == "torch":
                    assert torch.allclose(a, b, rtol=1e-6, atol=0), backend
                else:
                    assert_same_arithmetic(a, b, backend)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_reads_a_float32_input_as_it_is(dtype, fused_backend):
    """A float32 image with weights in half precision (the stem under autocast): converted in
    the kernel, the output in the weight's dtype, as the reference's x.to(weight.dtype); and
    under autocast the functional API casts the weights, not the input."""
    inputs = _inputs(2, 3, 32, 4, 8, 12, dtype, x_dtype=torch.float32)
    ours = _call(inputs, fused_backend)
    assert ours.dtype == dtype
    x, weight, bias = inputs
    converted = _call([x.to(dtype), weight, bias], "torch")
    exact = _call([x.to(dtype).double(), weight.double(), bias.double()], "torch")
    assert_within_budget("y", ours, exact, converted, dtype)
    device_type = torch.device(DEVICE).type
    autocast_dtype = torch.bfloat16 if device_type == "cpu" else dtype
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype):
        cast = pk.patch_conv(x, weight.float(), bias.float(), backend=fused_backend)
    assert cast.dtype == autocast_dtype


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_are_those_partial_block_takes(channels_last, fused_backend):
    """With statistics_of = C1: (y, (mean, m2)) of y[:, C1:] per chunk of a power-of-two
    number of pixels, which merge to the reference's one-chunk statistics; a PAT_ch block
    given them computes what it computes from its own input."""
    inputs = _inputs(2, 8, 16, 2, 18, 22, torch.float32, channels_last)  # 99 output pixels
    y, (mean, m2) = _call(inputs, fused_backend, statistics_of=4)
    assert_same_arithmetic(y, _call(inputs, fused_backend))
    b, chunks, c2 = mean.shape
    assert (b, c2) == (2, 12) and m2.shape == mean.shape
    merged_mean, merged_m2 = merged_statistics(mean, m2, y.shape[2] * y.shape[3])
    ref_mean, ref_m2 = output_statistics(y.double(), 4)
    assert rel_error(merged_mean, ref_mean[:, 0]) < 1e-6
    assert rel_error(merged_m2, ref_m2[:, 0]) < 1e-6
    _, reference_statistics = _call(inputs, "torch", statistics_of=4)
    assert all(torch.allclose(a, r, rtol=1e-5, atol=1e-6)
               for a, r in zip(reference_statistics, output_statistics(y, 4)))


@ON_ITS_BACKENDS
def test_strided_inputs(fused_backend):
    """A channel slice of a channels_last tensor and an H x W-transposed layout as x, a
    weight in any layout (the inference copy stores it [ky, kx, in, out])."""
    from patnet_kernels.triton.partial_conv import tap_major

    x, weight, bias = _inputs(2, 24, 16, 2, 6, 8, torch.float32, channels_last=True)
    for view in (x[:, 4:20], x.transpose(2, 3).contiguous().transpose(2, 3)[:, :16]):
        w = weight[:, :view.shape[1]]
        for layout in (w.contiguous(), tap_major(w)):
            ours = _call([view, layout, bias], fused_backend)
            exact = _call([view.double(), w.double(), bias.double()], "torch")
            assert rel_error(ours, exact) < 1e-6


@ON_ITS_BACKENDS
def test_a_gradient_is_refused_by_name_and_taken_by_auto(fused_backend):
    x, weight, bias = _inputs(2, 8, 16, 2, 4, 4, torch.float32)
    weight.requires_grad_()
    with pytest.raises(ValueError, match=r"for inference only .* torch.no_grad\(\)"):
        pk.patch_conv(x, weight, bias, backend=fused_backend)
    y = pk.patch_conv(x, weight, bias, backend="auto")  # the reference
    y.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def _bad(name):
    x, weight, bias = _inputs(2, 8, 16, 2, 4, 4, torch.float32)
    calls = {
        "weight in": ((x, weight[:, :4], bias), {}, ValueError,
                      r"weight must be \(C_OUT, C_IN, k, k\) with C_IN = 8"),
        "weight not square": ((x, weight[..., :1], bias), {}, ValueError,
                              r"weight must be \(C_OUT, C_IN, k, k\)"),
        "bias": ((x, weight, bias[:3]), {}, ValueError, r"bias must have shape \(16,\)"),
        "bias dtype": ((x, weight, bias.double()), {}, TypeError, r"bias is torch.float64"),
        "x 3-D": ((x[0], weight, bias), {}, ValueError, r"x must be \(B, C, H, W\)"),
        "too small": ((x[:, :, :1], weight, bias), {}, ValueError,
                      r"smaller than the 2 x 2 patch"),
        "statistics_of": ((x, weight, bias), dict(statistics_of=16), ValueError,
                          r"statistics_of must be the next PAT_ch block's C1"),
        "statistics_of bool": ((x, weight, bias), dict(statistics_of=True), ValueError,
                               r"statistics_of must be the next PAT_ch block's C1"),
        "channels_last": ((x, weight, bias), dict(channels_last="nhwc"), ValueError,
                          r"channels_last must be True \(write y channels_last\), False"),
        "integer weight": ((x, weight.long(), None), {}, TypeError,
                           r"weight must be floating point"),
        "float64 weight": ((x, weight.double(), None), {}, TypeError,
                           r"weight is torch.float64 but x is torch.float32"),
    }
    return calls[name]


@pytest.mark.parametrize("case", ["weight in", "weight not square", "bias", "bias dtype",
                                  "x 3-D", "too small", "statistics_of", "statistics_of bool",
                                  "channels_last",
                                  "integer weight",
                                  "float64 weight"])
@pytest.mark.parametrize("backend", ("torch",) + BACKENDS)
def test_bad_input_is_refused_before_any_kernel(case, backend):
    args, kwargs, error, message = _bad(case)
    with torch.no_grad(), pytest.raises(error, match=message):
        pk.patch_conv(*args, backend=backend, **kwargs)


@ON_ITS_BACKENDS
def test_float64_is_refused_by_the_fused_backends(fused_backend):
    x, weight, bias = (v.double() for v in _inputs(1, 8, 16, 2, 2, 2, torch.float32))
    with torch.no_grad(), pytest.raises(TypeError, match=r"runs float32, float16 and bfloat16"):
        pk.patch_conv(x, weight, bias, backend=fused_backend)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("y_channels_last", [False, True], ids=["y-nchw", "y-nhwc"])
@pytest.mark.parametrize("stats_first", [-1, 4], ids=["plain", "statistics"])
def test_opcheck(channels_last, y_channels_last, stats_first, fused_backend):
    x, weight, bias = _inputs(2, 8, 16, 2, 6, 4, torch.float32, channels_last)
    torch.library.opcheck(fused_ops(fused_backend).patch_conv.default,
                          (x, weight, bias, stats_first, y_channels_last))
