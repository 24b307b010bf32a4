"""The block's MLP for inference (pointwise_mlp) on each fused backend that has it (Triton):
against the float64 reference in every dtype and layout, with and without biases and residual,
at widths that are not powers of two; with PAT_sp after it (PATNet-T1's stage-4 MLPs);
strided inputs; the gradient refusal; bad input; opcheck; torch.compile. (The inference path of the models running it: tests/test_fused_partial_block.py.)"""
from __future__ import annotations

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import BatchNormParams, SpatialAttentionParams, registry
from patnet_kernels.reference.channel_attention import output_statistics

from conftest import (DEVICE, assert_same_arithmetic, assert_within_budget, backends_of,
                      fused_ops, merged_statistics, rel_error, small_inference_model)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = registry.OPS["pointwise_mlp"].backends
# (tests taking ``fused_backend``: each of them, skipped where it cannot run on DEVICE)
ON_ITS_BACKENDS = backends_of("pointwise_mlp")



def _inputs(b, c, hidden, c_out, h, w, dtype, channels_last=False, seed=0):
    """[x, w1, b1, w2, b2, residual] in ``dtype`` on DEVICE (unit-gain weights)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    t = [randn(b, c, h, w), randn(hidden, c, 1, 1, scale=c ** -0.5), randn(hidden, scale=0.3),
         randn(c_out, hidden, 1, 1, scale=hidden ** -0.5), randn(c_out, scale=0.3),
         randn(b, c_out, h, w)]
    t = [v.to(DEVICE, dtype) for v in t]
    if channels_last:
        t[0], t[5] = (v.contiguous(memory_format=torch.channels_last) for v in (t[0], t[5]))
    return t


def _call(inputs, backend, activation, bias1=True, bias2=True, residual=True):
    x, w1, b1, w2, b2, r = inputs
    with torch.no_grad():
        return pk.pointwise_mlp(x, w1, b1 if bias1 else None, w2, b2 if bias2 else None,
                                residual=r if residual else None, activation=activation,
                                backend=backend)


SHAPES = {  # (B, C, hidden, C_out, H, W)
    "2x8-16-8x5x7": (2, 8, 16, 8, 5, 7),
    "1x40-80-40x3x3": (1, 40, 80, 40, 3, 3),
    "2x20-33-17x1x5": (2, 20, 33, 17, 1, 5),    # no power of two anywhere, H = 1
    "1x96-192-96x4x1": (1, 96, 192, 96, 4, 1),  # W = 1
    "1x24-48-300x2x2": (1, 24, 48, 300, 2, 2),  # C_out over one output block (256)
}


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_float64_reference(shape, channels_last, dtype, fused_backend):
    inputs = _inputs(*shape, dtype, channels_last)
    for activation, bias1, bias2, residual in (("relu", True, False, True),
                                               ("gelu", True, True, False),
                                               ("gelu", False, True, True)):
        options = dict(activation=activation, bias1=bias1, bias2=bias2, residual=residual)
        ours = _call(inputs, fused_backend, **options)
        exact = _call([v.double() for v in inputs], "torch", **options)
        in_dtype = _call(inputs, "torch", **options)
        assert ours.dtype == dtype
        assert_within_budget(f"y ({options})", ours, exact, in_dtype, dtype)
        assert ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@ON_ITS_BACKENDS
def test_channels_last_samples_share_pixel_tiles(fused_backend, monkeypatch):
    """Without a conv head, a gate or statistics (PAT_sf's MLP) the launcher takes channels_last
    samples as rows of one sample, so that its pixel tiles span samples (7 x 7 = 49 pixels
    would fill 77% of a 64-pixel tile); NCHW samples each on their own; exact either way."""
    from patnet_kernels.triton import pointwise_mlp as kernels

    taken, original = [], kernels.samples_as_rows
    monkeypatch.setattr(kernels, "samples_as_rows",
                        lambda *t: taken.append(original(*t)) or taken[-1])
    for channels_last in (False, True):
        inputs = _inputs(3, 16, 32, 16, 7, 7, torch.float32, channels_last)
        exact = _call([v.double() for v in inputs], "torch", "relu")
        assert rel_error(_call(inputs, fused_backend, "relu"), exact) < 1e-5
    assert taken == [False, True]


def _block_kernel_inputs(b, c, c1, hidden, h, w, dtype, channels_last, seed):
    """What the MLP kernel takes as a whole PAT_ch block runs it: x, b1, the residual, [W1,
    W2] as matrices, the conv head's taps (C1 channels) and the gate's affine (scale, shift:
    (B, C - C1) fp32), on DEVICE."""
    from patnet_kernels.triton.partial_conv import forward_taps

    x, w1, b1, w2, _, r = _inputs(b, c, hidden, c, h, w, dtype, channels_last, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    taps = forward_taps(torch.randn(c1, c1, 3, 3, generator=gen) / 10).to(DEVICE, dtype)
    scale = (torch.rand(b, c - c1, generator=gen) + 0.5).to(DEVICE)
    shift = (torch.randn(b, c - c1, generator=gen) / 4).to(DEVICE)
    mats = [m.reshape(m.shape[0], -1).contiguous() for m in (w1, w2)]
    return x, b1, r, mats, taps, scale, shift


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_wide_output_forms_agree(channels_last, dtype, fused_backend):
    """The forms of an output wider than one block of output channels give the same output and
    statistics, as a whole block runs the kernel (conv head, PAT_ch's affine, residual,
    statistics; and as a FasterNet block runs it, no gate and no statistics): one pass with a
    block per program, each recomputing the hidden activation;
    with a second accumulator (``block_n2``: a program covers block_n + block_n2 output
    channels, its spans partial: 40 channels in 16 + 16 twice, in 32 + 16 once); and two
    passes (``two_pass``: the hidden activation written by the first, read by the second;
    each program's outputs 16 at a time, the last block partial)."""
    from patnet_kernels.triton import pointwise_mlp as kernels

    b, c, c1, hidden, h, w = 2, 40, 10, 80, 5, 7
    x, b1, r, mats, taps, scale, shift = _block_kernel_inputs(b, c, c1, hidden, h, w, dtype,
                                                              channels_last, seed=3)

    def run(config, pat_ch=True):
        """(y, statistics merged over each sample) of the PAT_ch block form (in channels_last
        its pixel tiles span samples, some samples' last chunk empty); (y,) of the FasterNet
        block form (no gate, no statistics)."""
        chunks = kernels.stats_chunks(x, *mats, c1, config=config)
        stats = tuple(torch.empty(b, chunks, c - c1, device=DEVICE) for _ in range(2))
        y = kernels.pointwise_mlp(
            x, mats[0], b1, mats[1], None, r, "gelu", torch.empty_like(r), conv_taps=taps,
            scale=scale if pat_ch else None, shift=shift if pat_ch else None,
            statistics=stats if pat_ch else None, stats_first=c1, config=config)
        return (y, *merged_statistics(*stats, h * w)) if pat_ch else (y,)

    one = kernels.Config(16, 16, 16, 16, 4, 1, 16, 16)  # (3 programs per pixel tile)
    tol = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for pat_ch in (True, False):
        expected = run(one, pat_ch)
        for config in (one._replace(block_n2=16), one._replace(block_n=32, block_n2=16),
                       one._replace(two_pass=True)):
            for got, want in zip(run(config, pat_ch), expected):
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tiles_spanning_samples_agree(dtype, fused_backend):
    """Where the pixel tiles run over the samples one after another (channels_last, the SPAN
    mode: 4 samples of 4 x 10 = 40 pixels in tiles of 16, two of them meeting two samples, at
    8 rows into a tile), each row takes its own sample's affine and conv window, so the output
    equals that of tiles of one sample each (NCHW) row for row (conftest's
    assert_same_arithmetic); and each sample's statistics (its rows in each tile it meets: 4
    chunks a sample, the last empty for some, in the layout _types.chunk_layout reads) merge to
    those of its output as stored, as the per-sample tiles' 3 chunks do: as a whole
    PAT_ch block runs the kernel (conv head, affine, statistics), in two passes, and with PAT_sp
    after the MLP; a residual in NCHW keeps tiles of one sample (stats_chunks says so too).
    (float32 keeps tiles of one sample: no speed target, its SPAN form spilled registers.)"""
    from patnet_kernels._types import chunk_layout
    from patnet_kernels.triton import pointwise_mlp as kernels

    b, c, c1, hidden, h, w = 4, 40, 10, 80, 4, 10
    config = kernels.Config(16, 16, 16, 64, 4, 1, 16, 16)
    params = _spatial(c, dtype, folded=True, seed=7)
    p = params.conv_weight.shape[0]
    spatial = kernels.SpatialAttention(
        params.gate_weight.reshape(c - p).contiguous(), params.conv_weight.reshape(p, p),
        params.conv_bias, (params.bn_c.running_mean, params.bn_c.running_var,
                           params.bn_c.weight, params.bn_c.bias), 1e-5, None, 0.0)

    def run(channels_last, form, residual_nchw=False):
        x, b1, r, mats, taps, scale, shift = _block_kernel_inputs(
            b, c, c1, hidden, h, w, dtype, channels_last, seed=5)
        if residual_nchw:  # (a residual in another layout: tiles of one sample)
            r = r.contiguous()
        chunks = kernels.stats_chunks(x, *mats, c1, config=config, residual=r)
        stats = tuple(torch.full((b, chunks, c - c1), float("nan"), device=DEVICE)
                      for _ in range(2))
        y = kernels.pointwise_mlp(
            x, mats[0], b1, mats[1], None, r, "gelu", torch.empty_like(r), conv_taps=taps,
            scale=scale, shift=shift, statistics=stats, stats_first=c1,
            spatial=spatial if form == "pat_sp" else None,
            config=config._replace(two_pass=form == "two_pass"))
        return y, stats

    x = torch.empty(b, c, h, w, device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    assert kernels.tile_grid(x, x, x, 16, True) == ((10, 1), 160, True)
    assert kernels.tile_grid(x.contiguous(), x, x, 16, True) == ((3, 4), 40, False)
    assert not kernels.tile_grid(x.float(), x.float(), x.float(), 16, True).span
    assert kernels.tile_grid(x.float(), x.float(), x.float(), 16, False) == ((10, 1), 160, False)
    assert chunk_layout(40, 4) == (16, 8) and chunk_layout(40, 3) == (16, 0)
    for form in ("pat_ch", "two_pass", "pat_sp"):
        want_y, want_stats = run(False, form)
        for residual_nchw in (False, True):
            y, stats = run(True, form, residual_nchw)
            assert stats[0].shape[1] == (3 if residual_nchw else 4)
            assert want_stats[0].shape[1] == 3
            assert_same_arithmetic(y, want_y, form)
            for y_of, stats_of in ((y, stats), (want_y, want_stats)):  # (those of y as stored)
                for got, want in zip(merged_statistics(*stats_of, h * w),
                                     output_statistics(y_of.double(), c1)):
                    assert not got.isnan().any(), form
                    torch.testing.assert_close(got, want[:, 0].double(), rtol=1e-5, atol=1e-5,
                                               msg=form)


def _spatial(c_out, dtype, folded, seed=1, p=None):
    """PAT_sp's tensors for an MLP of ``c_out`` output channels (P = C_out // 2 conv channels
    as released, or ``p``), BN_d folded into its conv (a bias) or not; BatchNorm tensors fp32
    (as autocast keeps a module's)."""
    gen = torch.Generator().manual_seed(seed)
    p = c_out // 2 if p is None else p
    q = c_out - p

    def rand(*shape, scale=1.0, shift=0.0, to=dtype):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(
            DEVICE, to)

    def bn(n):
        keep = dtype if dtype == torch.float64 else torch.float32
        return BatchNormParams(rand(n, shift=0.5, to=keep), rand(n, shift=-0.5, to=keep),
                               rand(n, shift=-0.5, to=keep), rand(n, shift=0.5, to=keep))

    return SpatialAttentionParams(rand(1, q, 1, 1, scale=2 * q ** -0.5, shift=-q ** -0.5),
                                  rand(p, p, 1, 1, scale=2 * p ** -0.5, shift=-p ** -0.5),
                                  rand(p, scale=0.4, shift=-0.2) if folded else None, bn(q),
                                  None if folded else bn(p))


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 24, 48, 24, 3, 2), (1, 20, 33, 17, 2, 3)],
                         ids=["2x24-48-24x3x2", "1x20-33-17x2x3"])
