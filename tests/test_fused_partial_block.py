"""A FasterNet or PAT_ch block in inference (partial_block) on each fused backend that has it
(Triton): against the float64 reference in every dtype and layout (PConv and PAT_ch mixers,
BN_a folded or not, H * W = 1 NaNs, channel splits that straddle the kernel's channel
blocks; with PAT_sp after the MLP, PATNet-T1's block), the MLP op's split input (opcheck), bad
input, the gradient refusal, and the inference path of every variant running its blocks
through it, also compiled."""
from __future__ import annotations

import pytest
import torch

import patnet
import patnet_kernels as pk
from patnet.testing import randomize_norms
from patnet_kernels import BatchNormParams, SpatialAttentionParams, registry
from patnet_kernels.ops.channel_attention import eval_gate
from patnet_kernels.reference.channel_attention import output_statistics

from conftest import (DEVICE, assert_within_budget, backends_of, fused_ops, merged_statistics,
                      rel_error, small_inference_model)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = registry.OPS["partial_block"].backends
# (tests taking ``fused_backend``: each of them, skipped where it cannot run on DEVICE)
ON_ITS_BACKENDS = backends_of("partial_block")



def _bn(channels, gen):
    def rand(scale, shift):
        return torch.rand(channels, generator=gen, dtype=torch.float64) * scale + shift
    return BatchNormParams(rand(1.0, 0.5), rand(0.6, -0.3), rand(0.6, -0.3), rand(1.0, 0.5),
                           0.1, 1e-5)


