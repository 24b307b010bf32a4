"""The inference path (``patnet.optimize_for_inference``) and the backend plan of a model.

Every variant's inference copy equals its eval model (float32, random BatchNorm statistics) on
the CPU path (every op in its CPU eval form, the convolutions on oneDNN, the MLP op with the
residual); the fused backends' inference copies on small models under the Triton interpreter /
CUDA emulation; the eval forms against the reference ops, odd shapes and H * W = 1 included;
CUDA-graph capture (its input checks here, its replay a gpu test). The eval forms'
convolution itself: tests/test_cpu_conv.py.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import patnet
import patnet_kernels as pk
from patnet.testing import randomize_norms
from patnet_kernels import reference
from patnet_kernels import eval_cpu, registry

from conftest import DEVICE, frozen, rel_error, require_fused_backend

INFERENCE_TOLERANCE = 1e-5  # max |inference - eval| / max |eval|, float32 (folding's own bound)


def _eval_model(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(patnet.create_model(name, backend="torch", **options), seed).eval()


@pytest.mark.parametrize("name", patnet.list_models())
def test_inference_path_equals_eval_model(name):
    model = _eval_model(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    given = x.clone()
    fast = patnet.optimize_for_inference(model)
    with torch.no_grad():
        expected = model(x)
        result = fast(x)
        again = fast(x)
    assert torch.equal(x, given), "the inference model must not modify its input"
    assert torch.equal(result, again)
    assert rel_error(result, expected) < INFERENCE_TOLERANCE
    # The copy is independent of the model, folded, and for inference only.
    assert fast.optimized_for_inference and not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.train()


def test_optimize_for_inference_refuses_what_it_cannot_optimise():
    """Not a PATNet or FasterNet (a name, another module), or an unknown backend: a clear
    error before any copy is made."""
    for model in ("patnet_t0", torch.nn.Linear(3, 3)):
        with pytest.raises(TypeError, match=r"takes a PATNet or FasterNet \(e.g. "
                                            r"patnet.create_model\('patnet_t2'\)\), got"):
            patnet.optimize_for_inference(model)
    with pytest.raises(ValueError, match=r"unknown backend 'TRITON'; choose one of"):
        patnet.optimize_for_inference(_eval_model("fasternet_t0"), backend="TRITON")


def test_inference_path_of_a_folded_model_and_features():
    model = _eval_model("patnet_t0", features_only=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        results = patnet.optimize_for_inference(patnet.fuse_for_inference(model))(x)
    assert len(results) == len(expected) == 4
    for result, want in zip(results, expected):
        assert rel_error(result, want) < INFERENCE_TOLERANCE


@pytest.mark.parametrize("name", ["fasternet_t0", "patnet_t0"])
def test_inference_path_of_a_sync_batchnorm_model(name):
    """A model converted for SyncBatchNorm folds like the plain one (FasterNet: every BN)."""
    model = _eval_model(name, embed_dim=16, depths=(1, 1, 2, 1))
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    fast = patnet.optimize_for_inference(converted)
    if name.startswith("fasternet"):
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in fast.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < INFERENCE_TOLERANCE


@pytest.mark.parametrize("name", ["fasternet_t0", "patnet_t0", "patnet_t1"])
def test_inference_path_on_fused_backend(name, fused_backend):
    small = dict(embed_dim=16, depths=(1, 1, 2, 1))
    model = _eval_model(name, **small).to(DEVICE)
    x = torch.randn(2, 3, 64, 64).to(DEVICE)
    if fused_backend == "cuda" and name == "patnet_t1":  # (no PAT_sp kernel: refused by name)
        with pytest.raises(pk.BackendUnavailableError,
                           match=r"backend='cuda' has no kernel for PAT_sp .*backend='triton'"):
            patnet.optimize_for_inference(model, backend=fused_backend)
        return
    fast = patnet.optimize_for_inference(model, backend=fused_backend)
    assert set(fast.backend_plan().values()) == {fused_backend}
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < 1e-5
    if fused_backend == "triton":  # PConv weights stored as the kernels read them: no copy
        _check_kernel_layouts(fast, model)
        # also after the usual AMP recipe's conversion, which re-strides every 4-d weight
        with torch.no_grad():
            expected = fast(x)
            fast = fast.to(memory_format=torch.channels_last)
            _check_kernel_layouts(fast, model)
            assert torch.equal(fast(x.contiguous(memory_format=torch.channels_last)), expected)
        # a conversion that changes nothing moves no weight (a CUDA graph keeps reading it)
        storage = {key: t.data_ptr() for key, t in fast.state_dict().items()}
        fast = fast.to(DEVICE, torch.float32)
        assert {key: t.data_ptr() for key, t in fast.state_dict().items()} == storage


def _check_kernel_layouts(fast: torch.nn.Module, model: torch.nn.Module) -> None:
    """The Triton inference copy's 3 x 3 conv weights are stored [tap, in, out] (forward_taps a
    view), the stem's and merging layers' [ky, kx, in, out], PAT_ch's W_ch contiguous: the
    kernels copy none of them per call. Values as the model's (folded where folding applies)."""
    from patnet_kernels.triton.partial_conv import forward_taps
    state = model.state_dict()
    checked = 0
    for key, weight in fast.state_dict().items():
        if key.endswith("partial_conv3.weight"):
            assert torch.equal(weight, state[key])
            assert forward_taps(weight).data_ptr() == weight.data_ptr(), key
            checked += 1
        elif key.endswith(("patch_embed.proj.weight", "reduction.weight")):
            assert weight.permute(2, 3, 1, 0).is_contiguous(), key
        elif key.endswith("cfc1.weight"):
            assert weight.is_contiguous(), key
    assert checked