def test_with_spatial_attention(shape, channels_last, dtype, fused_backend):
    """PAT_sp after the MLP (``spatial``, PATNet-T1's stage-4 MLPs; on Triton in the MLP's
    kernel), BN_d folded or not, an odd C_out (Q = 9, P = 8), with and without the residual,
    against the float64 reference."""
    inputs = _inputs(*shape, dtype, channels_last)
    x, w1, b1, w2, b2, r = inputs
    for folded, residual in ((True, True), (False, False)):
        spatial = _spatial(shape[3], dtype, folded)
        exact_spatial = _spatial(shape[3], torch.float64, folded)

        def run(tensors, sp, backend):
            x, w1, b1, w2, b2, r = tensors
            with torch.no_grad():
                return pk.pointwise_mlp(x, w1, b1, w2, b2, residual=r if residual else None,
                                        activation="gelu", spatial=sp, backend=backend)

        ours = run(inputs, spatial, fused_backend)
        exact = run([v.double() for v in inputs], exact_spatial, "torch")
        assert_within_budget(f"y (BN_d folded {folded})", ours, exact,
                             run(inputs, spatial, "torch"), dtype)
        assert ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.library.opcheck(
        fused_ops(fused_backend).pointwise_mlp_spatial.default,
        (x, None, None, None, w1, b1, w2, b2, r, "gelu", -1, spatial.gate_weight,
         spatial.conv_weight, spatial.conv_bias, *spatial.bn_c[:4], 1e-5,
         *spatial.bn_d[:4], 1e-5))


