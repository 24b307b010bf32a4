"""The 12 released variants: sizes, FLOPs, state_dict layout, folding, training, options."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import patnet
import patnet_kernels as pk
from patnet.layers import DropPath, LayerNorm2d
from patnet.testing import randomize_norms
from patnet_kernels import functional

from conftest import DEVICE, rel_error, require_fused_backend

# SPEC.md section 5: exact parameter counts and FLOPs at 224 x 224 (fvcore convention).
SPEC_TABLE = {
    "patnet_t0": (3_486_160, 0.235e9), "patnet_t1": (6_144_552, 0.546e9),
    "patnet_t2": (12_269_816, 1.039e9), "patnet_s": (28_013_304, 2.716e9),
    "patnet_m": (59_179_000, 6.692e9), "patnet_l": (100_641_336, 11.909e9),
    "fasternet_t0": (3_905_500, 0.34e9), "fasternet_t1": (7_595_368, 0.85e9),
    "fasternet_t2": (14_982_888, 1.91e9), "fasternet_s": (31_181_032, 4.56e9),
    "fasternet_m": (53_521_464, 8.74e9), "fasternet_l": (93_465_192, 15.52e9),
}
SPEC_WIDTHS = {"patnet_t0": 32, "patnet_t1": 48, "patnet_t2": 64, "patnet_s": 96,
               "patnet_m": 128, "patnet_l": 160, "fasternet_t0": 40, "fasternet_t1": 64,
               "fasternet_t2": 96, "fasternet_s": 128, "fasternet_m": 144, "fasternet_l": 192}
SPEC_DEPTHS = {"patnet_t0": (1, 2, 8, 2), "patnet_t1": (1, 2, 8, 2), "patnet_t2": (2, 2, 6, 4),
               "patnet_s": (2, 2, 9, 4), "patnet_m": (2, 3, 16, 4), "patnet_l": (2, 3, 20, 4),
               "fasternet_t0": (1, 2, 8, 2), "fasternet_t1": (1, 2, 8, 2),
               "fasternet_t2": (1, 2, 8, 2), "fasternet_s": (1, 2, 13, 2),
               "fasternet_m": (3, 4, 18, 3), "fasternet_l": (3, 4, 18, 3)}


def meta_model(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return patnet.create_model(name, **overrides).eval()


def test_list_models():
    assert patnet.list_models() == list(SPEC_TABLE)


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_params_exact_and_flops_within_2_percent(name):
    params, flops = SPEC_TABLE[name]
    model = meta_model(name)
    assert patnet.count_params(model) == params
    assert abs(patnet.count_flops(model) / flops - 1) < 0.02


def bn_keys(prefix: str, channels: int) -> dict:
    keys = {f"{prefix}.{s}": (channels,) for s in ("weight", "bias", "running_mean",
                                                     "running_var")}
    keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def spec_state_dict_shapes(family: str, e: int, depths, spatial: bool, heads: int = 4) -> dict:
    """SPEC.md section 6, written out independently of the model code."""
    keys = {"patch_embed.proj.weight": (e, 3, 4, 4), **bn_keys("patch_embed.norm", e)}
    for i, depth in enumerate(depths):
        c = e * 2 ** i
        c1, c2 = c // 4, c - c // 4
        for j in range(depth):
            p = f"stages.{2 * i}.blocks.{j}."
            keys[p + "spatial_mixing.partial_conv3.weight"] = (c1, c1, 3, 3)
            if family == "patnet" and i < 3:
                keys[p + "spatial_mixing.attn.cfc1.weight"] = (c2, c2, 1, 2)
                keys.update(bn_keys(p + "spatial_mixing.attn.bn", c2))
                keys.update(bn_keys(p + "spatial_mixing.norm", c2))
            elif family == "patnet":
                keys[p + "spatial_mixing.attn.qkv.weight"] = (3 * c2, c2)
                keys[p + "spatial_mixing.attn.proj.weight"] = (c2, c2)
                keys[p + "spatial_mixing.attn.proj.bias"] = (c2,)
                keys[p + "spatial_mixing.attn.rpe_k.lookup_table_bias"] = (heads, 81)
                keys[p + "spatial_mixing.norm.weight"] = (c2,)
                keys[p + "spatial_mixing.norm.bias"] = (c2,)
            keys[p + "mlp.0.weight"] = (2 * c, c, 1, 1)
            keys.update(bn_keys(p + "mlp.1", 2 * c))
            keys[p + "mlp.3.weight"] = (c, 2 * c, 1, 1)
            if spatial:
                half = c // 2
                keys[p + "mlp.4.conv_attn.weight"] = (1, c - half, 1, 1)
                keys.update(bn_keys(p + "mlp.4.norm", c - half))
                keys[p + "mlp.4.conv.weight"] = (half, half, 1, 1)
                keys.update(bn_keys(p + "mlp.4.norm2", half))
        if i < len(depths) - 1:
            keys[f"stages.{2 * i + 1}.reduction.weight"] = (2 * c, c, 2, 2)
            keys.update(bn_keys(f"stages.{2 * i + 1}.norm", 2 * c))
    keys["avgpool_pre_head.1.weight"] = (1280, e * 8, 1, 1)
    keys["head.weight"] = (1000, 1280)
    keys["head.bias"] = (1000,)
    return keys


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_state_dict_keys_and_shapes_match_spec(name):
    family = name.split("_")[0]
    expected = spec_state_dict_shapes(family, SPEC_WIDTHS[name], SPEC_DEPTHS[name],
                                      spatial=name == "patnet_t1")
    got = {k: tuple(v.shape) for k, v in meta_model(name).state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_folded_model_equals_eval_model(name):
    torch.manual_seed(0)
    model = randomize_norms(patnet.create_model(name), seed=1).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fused = patnet.fuse_for_inference(model)
        got = fused(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # The original is untouched, and the copy really is folded.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    remaining = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    allowed = ("spatial_mixing.norm", "mlp.4.norm")  # BN_b, BN_c: applied inside their ops
    assert all(n.endswith(allowed) for n in remaining), remaining
    assert not any(isinstance(m, LayerNorm2d) and m.elementwise_affine for m in fused.modules())
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fused.train()


def test_folding_features_mode_and_float64():
    torch.manual_seed(0)
    model = randomize_norms(patnet.create_model("patnet_t1", features_only=True), 2).double()
    model.eval()
    x = torch.randn(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        got = patnet.fuse_for_inference(model)(x)
    for a, b in zip(got, expected):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-12


@pytest.mark.parametrize("name", ["patnet_t1", "patnet_t0", "fasternet_t0"])
def test_every_parameter_gets_a_finite_gradient_in_training(name):
    torch.manual_seed(0)
    model = randomize_norms(patnet.create_model(name, drop_path_rate=0.1), 3).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    for key, param in model.named_parameters():
        assert param.grad is not None, key
        assert torch.isfinite(param.grad).all(), key
    if name.startswith("patnet"):
        tables = [p for k, p in model.named_parameters() if k.endswith("lookup_table_bias")]
        assert tables and all(t.grad.abs().sum() > 0 for t in tables)


def test_features_mode():
    model = patnet.create_model("patnet_t0", features_only=True).eval()
    assert not hasattr(model, "head") and not hasattr(model, "avgpool_pre_head")
    norms = [k for k in model.state_dict() if k.startswith("norm")]
    assert sorted({k.split(".")[0] for k in norms}) == ["norm0", "norm2", "norm4", "norm6"]
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        feats = model(x)
        assert [tuple(f.shape) for f in feats] == [(2, 32, 32, 24), (2, 64, 16, 12),
                                                   (2, 128, 8, 6), (2, 256, 4, 3)]
        model.norm4.bias.add_(1.0)  # each output goes through its own BN
        moved = model(x)
    assert torch.equal(moved[0], feats[0]) and torch.equal(moved[1], feats[1])
    assert torch.allclose(moved[2], feats[2] + 1.0, atol=1e-5)


def test_every_hyper_parameter_can_be_overridden():
    model = patnet.create_model("patnet_t0", embed_dim=24, depths=(1, 1, 2, 1),
                                act_layer="RELU", n_div=3, mlp_ratio=3.0, num_heads=8,
                                use_spatial_attn=True, feature_dim=100, num_classes=7,
                                drop_path_rate=0.3, attn_drop=0.2, proj_drop=0.05)
    sd = model.state_dict()
    assert sd["patch_embed.proj.weight"].shape[0] == 24
    assert sd["stages.0.blocks.0.spatial_mixing.partial_conv3.weight"].shape[0] == 24 // 3
    assert sd["stages.0.blocks.0.mlp.0.weight"].shape[0] == 72
    assert "stages.0.blocks.0.mlp.4.conv.weight" in sd
    assert sd["stages.6.blocks.0.spatial_mixing.attn.rpe_k.lookup_table_bias"].shape == (8, 81)
    assert sd["avgpool_pre_head.1.weight"].shape == (100, 192, 1, 1)
    assert sd["head.weight"].shape == (7, 100)
    assert len(model.stages[4].blocks) == 2
    assert isinstance(model.stages[0].blocks[0].mlp[2], nn.ReLU)
    assert isinstance(model.stages[6].blocks[0].drop_path, DropPath)
    assert model.stages[6].blocks[0].drop_path.p == pytest.approx(0.3)
    attn = model.stages[6].blocks[0].spatial_mixing.attn
    assert attn.attn_drop == 0.2 and attn.proj_drop.p == 0.05
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert isinstance(patnet.create_model("fasternet_t0", act_layer="GELU")
                      .stages[0].blocks[0].mlp[2], nn.GELU)
    assert isinstance(patnet.create_model("fasternet_t0", num_classes=0).head, nn.Identity)


def test_pretrained_checkpoint_loads_strictly(tmp_path):
    source = randomize_norms(patnet.create_model("patnet_t0"), 4)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = patnet.create_model("patnet_t0", pretrained_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"state_dict": {"head.weight": torch.zeros(1)}}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        patnet.create_model("patnet_t0", pretrained_path=str(path))


def test_set_backend_and_backend_errors(monkeypatch):
    model = patnet.create_model("patnet_t0", backend="torch")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}
    patnet.set_backend(model, "auto")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"auto"}
    with pytest.raises(pk.BackendUnavailableError, match="no kernel for PAT_sp"):
        patnet.create_model("patnet_t1", backend="cuda")
    with pytest.raises(pk.BackendUnavailableError, match="no kernel for PAT_sp"):
        patnet.set_backend(patnet.create_model("patnet_t1", backend="torch"), "cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("PATNET_CUDA_EMULATE", "0")
        with pytest.raises(pk.BackendUnavailableError, match="cuda"):
            patnet.create_model("patnet_t0", backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        patnet.create_model("patnet_t0", backend="tensorrt")


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        patnet.create_model("patnet_xl")
    for name in SPEC_TABLE:
        assert name in str(err.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match="no option num_heads.*valid options: act_layer"):
        patnet.create_model("fasternet_t0", num_heads=4)
    with pytest.raises(ValueError, match="unknown activation"):
        patnet.create_model("patnet_t0", act_layer="swish")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        patnet.create_model("patnet_t0", num_heads=5)


@pytest.mark.parametrize("option, match", [
    (dict(depths=2), r"depths must be a sequence of blocks per stage, e.g. \(2, 2, 6, 4\), got 2"),
    (dict(depths=(1, 0, 1, 1)), "each of depths must be a positive integer, got 0"),
    (dict(embed_dim="16"), "embed_dim must be a positive integer, got '16'"),
    (dict(embed_dim=16.5), "embed_dim must be a positive integer, got 16.5"),
    (dict(mlp_ratio=0), "mlp_ratio=0 leaves the MLP no hidden channel"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio must be a finite number >= 0, got inf"),
    (dict(embed_dim=16, mlp_ratio=0.01), "leaves the MLP no hidden channel"),
    (dict(feature_dim=0), "feature_dim must be a positive integer, got 0"),
    (dict(num_classes=-1), r"num_classes must be an integer >= 0 \(0: no classifier"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be a number in \[0, 1\), got 1.5"),
])
def test_bad_option_is_refused_before_the_model_is_built(option, match):
    """An override of the wrong type or range says which and what it takes, where it used
    to fail deep inside the build (``depths=2``: "'int' object is not iterable") or only at
    the first forward (``mlp_ratio=0``), or to build something else (``num_classes=-1``: no
    head)."""
    with pytest.raises(ValueError, match=match):
        patnet.create_model("patnet_t0", **option)


@pytest.mark.parametrize("taker", ["fuse_for_inference", "optimize_for_inference",
                                   "set_backend"])
def test_a_non_model_is_refused_by_name(taker):
    call = (functools.partial(patnet.set_backend, backend="torch") if taker == "set_backend"
            else getattr(patnet, taker))
    for thing in (None, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=rf"{taker} takes a PATNet or FasterNet \(e.g. "
                                            rf"patnet.create_model\('patnet_t2'\)\), got "
                                            rf"{type(thing).__name__}"):
            call(thing)


def test_model_from_config_refuses_what_it_cannot_build():
    with pytest.raises(TypeError, match="config must be a dict of model options, got NoneType"):
        patnet.model_from_config(None)
    with pytest.raises(ValueError, match=r"names a variant \('patnet_t2'\): build it with "
                                         r"patnet.create_model\('patnet_t2', \*\*options\)"):
        patnet.model_from_config({"name": "patnet_t2", "embed_dim": 16})
    model = patnet.model_from_config({"family": "fasternet", "embed_dim": 16, "num_heads": 4})
    assert model.family == "fasternet" and model.num_features == 16 * 8  # (T0's 4 stages)


def test_folding_a_folded_model_copies_it():
    """``fuse_for_inference`` of a model it already folded (or of an inference copy) returns a
    copy of it, equal in output, where it used to fail on the missing BatchNorms."""
    model = randomize_norms(patnet.create_model("patnet_t0", num_classes=10), seed=0).eval()
    folded = patnet.fuse_for_inference(model)
    again = patnet.fuse_for_inference(folded)
    assert again is not folded and again.fused_for_inference
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))
        assert rel_error(patnet.fuse_for_inference(patnet.optimize_for_inference(model))(x),
                         model(x)) < 1e-5


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(3, 64, 64), ValueError, r"expects images \(B, 3, H, W\)"),
    (torch.randn(2, 4, 64, 64), ValueError, "expects 3 input channels, got 4"),
    (torch.randn(2, 3, 64, 16), ValueError, "too small"),
    (torch.randn(2, 3, 64, 64, dtype=torch.float64), TypeError, "model is torch.float32"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), TypeError,
     r"takes torch.float32 images; convert them, e.g. x.to\(torch.float32\)"),
    (torch.randn(2, 3, 64, 64, device="meta"), ValueError, "is on meta but the model is on cpu"),
    (torch.randn(1, 3, 64, 64), ValueError, "batch of at least 2"),
])
def test_bad_model_input_raises_and_changes_nothing(bad, error, match):
    model = patnet.create_model("patnet_t0").train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        model(bad)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mixer_with_bad_input_does_not_count_a_batch():
    mixer = patnet.create_model("patnet_t1").stages[0].blocks[0].spatial_mixing.train()
    before = copy.deepcopy(mixer.state_dict())
    with pytest.raises(ValueError, match="cfc_weight must have shape"):
        mixer(torch.randn(2, 40, 8, 8))  # 40 channels, built for 48
    for key, value in mixer.state_dict().items():
        assert torch.equal(value, before[key]), key
    mixer(torch.randn(2, 48, 8, 8))
    assert int(mixer.norm.num_batches_tracked) == int(before["norm.num_batches_tracked"]) + 1


def test_cumulative_momentum_matches_batchnorm():
    """momentum=None (cumulative average) behaves as in nn.BatchNorm2d."""
    torch.manual_seed(0)
    block = patnet.create_model("patnet_t1").stages[0].blocks[0].mlp[4].train()
    reference = copy.deepcopy(block.norm2)
    block.norm2.momentum = reference.momentum = None
    for _ in range(3):
        m = torch.randn(2, 48, 5, 5)
        block(m)
        reference(m[:, 24:])
    assert torch.allclose(block.norm2.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(block.norm2.running_var, reference.running_var, atol=1e-6)
    assert int(block.norm2.num_batches_tracked) == 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_drop_path_add_to_is_residual_plus_drop_path(channels_last):
    """add_to(residual, x) is residual + DropPath(x) (the same mask from the same generator
    state: a dropped sample gets the residual exactly, a kept one residual + x / keep) in one
    op that keeps the residual's layout; inactive (eval, p = 0) it is residual + x."""
    drop = DropPath(0.5).train()
    residual, x = torch.randn(8, 4, 3, 5), torch.randn(8, 4, 3, 5)
    if channels_last:
        residual = residual.to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    got = drop.add_to(residual, x)
    torch.manual_seed(3)
    expected = residual + drop(x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    dropped = (got - residual).flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < 8  # (seed 3 drops some samples and keeps others)
    assert torch.allclose(got[~dropped], residual[~dropped] + 2 * x[~dropped], atol=1e-6)
    for inactive in (DropPath(0.5).eval(), DropPath(0.0).train()):
        assert torch.equal(inactive.add_to(residual, x), residual + x)
        assert inactive(x) is x
    x.requires_grad_(True)
    torch.manual_seed(3)
    drop.add_to(residual, x).sum().backward()
    assert torch.equal(x.grad[dropped], torch.zeros_like(x[dropped]))
    assert torch.allclose(x.grad[~dropped], torch.full_like(x[~dropped], 2.0))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_training_after_an_inference_mode_forward(backend, monkeypatch):
    """A forward under ``torch.inference_mode`` (a validation loop's; Lightning's sanity check
    before training) at a token grid other than the 7 x 7 that PAT_sf keeps makes that grid's
    bucket map, cached for later calls; a training step at that grid then saves it for
    backward. What the package keeps across calls is made outside inference mode, so the step
    runs (it raised "Inference tensors cannot be saved for backward")."""
    if backend != "torch":
        require_fused_backend(backend)
    monkeypatch.setattr(functional, "_BUCKET_CACHE", {})  # (this grid's map first made below)
    torch.manual_seed(0)
    model = patnet.create_model("patnet_t0", backend=backend, embed_dim=16,
                                depths=(1, 1, 1, 1)).to(DEVICE)
    x = torch.randn(2, 3, 96, 64).to(DEVICE)  # stage 4: a 3 x 2 token grid
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_jit_trace_is_refused_with_what_to_use_instead():
    """TorchScript tracing (deprecated by PyTorch) turns the input's sizes into tensors, which
    the token grid and the kernels' launch parameters cannot take: a clear error naming
    torch.export and torch.compile (both tested: test_fused_compile.py, and below)."""
    model = patnet.create_model("patnet_t0", embed_dim=16, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot trace PATNet .* "
                                           r"torch.export.export\(model, \(x,\)\)"):
        torch.jit.trace(model, x)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))