def test_stem_and_merging_layers_hand_their_statistics(monkeypatch):
    """On Triton the stem and each merging layer run pk.patch_conv (weights stored [ky, kx,
    in, out]), and those before a stage that starts with a PAT_ch block take its statistics,
    so no block reads its X2 for them; features mode still returns each stage's map. Not for
    FasterNet, nor under a backend whose blocks take no statistics."""
    require_fused_backend("triton")
    from patnet_kernels.triton import channel_attention as channel_kernels

    model = _eval_model("patnet_t0", embed_dim=16, depths=(1, 1, 2, 1)).to(DEVICE)
    fast = patnet.optimize_for_inference(model, backend="triton")
    c1 = [stage.blocks[0].spatial_mixing.dim_conv3 for stage in fast.stages[::2]]
    assert fast.patch_embed.statistics_of == c1[0]
    assert [layer.statistics_of for layer in fast.stages[1::2]] == [c1[1], c1[2], None]
    weight = fast.patch_embed.proj.weight
    assert weight.permute(2, 3, 1, 0).is_contiguous()
    calls = []
    monkeypatch.setattr(channel_kernels, "channel_chunk_stats",
                        lambda *a: calls.append(a) or pytest.fail("X2 read for statistics"))
    x = torch.randn(2, 3, 64, 64).to(DEVICE)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < 1e-5
    features = _eval_model("patnet_t0", embed_dim=16, depths=(1, 1, 2, 1),
                           features_only=True).to(DEVICE)
    fast_features = patnet.optimize_for_inference(features, backend="triton")
    with torch.no_grad():
        for got, want in zip(fast_features(x), features(x)):
            assert rel_error(got, want) < 1e-5
    assert not calls
    for name, backend in (("fasternet_t0", "triton"), ("patnet_t0", "torch")):
        other = patnet.optimize_for_inference(
            _eval_model(name, embed_dim=16, depths=(1, 1, 2, 1)), backend=backend)
        layers = [other.patch_embed] + list(other.stages[1::2])
        assert all(layer.statistics_of is None for layer in layers)