@ON_ITS_BACKENDS
def test_spatial_attention_with_more_conv_than_gated_channels(fused_backend):
    """A split the released models do not use, P = 30 > Q = 10: the kernel's channel block
    covers the wider half."""
    inputs = _inputs(1, 16, 32, 40, 3, 4, torch.float32)
    spatial, exact_spatial = (_spatial(40, dtype, True, p=30)
                              for dtype in (torch.float32, torch.float64))
    with torch.no_grad():
        ours = pk.pointwise_mlp(*inputs[:5], residual=inputs[5], activation="relu",
                                spatial=spatial, backend=fused_backend)
        exact = pk.pointwise_mlp(*(v.double() for v in inputs[:5]),
                                 residual=inputs[5].double(), activation="relu",
                                 spatial=exact_spatial, backend="torch")
        in_dtype = pk.pointwise_mlp(*inputs[:5], residual=inputs[5], activation="relu",
                                    spatial=spatial, backend="torch")
    assert_within_budget("y", ours, exact, in_dtype, torch.float32)


@ON_ITS_BACKENDS
def test_strided_inputs(fused_backend):
    """A channel slice as x, a residual with its H and W transposed in memory (copied for the
    kernel), the output in x's layout."""
    big = _inputs(2, 24, 32, 16, 5, 6, torch.float32, channels_last=True)
    x = big[0][:, 4:20]  # (2, 16, 5, 6), channels_last strides of a 24-channel tensor
    residual = big[5].double().transpose(2, 3).contiguous().transpose(2, 3).float()
    w1 = big[1][:, :16].contiguous()
    args = (x, w1, big[2], big[3], big[4])
    with torch.no_grad():
        ours = pk.pointwise_mlp(*args, residual=residual, backend=fused_backend)
        exact = pk.pointwise_mlp(*(a.double() for a in args), residual=residual.double(),
                                 backend="torch")
    assert rel_error(ours, exact) < 1e-6