def _inputs(b, c, c1, h, w, pat_ch, bn_a, seed=0, spatial=None):
    """float64 (args, kwargs) of one block call on the CPU: PConv, or PAT_ch with or without
    BN_a (folded into W_ch and cfc_bias); ``spatial`` "folded" or "bn_d": with PAT_sp after the
    MLP, BN_d folded into its conv (a bias) or not."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    hidden, c2 = 2 * c, c - c1
    args = [randn(b, c, h, w), randn(c1, c1, 3, 3, scale=(9 * c1) ** -0.5),
            randn(hidden, c, 1, 1, scale=c ** -0.5), randn(hidden, scale=0.3),
            randn(c, hidden, 1, 1, scale=hidden ** -0.5), None]
    kwargs = {}
    if pat_ch:
        kwargs = dict(cfc_weight=randn(c2, c2, 1, 2, scale=0.3),
                      cfc_bias=None if bn_a else randn(c2, scale=0.2),
                      bn_a=_bn(c2, gen) if bn_a else None, bn_b=_bn(c2, gen))
    if spatial:
        p = int(0.5 * c)
        q = c - p
        folded = spatial == "folded"
        kwargs["spatial"] = SpatialAttentionParams(
            randn(1, q, 1, 1, scale=q ** -0.5), randn(p, p, 1, 1, scale=p ** -0.5),
            randn(p, scale=0.2) if folded else None, _bn(q, gen),
            None if folded else _bn(p, gen))
    return args, kwargs


def _cast(args, kwargs, dtype, channels_last=False):
    def cast(v):
        if isinstance(v, BatchNormParams):  # (float32 under low precision, as autocast keeps)
            keep = dtype if dtype == torch.float64 else torch.float32
            return BatchNormParams(*(t.to(DEVICE, keep) for t in v[:4]), v.momentum, v.eps)
        if isinstance(v, SpatialAttentionParams):
            return v.with_weights(cast)._replace(bn_c=cast(v.bn_c), bn_d=cast(v.bn_d))
        return v.to(DEVICE, dtype) if isinstance(v, torch.Tensor) else v
    args = [cast(a) for a in args]
    if channels_last:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    return args, {k: cast(v) for k, v in kwargs.items()}


def _run(args, kwargs, dtype, backend, activation="relu", channels_last=False):
    args, kwargs = _cast(args, kwargs, dtype, channels_last)
    with torch.no_grad():
        return pk.partial_block(*args, activation=activation, backend=backend, **kwargs)


CASES = {  # (B, C, C1, H, W), PAT_ch, BN_a unfolded
    "pconv-2x16x5x7": ((2, 16, 4, 5, 7), False, False),
    "pconv-1x40x3x3": ((1, 40, 10, 3, 3), False, False),   # C1 = 10: a channel block straddles
    "pat_ch-2x24x4x6": ((2, 24, 6, 4, 6), True, False),
    "pat_ch-bn_a-3x40x3x5": ((3, 40, 10, 3, 5), True, True),
    "pat_ch-2x12x1x1": ((2, 12, 3, 1, 1), True, False),     # H * W = 1: sigma NaN, all NaN
    # 323 pixels: the statistics in several unequal chunks merged (on every backend config)
    "pat_ch-1x8x17x19": ((1, 8, 2, 17, 19), True, False),
}


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, channels_last, dtype, fused_backend):
    shape, pat_ch, bn_a = CASES[case]
    args, kwargs = _inputs(*shape, pat_ch, bn_a)
    activation = "gelu" if shape[1] % 3 else "relu"
    ours = _run(args, kwargs, dtype, fused_backend, activation, channels_last)
    exact = _run(args, kwargs, torch.float64, "torch", activation)
    in_dtype = _run(args, kwargs, dtype, "torch", activation, channels_last)
    assert ours.dtype == dtype
    assert_within_budget("y", ours, exact, in_dtype, dtype)
    assert ours.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@ON_ITS_BACKENDS
def test_channels_last_pconv_blocks_tile_across_samples(fused_backend, monkeypatch):
    """A FasterNet block on a channels_last map takes its samples as rows of one sample (pixel
    tiles spanning samples: stage 3's 14 x 14 = 196 pixels would leave 60 of four 64-pixel
    tiles idle), each pixel's 3 x 3 window kept inside its own sample (zero padding at every
    sample's edges: the first and last rows are neighbours in memory); NCHW maps do not, nor
    a float32 PAT_ch block (its gate and statistics per sample: only in fp16 / bf16 where its
    map is more than two tiles, test_fused_pointwise_mlp.py). Exact."""
    from patnet_kernels.triton import pointwise_mlp as kernels

    taken, original = [], kernels.samples_as_rows
    monkeypatch.setattr(kernels, "samples_as_rows",
                        lambda *t: taken.append(original(*t)) or taken[-1])
    for pat_ch, channels_last in ((False, False), (False, True), (True, True)):
        args, kwargs = _inputs(3, 16, 4, 4, 5, pat_ch, False, seed=5)
        ours = _run(args, kwargs, torch.float32, fused_backend, channels_last=channels_last)
        exact = _run(args, kwargs, torch.float64, "torch")
        assert rel_error(ours, exact) < 1e-5, (pat_ch, channels_last)
    assert taken == [False, True]  # (the PAT_ch block, with its gate, is not even asked)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_of_the_mlp_with_a_conv_head(channels_last, fused_backend):
    """The MLP op as the block calls it: conv3x3 of channels [0, C1), X2 through an affine."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 3, 5, generator=gen).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.randn(3, 3, 3, 3, generator=gen).to(DEVICE) / 9
    scale, shift = (torch.randn(2, 9, generator=gen).to(DEVICE) for _ in range(2))
    w1 = torch.randn(24, 12, 1, 1, generator=gen).to(DEVICE) / 4
    w2 = torch.randn(12, 24, 1, 1, generator=gen).to(DEVICE) / 5
    ops = fused_ops(fused_backend)
    torch.library.opcheck(ops.pointwise_mlp.default,
                          (x, conv, scale, shift, w1, None, w2, None, x, "relu"))
    # with the output's statistics, as a PAT_ch block followed by another calls it
    torch.library.opcheck(ops.pointwise_mlp_stats.default,
                          (x, conv, scale, shift, w1, None, w2, None, x, "relu", 3))


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_chunked_statistics(channels_last, fused_backend):
    """``channel_attention_chunk_stats``: per-chunk statistics of X2 (several chunks, the last
    one shorter) that the gate op merges into the mean and std of the statistics op; opcheck
    of the op as the block calls it."""
    ops = fused_ops(fused_backend)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 12, 17, 19, generator=gen) * 3 + 1).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, m2 = ops.channel_attention_chunk_stats(x, 3)
    assert mean.shape[0] == 2 and mean.shape[1] > 1 and mean.shape[2] == 9
    assert m2.shape == mean.shape and (17 * 19) % mean.shape[1]
    bn_b = BatchNormParams(None, None, torch.zeros(9, device=DEVICE),
                           torch.ones(9, device=DEVICE), 0.1, 0.0)
    cfc = torch.zeros(9, 9, 1, 2, device=DEVICE)
    bias = torch.full((9,), 3.0, device=DEVICE)  # hsig(3) = 1: scale 1, shift 0
    scale, shift = eval_gate(ops, mean, m2, 17 * 19, cfc, bias, None, bn_b)
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(shift, torch.zeros_like(shift))
    # the merged statistics through the mix: W_ch picking the mean, then the std
    exact_mean, exact_std = ops.channel_attention_stats(x, 3)
    for j, exact in enumerate((exact_mean, exact_std)):
        pick = torch.zeros(9, 9, 1, 2, device=DEVICE)
        pick[:, :, 0, j] = torch.eye(9, device=DEVICE) / 100  # (inside hsig's linear range)
        got, _ = eval_gate(ops, mean, m2, 17 * 19, pick, None, None, bn_b)
        want, _ = eval_gate(ops, exact_mean, exact_std, 17 * 19, pick, None, None, bn_b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.library.opcheck(ops.channel_attention_chunk_stats.default, (x, 3))


def test_chunk_layout_reads_both_forms():
    """_types.chunk_layout from the chunk count alone: tiles of one sample (shift 0) and tiles
    over the samples (one chunk more, shift P mod S, where P > 2 S and S does not divide P)
    never share a count; each sample's chunks hold its P pixels; other counts are refused."""
    from patnet_kernels._types import chunk_counts, chunk_layout

    for pixels in range(1, 1200):
        for size in (16, 32, 64, 128, 256):
            chunks = -(-pixels // size)
            layout = chunk_layout(pixels, chunks)
            assert layout[1] == 0 and -(-pixels // layout[0]) == chunks, (pixels, size)
            if pixels > 2 * size and pixels % size:
                assert chunk_layout(pixels, chunks + 1) == (size, pixels % size), (pixels, size)
                assert all(sum(chunk_counts(pixels, chunks + 1, b)) == pixels
                           for b in range(5))
    assert chunk_counts(196, 5, 1) == [60, 64, 64, 8, 0]  # (sample 1 starts 4 rows in)
    assert chunk_layout(40, 9) is None and chunk_layout(100, 2) == (64, 0)


@ON_ITS_BACKENDS
def test_gate_merges_statistics_of_tiles_spanning_samples(fused_backend):
    """A bf16 channels_last PAT_ch block's statistics from its MLP kernel, whose pixel tiles run
    over the samples one after another (3 samples of 17 x 19 = 323 pixels in tiles of 128
    under the interpreter: each sample's rows in 4 chunks at its own offset, 0, 67 and 6 rows
    into a tile, some last chunks empty): the gate merges them into each sample's mean and std
    of the stored output, as from the statistics op over the whole map."""
    from patnet_kernels._types import chunk_layout

    ops = fused_ops(fused_backend)
    args, kwargs = _cast(*_inputs(3, 16, 4, 17, 19, True, False, seed=2), torch.bfloat16, True)
    with torch.no_grad():
        y, (mean, m2) = pk.partial_block(*args, activation="relu", return_statistics=True,
                                         backend=fused_backend, **kwargs)
    layout = chunk_layout(323, mean.shape[1])
    assert layout is not None and layout[1] == 323 % layout[0], (mean.shape, layout)
    bn_b = BatchNormParams(None, None, torch.zeros(12, device=DEVICE),
                           torch.ones(12, device=DEVICE), 0.1, 0.0)
    exact_mean, exact_std = ops.channel_attention_stats(y.float(), 4)
    for j, exact in enumerate((exact_mean, exact_std)):  # (W_ch picking the mean, the std)
        pick = torch.zeros(12, 12, 1, 2, device=DEVICE)
        pick[:, :, 0, j] = torch.eye(12, device=DEVICE) / 100  # (inside hsig's linear range)
        got, _ = eval_gate(ops, mean, m2, 323, pick, None, None, bn_b)
        want, _ = eval_gate(ops, exact_mean, exact_std, 323, pick, None, None, bn_b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_without_the_residual(channels_last, dtype, fused_backend):
    """``residual=False``: MLP(mixer(x)) without x added, against the float64 reference."""
    args, kwargs = _inputs(2, 24, 6, 5, 7, True, False, seed=3)
    kwargs["residual"] = False
    ours = _run(args, kwargs, dtype, fused_backend, "gelu", channels_last)
    exact = _run(args, kwargs, torch.float64, "torch", "gelu")
    in_dtype = _run(args, kwargs, dtype, "torch", "gelu", channels_last)
    assert_within_budget("y", ours, exact, in_dtype, dtype)
    with_x = _run(args, dict(kwargs, residual=True), torch.float64, "torch", "gelu")
    assert torch.allclose(with_x - args[0], exact, atol=1e-12)


SPATIAL_CASES = {  # (B, C, C1, H, W), PAT_ch, PAT_sp's BN_d
    "pat_ch-folded-2x24x6x4x6": ((2, 24, 6, 4, 6), True, "folded"),  # PATNet-T1's form
    "pconv-bn_d-1x21x5x3x4": ((1, 21, 5, 3, 4), False, "bn_d"),  # odd C: Q = 11, P = 10
    # P = 68: PAT_sp's conv in two steps of output channels (64 + 4)
    "pat_ch-folded-1x136x34x3x3": ((1, 136, 34, 3, 3), True, "folded"),
}


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(SPATIAL_CASES))
def test_with_spatial_attention(case, channels_last, dtype, fused_backend):
    """PAT_sp after the MLP (``spatial``; PATNet-T1's block, x + PAT_sp(MLP(mixer(x))), one
    kernel on Triton), against the float64 reference, with and without the residual."""
    shape, pat_ch, spatial = SPATIAL_CASES[case]
    args, kwargs = _inputs(*shape, pat_ch, False, seed=6, spatial=spatial)
    for residual in (True, False):
        kwargs["residual"] = residual
        ours = _run(args, kwargs, dtype, fused_backend, "gelu", channels_last)
        exact = _run(args, kwargs, torch.float64, "torch", "gelu")
        in_dtype = _run(args, kwargs, dtype, "torch", "gelu", channels_last)
        assert ours.dtype == dtype
        assert_within_budget("y", ours, exact, in_dtype, dtype)
        assert ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    composed = pk.spatial_attention(
        _run(args, dict(kwargs, spatial=None), torch.float64, "torch", "gelu"),
        *kwargs["spatial"][:4], kwargs["spatial"].bn_d, backend="torch")
    torch.testing.assert_close(exact, composed, rtol=0, atol=0)


@ON_ITS_BACKENDS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_spatial_attention_statistics_and_opcheck(channels_last, fused_backend):
    """PATNet-T1's block followed by another: the statistics of its output (after PAT_sp and
    the residual) from the kernel's epilogue merge to those of y; opcheck of the op."""
    args, kwargs = _cast(*_inputs(2, 16, 4, 17, 19, True, False, seed=7, spatial="folded"),
                         torch.float32, channels_last)
    with torch.no_grad():
        y, (mean, m2) = pk.partial_block(*args, activation="gelu", return_statistics=True,
                                         backend=fused_backend, **kwargs)
    exact = _run(*_inputs(2, 16, 4, 17, 19, True, False, seed=7, spatial="folded"),
                 torch.float64, "torch", "gelu")
    assert_within_budget("y", y, exact, _run(args, kwargs, torch.float32, "torch", "gelu"),
                         torch.float32)
    assert mean.shape[:2] == (2, mean.shape[1]) and mean.shape[1] > 1 and mean.shape[2] == 12
    exact_mean, exact_std = _merged(*output_statistics(y, 4), 323)
    got_mean, got_std = _merged(mean, m2, 323)
    torch.testing.assert_close(got_mean, exact_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_std, exact_std, rtol=1e-5, atol=1e-5)
    x, conv, w1, b1, w2, _ = args
    sp = kwargs["spatial"]
    scale, shift = (torch.rand(2, 12, device=DEVICE) + 0.5 for _ in range(2))
    ops = fused_ops(fused_backend)
    torch.library.opcheck(ops.pointwise_mlp_spatial.default,
                          (x, conv, scale, shift, w1, b1, w2, None, x, "gelu", 4,
                           sp.gate_weight, sp.conv_weight, sp.conv_bias, *sp.bn_c[:4],
                           sp.bn_c.eps, None, None, None, None, 0.0))


def _merged(mean, m2, pixels):
    """The (mean, unbiased std) over all pixels of per-chunk statistics, each (B, C2)."""
    total, m2_total = merged_statistics(mean, m2, pixels)
    return total, (m2_total / (pixels - 1)).sqrt()


@ON_ITS_BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_handed_to_the_next_block(channels_last, dtype, fused_backend):
    """Two PAT_ch blocks of a stage: the first returns the statistics of its output's X2 (on
    Triton from its MLP kernel's epilogue, per tile of pixels: 17 x 19 takes several, the last
    shorter), which merge to those of y; the second reads them instead of X2 and matches the
    float64 reference, as it does computing its own or given the reference's one-chunk form."""
    first, first_kw = _cast(*_inputs(2, 16, 4, 17, 19, True, False, seed=1), dtype,
                            channels_last)
    second, second_kw = _inputs(2, 16, 4, 17, 19, True, True, seed=2)
    with torch.no_grad():
        y, (mean, m2) = pk.partial_block(*first, activation="relu", return_statistics=True,
                                         backend=fused_backend, **first_kw)
        assert mean.dtype == m2.dtype == torch.float32 and mean.shape == m2.shape
        assert mean.shape[0] == 2 and mean.shape[1] > 1 and mean.shape[2] == 12
        exact_mean, exact_std = _merged(*output_statistics(y, 4), 323)
        got_mean, got_std = _merged(mean, m2, 323)
        torch.testing.assert_close(got_mean, exact_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_std, exact_std, rtol=1e-5, atol=1e-5)
        second[0] = y.double()
        exact = _run(second, second_kw, torch.float64, "torch")
        in_dtype = _run(second, second_kw, dtype, "torch", channels_last=channels_last)
        args, kwargs = _cast(second, second_kw, dtype, channels_last)
        for statistics in ((mean, m2), None, output_statistics(y, 4)):
            ours = pk.partial_block(*args, activation="relu", statistics=statistics,
                                    backend=fused_backend, **kwargs)
            assert_within_budget("y", ours, exact, in_dtype, dtype)


def _bad(name):
    args, kwargs = _cast(*_inputs(2, 16, 4, 3, 3, True, False, spatial="folded"), torch.float32)
    sp = kwargs.pop("spatial")
    x, conv_w, w1, b1, w2, _ = args
    stats = torch.zeros(2, 1, 12, device=DEVICE)
    calls = {
        "w2 out": ((x, conv_w, w1, b1, w2[:8]), {}, ValueError, r"w2 must have C = 16 output"),
        "bn_b alone": ((x, conv_w, w1, b1, w2), dict(bn_b=kwargs["bn_b"]), ValueError,
                       r"bn_b belong to PAT_ch: pass its cfc_weight too"),
        "cfc shape": ((x, conv_w, w1, b1, w2), dict(kwargs, cfc_weight=w1), ValueError,
                      r"cfc_weight must have shape \(12, 12, 1, 2\)"),
        "no bn_b": ((x, conv_w, w1, b1, w2), dict(kwargs, bn_b=None), ValueError,
                    r"bn_b is required"),
        "conv": ((x, w1, w1, b1, w2), {}, ValueError, r"conv_weight must be \(C1, C1, 3, 3\)"),
        "w1": ((x, conv_w, w2, b1, w2), {}, ValueError, r"w1 must have shape \(16, 16"),
        "statistics alone": ((x, conv_w, w1, b1, w2), dict(statistics=(stats, stats)),
                             ValueError, r"statistics belong to PAT_ch"),
        "statistics shape": ((x, conv_w, w1, b1, w2),
                             dict(kwargs, statistics=(stats[:, :, :5], stats[:, :, :5])),
                             ValueError, r"statistics must be two \(B, T, C2\) = \(2, T, 12\)"),
        "statistics chunks": ((x, conv_w, w1, b1, w2),
                              dict(kwargs, statistics=(stats.expand(2, 7, 12),) * 2),
                              ValueError, r"T chunks of the 9 pixels a sample"),
        "statistics, no residual": ((x, conv_w, w1, b1, w2),
                                    dict(kwargs, return_statistics=True, residual=False),
                                    ValueError, r"with residual=False .* there is none"),
        "statistics dtype": ((x, conv_w, w1, b1, w2),
                             dict(kwargs, statistics=(stats.double(), stats.double())),
                             ValueError, r"statistics must be float32"),
        "spatial type": ((x, conv_w, w1, b1, w2), dict(kwargs, spatial=(sp.gate_weight,)),
                         ValueError, r"spatial must be a patnet_kernels.SpatialAttentionParams"),
        "spatial conv": ((x, conv_w, w1, b1, w2),
                         dict(kwargs, spatial=sp._replace(conv_weight=sp.conv_weight[:, :4])),
                         ValueError, r"spatial.conv_weight must be"),
        "spatial gate": ((x, conv_w, w1, b1, w2),
                         dict(kwargs, spatial=sp._replace(gate_weight=sp.conv_weight)),
                         ValueError, r"spatial.gate_weight must have shape \(1, 8, 1, 1\)"),
        "spatial bn_c": ((x, conv_w, w1, b1, w2),
                         dict(kwargs, spatial=sp._replace(bn_c=kwargs["bn_b"])),
                         ValueError, r"spatial.bn_c"),
    }
    return calls[name]


@pytest.mark.parametrize("case", ["w2 out", "bn_b alone", "cfc shape", "no bn_b", "conv", "w1",
                                  "statistics alone", "statistics shape", "statistics chunks",
                                  "statistics dtype", "statistics, no residual", "spatial type",
                                  "spatial conv", "spatial gate", "spatial bn_c"])
@pytest.mark.parametrize("backend", ("torch",) + BACKENDS)
def test_bad_input_is_refused_before_any_kernel(case, backend):
    args, kwargs, error, message = _bad(case)
    with torch.no_grad(), pytest.raises(error, match=message):
        pk.partial_block(*args, backend=backend, **kwargs)


@ON_ITS_BACKENDS
def test_a_gradient_is_refused_by_name(fused_backend):
    args, kwargs = _cast(*_inputs(2, 16, 4, 3, 3, False, False), torch.float32)
    args[2].requires_grad_()
    with pytest.raises(ValueError, match=r"for inference only"):
        pk.partial_block(*args, backend=fused_backend)
    args, kwargs = _cast(*_inputs(2, 16, 4, 3, 3, False, False, spatial="folded"),
                         torch.float32)
    kwargs["spatial"].gate_weight.requires_grad_()
    with pytest.raises(ValueError, match=r"for inference only"):
        pk.partial_block(*args, backend=fused_backend, **kwargs)


# (PATNet-T1: its blocks run the ops with their PAT_sp)
VARIANTS = ["fasternet_t0", "fasternet_t2", "patnet_t0", "patnet_t1", "patnet_t2"]


@ON_ITS_BACKENDS
@pytest.mark.parametrize("name", VARIANTS)
def test_inference_path_runs_every_block_as_one_op(name, fused_backend):
    """Every FasterNet block, and PATNet's stage 1-3 blocks, is one call of the block op
    (stage 4: the MLP op after PAT_sf; PATNet-T1's with their PAT_sp, which never runs as
    its own op); the model equals the eval model, NCHW and channels_last."""
    channels_last = name.endswith("t2")
    model, fast = small_inference_model(name, fused_backend, channels_last)
    calls = [op for op, *_ in fast.backend_calls(DEVICE, (2, 3, 64, 64))]
    if name.startswith("fasternet"):
        assert calls.count("partial_block") == 5 and "pointwise_mlp" not in calls
    else:
        assert calls.count("partial_block") == 4 and calls.count("pointwise_mlp") == 1
    assert "channel_attention" not in calls and "partial_conv3x3" not in calls
    assert "spatial_attention" not in calls
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < 1e-5


def test_auto_composes_the_block_from_its_ops():
    """Under "auto" the block runs as its mixer's op then the MLP op, each decided per call
    (on the CPU: the reference, and PAT_ch's eval form)."""
    _, fast = small_inference_model("patnet_t0", "auto")
    calls = [op for op, *_ in fast.backend_calls(torch.device("cpu"), (2, 3, 64, 64))]
    assert "partial_block" not in calls
    assert calls.count("channel_attention") == 4 and calls.count("pointwise_mlp") == 5


@ON_ITS_BACKENDS
@pytest.mark.parametrize("name", ["patnet_t0", "patnet_t1"])
def test_compiled_inference_model_is_one_graph(name, fused_backend):
    """One graph (fullgraph) through the block op (PATNet-T0: with the statistics handed
    between blocks; PATNet-T1: with PAT_sp), equal to eager."""
    torch._dynamo.reset()
    _, fast = small_inference_model(name, fused_backend)
    x = torch.randn(2, 3, 64, 32, device=DEVICE)
    with torch.no_grad():
        eager = fast(x)
        compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)(x)
    assert rel_error(compiled, eager) < 1e-6


def test_auto_runs_the_block_only_where_measured(monkeypatch):
    """``auto_runs_fused`` asks auto's decision for the call (here stubbed: "triton" measured
    faster for the block op) on a GPU tensor (a fake one: no GPU needed); on the CPU, never."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    decided = []

    def decide(backend, device_type, device_index, op, refused, call, load):
        decided.append((backend, device_type, op, call[2]))
        return ("triton", "measured faster", "") if op == "partial_block" else ("torch", "", "")

    monkeypatch.setattr(pk.backends, "_decide", decide)
    assert not pk.backends.auto_runs_fused("partial_block", torch.zeros(2, 16, 4, 4))
    with FakeTensorMode():
        x = torch.empty(2, 16, 8, 8, device="cuda")
        assert pk.backends.auto_runs_fused("partial_block", x)
        assert not pk.backends.auto_runs_fused("pointwise_mlp", x)
    assert decided == [("auto", "cuda", "partial_block", "fwd"),
                       ("auto", "cuda", "pointwise_mlp", "fwd")]


@ON_ITS_BACKENDS
@pytest.mark.slow
@pytest.mark.parametrize("name", patnet.list_models())
def test_every_variant_at_its_real_widths(name, fused_backend):
    """Every variant, at its released widths (C up to 1536: output blocks split, several
    hidden chunks), through the Triton inference path (the block, MLP and attention kernels)
    equals its eval model; a 32 x 32 input keeps it to minutes under the interpreter."""
    torch.manual_seed(0)
    model = randomize_norms(patnet.create_model(name), seed=1).eval().to(DEVICE)
    fast = patnet.optimize_for_inference(model, backend=fused_backend)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < 1e-5