@pytest.mark.parametrize("name", ["fasternet_t0", "patnet_t0", "patnet_t1"])
def test_triton_copy_runs_channels_last_from_an_nchw_image(name):
    """Under backend="triton" the stem writes channels_last from an NCHW image (no conversion
    pass), so every stage runs in the kernels' fast layout: each stage's map (features mode)
    is channels_last, the same values as the eval model's. Under "auto" the copy runs
    channels_last on the CPU too (the eval forms' oneDNN convolutions' layout) and keeps the
    input's layout on a GPU (each op decides from measurements of its own layout)."""
    require_fused_backend("triton")
    small = dict(embed_dim=16, depths=(1, 1, 2, 1), features_only=True)
    model = _eval_model(name, **small).to(DEVICE)
    x = torch.randn(2, 3, 64, 64).to(DEVICE)
    with torch.no_grad():
        want = model(x)
        auto_layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        for backend, layout in (("triton", torch.channels_last), ("auto", auto_layout)):
            maps = patnet.optimize_for_inference(model, backend=backend)(x)
            assert len(maps) == len(want) == 4
            for got, expected in zip(maps, want):
                assert got.is_contiguous(memory_format=layout), (backend, got.stride())
                assert rel_error(got, expected) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_self_attention_normalises_inside_its_projection(channels_last, monkeypatch):
    """On Triton each PAT_sf block's LayerNorm and qkv projection run as pk.layer_norm_linear,
    one launch of the patch conv's kernel with its LayerNorm prologue (no layer_norm op, no
    copy of X2), exact on both layouts."""
    require_fused_backend("triton")
    from patnet_kernels.triton import patch_conv as patch_kernels

    model = _eval_model("patnet_t0", embed_dim=16, depths=(1, 1, 2, 2)).to(DEVICE)
    x = torch.randn(2, 3, 64, 64).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fast = patnet.optimize_for_inference(model, backend="triton")
    with torch.no_grad():
        want = model(x)
    launch, normalised = patch_kernels.patch_conv, []

    def counted(*args, **kwargs):
        normalised.append(kwargs.get("eps") is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(patch_kernels, "patch_conv", counted)
    monkeypatch.setattr(torch.nn.functional, "layer_norm",
                        lambda *a, **k: pytest.fail("a LayerNorm ran on its own"))
    with torch.no_grad():
        assert rel_error(fast(x), want) < 1e-5
    assert sum(normalised) == 2  # (stage 4's two blocks)


def test_inference_path_channels_last():
    model = _eval_model("fasternet_t0").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_error(patnet.optimize_for_inference(model)(x), model(x)) < INFERENCE_TOLERANCE
    model = _eval_model("patnet_t0").to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_error(patnet.optimize_for_inference(model)(x), model(x)) < INFERENCE_TOLERANCE


@pytest.mark.parametrize("shape", [(1, 12, 7, 7), (3, 9, 5, 13), (2, 16, 1, 1), (2, 5, 1, 6)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("folded", [True, False], ids=["bn_a_folded", "bn_a"])
def test_channel_attention_eval_form_matches_reference(shape, affine, folded):
    """The CPU eval form of PAT_ch (BN_a folded into W_ch's bias, or applied to the logits)
    against the reference, in float64 (same formulas, other summation order) and float32
    against float64."""
    gen = torch.Generator().manual_seed(sum(shape))
    b, c, h, w = shape
    c1 = max(1, c // 4)
    c2 = c - c1

    def rand(*size, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset

    def bn():
        return pk.BatchNormParams(rand(c2, scale=0.3, offset=1.0) if affine else None,
                                  rand(c2, scale=0.2) if affine else None,
                                  rand(c2, scale=0.5), torch.rand(c2, generator=gen,
                                                                  dtype=torch.float64) + 0.5)

    x = rand(b, c, h, w, scale=2.0, offset=0.5)
    conv_w, cfc_w, cfc_b = rand(c1, c1, 3, 3, scale=0.3), rand(c2, c2, 1, 2, scale=0.3), rand(c2)
    bn_a, bn_b = (None if folded else bn()), bn()
    expected = reference.channel_attention(x, conv_w, cfc_w, cfc_b, bn_a, bn_b, False)
    result = eval_cpu.channel_attention(x, conv_w, cfc_w, cfc_b, bn_a, bn_b)
    assert torch.equal(result.isnan(), expected.isnan())
    if h * w == 1:  # unbiased std of one value: NaN in the X2 half only, as the reference
        assert result[:, c1:].isnan().all() and not result[:, :c1].isnan().any()
        result, expected = result[:, :c1], expected[:, :c1]
    assert rel_error(result, expected) < 1e-13

    def f32(bn_params):
        return None if bn_params is None else pk.BatchNormParams(
            *[None if t is None else t.float() for t in bn_params[:4]])

    as32 = [t.float() for t in (x, conv_w, cfc_w, cfc_b)]
    result32 = eval_cpu.channel_attention(*as32, f32(bn_a), f32(bn_b))
    if h * w > 1:
        assert rel_error(result32.double(), expected) < 2e-6


@pytest.mark.parametrize("shape, heads", [((1, 20, 7, 7), 3), ((2, 13, 5, 9), 2),
                                          ((1, 8, 1, 1), 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_self_mixer_eval_forms_match_reference(shape, heads, bias):
    """The CPU eval forms of PAT_sf's two ops (the attention by SDPA, the output written into
    one buffer) against the reference ops, float64."""
    gen = torch.Generator().manual_seed(sum(shape) + heads)
    b, c, h, w = shape
    c1 = c // 4
    c2, n = c - c1, h * w
    d = c2 // heads

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale

    q, k, v = (rand(b, heads, n, d) for _ in range(3))
    table, bucket = rand(heads, 81), pk.rpe_buckets(h, w)
    for scale in (None, 0.3):
        assert rel_error(eval_cpu.rpe_attention(q, k, v, table, bucket, scale),
                         reference.rpe_attention(q, k, v, table, bucket, scale)) < 1e-13
    x, conv_w, tokens = rand(b, c, h, w), rand(c1, c1, 3, 3, scale=0.3), rand(b, n, c2)
    proj_w, proj_b = rand(c2, c2, scale=0.3), rand(c2) if bias else None
    assert rel_error(eval_cpu.self_mixer_output(x, conv_w, tokens, proj_w, proj_b, None),
                     reference.self_mixer_output(x, conv_w, tokens, proj_w, proj_b, None)) < 1e-13



def _conv_eval_form_cases(gen: torch.Generator):
    """(op, args) of the eval forms whose work is convolutions, float64, odd shapes: PConv in
    place and not, the MLP with each activation, a residual, no biases and PAT_sp, the patch
    conv with each layout request and statistics, the LayerNorm + qkv on a channel slice."""
    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale

    def bn(c):
        return pk.BatchNormParams(rand(c, scale=0.3) + 1, rand(c, scale=0.2), rand(c, scale=0.5),
                                  torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)

    x = rand(2, 12, 5, 7)
    spatial = pk.SpatialAttentionParams(rand(1, 3, 1, 1), rand(9, 9, 1, 1, scale=0.3), rand(9),
                                        bn(3))
    unfolded = spatial._replace(conv_bias=None, bn_d=bn(9))  # (BN_d not folded into the conv)
    yield "partial_conv3x3", (x, rand(3, 3, 3, 3, scale=0.3), False)
    yield "partial_conv3x3", (x.clone(), rand(3, 3, 3, 3, scale=0.3), True)
    for activation, residual, biases, spatial_params in (
            ("relu", None, True, None), ("gelu", x, True, None), ("relu", x, False, None),
            ("gelu", x, True, spatial), ("relu", None, False, unfolded)):
        w1, w2 = rand(24, 12, 1, 1, scale=0.3), rand(12, 24, 1, 1, scale=0.2)
        b1, b2 = (rand(24), rand(12)) if biases else (None, None)
        yield "pointwise_mlp", (x, w1, b1, w2, b2, residual, activation, spatial_params)
    image = rand(2, 3, 16, 12)
    for statistics_of, channels_last in ((None, None), (None, False), (2, True)):
        yield "patch_conv", (image, rand(8, 3, 4, 4, scale=0.3), rand(8), statistics_of,
                             channels_last)
    yield "layer_norm_linear", (x[:, 3:], rand(27, 9, scale=0.3), rand(27), 1e-5)
    yield "layer_norm_linear", (x.to(memory_format=torch.channels_last)[:, 3:],
                                rand(27, 9, scale=0.3), None, 1e-6)


def _outputs(result):
    """An op's tensors, flattened (patch_conv with statistics: y, mean, squared deviations)."""
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(t for part in result for t in _outputs(part))


def test_conv_eval_forms_match_reference():
    """The eval forms of PConv, the MLP, the patch conv and PAT_sf's LayerNorm + qkv against
    the reference ops: float64 (F.conv2d, same formulas: 1e-13), and float32 with frozen
    weights (oneDNN's convolutions, where this torch has it) within 4x PyTorch's own float32
    error against float64; each output in the layout the op promises."""
    gen = torch.Generator().manual_seed(3)
    for op, args in _conv_eval_form_cases(gen):
        form, ref = getattr(eval_cpu, op), getattr(reference, op)
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        expected = _outputs(ref(*copies))
        result = _outputs(form(*[a.clone() if isinstance(a, torch.Tensor) else a
                                 for a in args]))
        for got, want in zip(result, expected, strict=True):
            assert rel_error(got, want) < 1e-13, op

        def as32(a, weights_frozen):  # (the tensors after x: weights, biases, residual)
            if isinstance(a, torch.Tensor):
                return frozen(a.float()) if weights_frozen and a is not args[0] \
                    else a.float().clone()
            if isinstance(a, pk.SpatialAttentionParams):
                def bn32(bn):
                    return None if bn is None else pk.BatchNormParams(*[t.float() for t in bn[:4]])
                return a.with_weights(lambda t: None if t is None else t.float())._replace(
                    bn_c=bn32(a.bn_c), bn_d=bn32(a.bn_d))
            return a
        torch32 = _outputs(ref(*[as32(a, False) for a in args]))
        ours32 = _outputs(form(*[as32(a, True) for a in args]))
        for got, theirs, want in zip(ours32, torch32, expected, strict=True):
            assert got.dtype == torch.float32
            budget = 4 * rel_error(theirs, want) + 1e-7
            assert rel_error(got, want) < budget, (op, rel_error(got, want), budget)
        if op == "pointwise_mlp" or op == "partial_conv3x3" and not args[2]:
            assert ours32[0].is_contiguous(memory_format=pk.ops._layout.memory_format_of(
                args[0])), op
        if op == "patch_conv" and args[4] is not None:
            layout = torch.channels_last if args[4] else torch.contiguous_format
            assert ours32[0].is_contiguous(memory_format=layout)
        if op == "layer_norm_linear":
            assert ours32[0].is_contiguous()


@pytest.mark.parametrize("name", ["patnet_t0", "fasternet_t0"])
def test_eval_forms_run_only_where_asked_and_applicable(name, monkeypatch):
    """The inference copy runs every op's CPU eval form on the CPU, whatever the input's layout
    (its mixers' eval_forms policy; the stem then writes channels_last); the eval model,
    float16 and a call needing a gradient run the reference."""
    ran = []
    forms = [op for op, declared in registry.OPS.items() if declared.eval_form]
    for op in forms:
        form = getattr(eval_cpu, op)
        monkeypatch.setattr(eval_cpu, op, lambda *a, _op=op, _form=form, **k:
                            ran.append(_op) or _form(*a, **k))
    model = _eval_model(name)
    x = torch.randn(1, 3, 64, 64)
    expected = {"patnet_t0": ["channel_attention", "layer_norm_linear", "patch_conv",
                              "pointwise_mlp", "rpe_attention", "self_mixer_output"],
                "fasternet_t0": ["partial_conv3x3", "patch_conv", "pointwise_mlp"]}[name]
    with torch.no_grad():
        model(x)
        assert ran == []
        fast = patnet.optimize_for_inference(model)
        for layout in (torch.contiguous_format, torch.channels_last):
            ran.clear()
            fast(x.contiguous(memory_format=layout))
            assert sorted(set(ran)) == expected
    t = torch.randn(2, 8, 5, 5)
    bn = pk.BatchNormParams(None, None, torch.zeros(6), torch.ones(6))
    ran.clear()
    pk.channel_attention(t.clone().requires_grad_(), torch.randn(2, 2, 3, 3),
                         torch.randn(6, 6, 1, 2), None, None, bn, eval_form=True)
    assert ran == []  # (a gradient will be taken)
    assert "float32 and float64" in registry.eval_form_refusal("channel_attention", t.half(),
                                                               False)
    assert registry.eval_form_refusal("spatial_attention", t, False) == \
        "spatial_attention has no CPU eval form"


def test_backend_plan_names_each_op_and_is_logged(caplog):
    model = patnet.create_model("patnet_t1", embed_dim=16, depths=(1, 1, 1, 1)).eval()
    plan = model.backend_plan()
    assert plan == {"channel_attention": "torch", "batch_norm_act": "torch",
                    "spatial_attention": "torch", "rpe_attention": "torch",
                    "self_mixer_output": "torch"}
    assert patnet.create_model("fasternet_t0").backend_plan() == {"partial_conv3x3": "torch",
                                                                   "batch_norm_act": "torch"}
    with caplog.at_level(logging.INFO, logger="patnet"):
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    lines = [r.getMessage() for r in caplog.records if r.name == "patnet"]
    assert lines == ["PATNet on cpu runs channel_attention -> torch, batch_norm_act -> torch, "
                     "spatial_attention -> torch, rpe_attention -> torch, self_mixer_output -> "
                     "torch"]


def test_backend_plan_of_fused_backends(fused_backend):
    options = dict(embed_dim=16, depths=(1, 1, 1, 1))
    plan = patnet.create_model("patnet_t0", backend=fused_backend, **options).backend_plan(
        DEVICE)
    # (the MLP's BatchNorm + activation: one op where the backend has it, else its modules)
    ops = ("channel_attention", "rpe_attention", "self_mixer_output") + (
        ("batch_norm_act",) if fused_backend in pk.registry.OPS["batch_norm_act"].backends
        else ())
    assert plan == {op: fused_backend for op in ops}


def test_cuda_graph_needs_a_cuda_example_input():
    model = _eval_model("fasternet_t0", embed_dim=16, depths=(1, 1, 1, 1))
    for bad, what in ((torch.zeros(1, 3, 32, 32), "cpu"), ("x", "str")):
        with pytest.raises(ValueError, match=rf"example_input must be a CUDA tensor .*got {what}"):
            patnet.optimize_for_inference(model, example_input=bad)


def test_compiled_copy_freezes_only_its_own_calls_and_equals_the_copy():
    """optimize_for_inference(compile=True) on the CPU (PATNet-T0 with one block per stage):
    the copy compiled by Inductor under freezing equals the uncompiled copy, in grad mode
    (run without a gradient: the input needs none), under torch.no_grad and
    torch.inference_mode, and for a second input shape; freezing is set during its calls
    only; a gradient to an input that requires one still flows; its other attributes are the
    copy's; compile with example_input, or a non-bool, is refused. With Inductor's C++
    wrapper (on the CPU by default), and with its Python wrapper where asked for."""
    import torch._inductor.config as inductor_config

    from patnet.wrappers import FrozenCompiledModel

    model = _eval_model("patnet_t0", embed_dim=16, depths=(1, 1, 1, 1))
    plain = patnet.optimize_for_inference(model)
    compiled = patnet.optimize_for_inference(model, compile=True)
    frozen_during_call = []
    real_forward = compiled.model.forward

    def spying_forward(x):  # (runs while dynamo traces: the setting the compile sees)
        frozen_during_call.append((inductor_config.freezing, inductor_config.cpp_wrapper))
        return real_forward(x)

    compiled.model.forward = spying_forward
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = plain(x)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            got = compiled(x)
        assert not got.requires_grad and rel_error(got, want) < 1e-5
    assert frozen_during_call and all(f == (True, True) for f in frozen_during_call)
    assert inductor_config.freezing is False and inductor_config.cpp_wrapper is False
    other = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert rel_error(compiled(other), plain(other)) < 1e-5
    needs_grad = x.clone().requires_grad_()
    compiled(needs_grad).sum().backward()
    assert needs_grad.grad is not None and needs_grad.grad.abs().sum() > 0
    assert compiled.optimized_for_inference and compiled.backend_plan() == plain.backend_plan()
    # Inductor's Python wrapper asked for: compiled anew (not the C++ wrapper's code), equal
    python_wrapper = FrozenCompiledModel(compiled.model, cpp_wrapper=False)
    frozen_during_call.clear()
    with torch.no_grad():
        assert rel_error(python_wrapper(x), want) < 1e-5
    assert frozen_during_call and all(f == (True, False) for f in frozen_during_call)
    with pytest.raises(TypeError, match=r"cpp_wrapper must be None, True or False, got 1"):
        FrozenCompiledModel(compiled.model, cpp_wrapper=1)
    assert list(compiled.state_dict()) == [f"model.{key}" for key in plain.state_dict()]
    with pytest.raises(TypeError, match=r"compile must be True or False, got 'yes'"):
        patnet.optimize_for_inference(model, compile="yes")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"compile=True and example_input .* choose one"):
            patnet.optimize_for_inference(model.cuda(), compile=True,
                                          example_input=torch.zeros(1, 3, 32, 32).cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU test")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_copy_on_a_gpu_equals_the_copy(backend):
    """optimize_for_inference(compile=True) on a GPU (its fused ops inside the compiled graph
    under "triton"), fp32 and fp16 autocast, channels_last: equal to the uncompiled copy."""
    model = _eval_model("patnet_t1", embed_dim=16, depths=(1, 1, 1, 1)).cuda()
    plain = patnet.optimize_for_inference(model, backend)
    compiled = patnet.optimize_for_inference(model, backend, compile=True)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    for dtype, budget in ((None, 1e-4), (torch.float16, 2e-2)):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float16,
                                             enabled=dtype is not None):
            assert rel_error(compiled(x), plain(x)) < budget, dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replays_the_inference_model(backend):
    """The graphed copy equals the plain one for fresh inputs (fp16 autocast, channels_last),
    returns a new tensor per call, refuses another shape or autocast state, and one built
    under torch.inference_mode replays outside it."""
    model = _eval_model("patnet_t0").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        plain = patnet.optimize_for_inference(model, backend)
        graphed = patnet.optimize_for_inference(model, backend, example_input=x)
        for seed in (1, 2):
            fresh = torch.randn(x.shape, device="cuda",
                                generator=torch.Generator("cuda").manual_seed(seed))
            fresh = fresh.contiguous(memory_format=torch.channels_last)
            first = graphed(fresh)
            assert torch.equal(first, graphed(fresh)) and first is not graphed(fresh)
            assert rel_error(first, plain(fresh)) < 1e-3
        with pytest.raises(ValueError, match="captured for"):
            graphed(x[:2])
    with pytest.raises(ValueError, match="autocast"):
        graphed(x)
    assert graphed.backend_plan() == plain.backend_plan()
    # built under torch.inference_mode, replayed outside it (each call writes its input)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        built_inside = patnet.optimize_for_inference(model, backend, example_input=x)
    with torch.autocast("cuda", dtype=torch.float16):
        assert rel_error(built_inside(x), graphed(x)) < 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_inference_copy_made_under_inference_mode(backend):
    """``optimize_for_inference`` called under ``torch.inference_mode``, and a first autocast
    forward there (which makes the frozen weights' casts, kept for later calls), give a copy
    that works outside it as one made outside: its tensors are ordinary tensors, it converts
    to channels_last and, but on Triton (whose fused stem computes no gradient and says so), it
    passes an input gradient under autocast. Before, the fused backends' copies failed outside
    ("Inference tensors do not track version counter") and the kept casts could not be saved
    for backward."""
    if backend != "torch":
        require_fused_backend(backend)
    model = _eval_model("patnet_t0", embed_dim=16, depths=(1, 1, 1, 1)).to(DEVICE)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected = patnet.optimize_for_inference(model, backend=backend)(x)
    with torch.inference_mode():
        fast = patnet.optimize_for_inference(model, backend=backend)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            fast(x)
    assert not any(t.is_inference() for t in fast.state_dict().values())
    with torch.no_grad():
        assert torch.equal(fast(x), expected)
        fast = fast.to(memory_format=torch.channels_last)
        assert rel_error(fast(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
    if backend != "triton":
        x_in = x.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = fast(x_in)
        out.float().sum().backward()
        assert x_in.grad is not None and torch.isfinite(x_in.grad).all()


def test_frozen_parameters_are_cast_once_under_autocast():
    """The functional API's autocast casts a frozen parameter (an inference copy's) once and
    reuses the copy until the parameter changes; other tensors are cast per call."""
    from patnet_kernels.functional import _autocast_copy

    half = torch.bfloat16
    weight = frozen(torch.randn(4, 4, 1, 1))
    first = _autocast_copy(weight, half)
    assert first.dtype == half and torch.equal(first, weight.to(half))
    assert _autocast_copy(weight, half) is first
    with torch.no_grad():
        weight.mul_(2)  # (an in-place change: a new version)
    again = _autocast_copy(weight, half)
    assert again is not first and torch.equal(again, weight.to(half))
    weight.data = torch.randn(4, 4, 1, 1)  # (new storage)
    assert torch.equal(_autocast_copy(weight, half), weight.to(half))
    trained, plain = torch.nn.Parameter(torch.randn(3)), torch.randn(3)
    for t in (trained, plain):
        assert _autocast_copy(t, half) is not _autocast_copy(t, half)
    kept = _autocast_copy(weight, half)
    weight.requires_grad_(True)  # (unfrozen after its cast was kept: cast per call again)
    assert _autocast_copy(weight, half) is not kept


def test_frozen_casts_are_freed_with_their_parameter():
    """What FrozenDerived keeps for a parameter goes when the parameter does (its table is
    keyed by id, so a later parameter at the same address must not find it)."""
    import gc

    from patnet_kernels._types import FrozenDerived

    derived = FrozenDerived()
    weight = frozen(torch.randn(4))
    assert derived.get(weight, "twice", lambda p: p * 2) is derived.kept(weight, "twice")
    assert len(derived._kept) == 1
    del weight
    gc.collect()
    assert len(derived._kept) == 0