@ON_ITS_BACKENDS
def test_a_gradient_is_refused_by_name_and_taken_by_auto(fused_backend):
    x, w1, b1, w2, b2, r = _inputs(2, 8, 16, 8, 3, 3, torch.float32)
    w1.requires_grad_()
    with pytest.raises(ValueError, match=r"for inference only .* torch.no_grad\(\)"):
        pk.pointwise_mlp(x, w1, b1, w2, b2, residual=r, backend=fused_backend)
    y = pk.pointwise_mlp(x, w1, b1, w2, b2, residual=r, backend="auto")  # the reference
    y.sum().backward()
    assert w1.grad is not None and torch.isfinite(w1.grad).all()


def _bad(name):
    x, w1, b1, w2, b2, r = _inputs(2, 8, 16, 6, 3, 3, torch.float32)
    calls = {
        "w1 shape": ((x, w1[:, :4], b1, w2, b2), {}, ValueError, r"w1 must have shape \(16, 8"),
        "w1 not 1x1": ((x, w1.expand(16, 8, 3, 3), b1, w2, b2), {}, ValueError, r"1x1 conv"),
        "w2 hidden": ((x, w1, b1, w2[:, :8], b2), {}, ValueError, r"w2 must have shape \(6, 16"),
        "b1": ((x, w1, b1[:3], w2, b2), {}, ValueError, r"b1 must have shape \(16,\)"),
        "b2": ((x, w1, b1, w2, b1), {}, ValueError, r"b2 must have shape \(6,\)"),
        "residual": ((x, w1, b1, w2, b2), dict(residual=x), ValueError,
                     r"residual must have shape \(2, 6, 3, 3\)"),
        "activation": ((x, w1, b1, w2, b2), dict(activation="silu"), ValueError,
                       r"activation must be one of relu, gelu, got 'silu'"),
        "dtype": ((x, w1.double(), b1, w2, b2), {}, TypeError, r"w1 is torch.float64"),
        "x 3-D": ((x[0], w1, b1, w2, b2), {}, ValueError, r"x must be \(B, C, H, W\)"),
        "spatial type": ((x, w1, b1, w2, b2), dict(spatial=w1), ValueError,
                         r"spatial must be a patnet_kernels.SpatialAttentionParams"),
        "spatial conv": ((x, w1, b1, w2, b2),
                         dict(spatial=_spatial(12, torch.float32, True)), ValueError,
                         r"spatial.conv_weight covers P=6 channels but the input has C=6"),
    }
    return calls[name]


@pytest.mark.parametrize("case", ["w1 shape", "w1 not 1x1", "w2 hidden", "b1", "b2",
                                  "residual", "activation", "dtype", "x 3-D", "spatial type",
                                  "spatial conv"])
@pytest.mark.parametrize("backend", ("torch",) + BACKENDS)
def test_bad_input_is_refused_before_any_kernel(case, backend):
    args, kwargs, error, message = _bad(case)
    with torch.no_grad(), pytest.raises(error, match=message):
        pk.pointwise_mlp(*args, backend=backend, **kwargs)


@ON_ITS_BACKENDS
def test_float64_is_refused_by_the_fused_backends(fused_backend):
    x, w1, b1, w2, b2, r = (v.double() for v in _inputs(1, 8, 16, 8, 2, 2, torch.float32))
    with torch.no_grad(), pytest.raises(TypeError, match=r"runs float32, float16 and bfloat16"):
        pk.pointwise_mlp(x, w1, b1, w2, b2, residual=r, backend=fused_backend)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "none"])
def test_opcheck(channels_last, residual, fused_backend):
    x, w1, b1, w2, b2, r = _inputs(2, 8, 16, 8, 3, 5, torch.float32, channels_last)
    torch.library.opcheck(fused_ops(fused_backend).pointwise_mlp.default,
                          (x, None, None, None, w1, b1, w2, None, r if residual else None,
                           "gelu"))


@ON_ITS_BACKENDS
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_nan_propagates_as_in_the_reference(activation, fused_backend):
    """A NaN input pixel gives NaN outputs at that pixel only (ReLU keeps NaN, as torch's)."""
    x, w1, b1, w2, b2, r = _inputs(1, 8, 16, 8, 2, 3, torch.float32)
    x[0, 3, 1, 2] = float("nan")
    ours = _call([x, w1, b1, w2, b2, r], fused_backend, activation)
    reference = _call([x, w1, b1, w2, b2, r], "torch", activation)
    assert torch.equal(ours.isnan(), reference.isnan()) and ours.isnan().sum() == 8


def test_an_activation_without_a_fused_form_is_refused():
    """A GELU with the tanh approximation (no released model has one) is not silently run as
    the exact GELU."""
    model, fast = small_inference_model("fasternet_t0", "torch")
    mlp = fast.stages[0].blocks[0].mlp
    mlp[2] = torch.nn.GELU(approximate="tanh")
    with torch.no_grad(), pytest.raises(ValueError, match=r"has no fused form"):
        fast(torch.randn(1, 3, 32, 32, device=DEVICE))
