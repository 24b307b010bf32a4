"""The inference path (``patnet.optimize_for_inference``) and the backend plan of a model.

Every variant's inference copy equals its eval model (float32, random BatchNorm statistics) on
the CPU path (the reference ops, PAT_ch and PAT_sf in their eval forms, in-place PConv); the
fused backends' inference copies on small models under the Triton interpreter / CUDA
emulation; the eval forms of PAT_ch and PAT_sf against the reference ops, odd shapes and
H * W = 1 included.
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
from patnet_kernels.eval_cpu import channel_attention_eval, self_mixer_eval

from conftest import DEVICE, rel_error

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
    if fused_backend == "cuda" and name == "patnet_t1":
        pytest.skip("the CUDA backend has no PAT_sp kernel (PATNet-T1 refuses it)")
    small = dict(embed_dim=16, depths=(1, 1, 2, 1))
    model = _eval_model(name, **small).to(DEVICE)
    x = torch.randn(2, 3, 64, 64).to(DEVICE)
    fast = patnet.optimize_for_inference(model, backend=fused_backend)
    assert set(fast.backend_plan().values()) == {fused_backend}
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) < 1e-5


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
def test_channel_attention_eval_form_matches_reference(shape, affine):
    """The CPU eval form of PAT_ch (BN_a folded into W_ch's bias) against the reference, in
    float64 (same formulas, other summation order) and float32 against float64."""
    gen = torch.Generator().manual_seed(sum(shape))
    b, c, h, w = shape
    c1 = max(1, c // 4)
    c2 = c - c1

    def rand(*size, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset

    x = rand(b, c, h, w, scale=2.0, offset=0.5)
    conv_w, cfc_w, cfc_b = rand(c1, c1, 3, 3, scale=0.3), rand(c2, c2, 1, 2, scale=0.3), rand(c2)
    bn_b = pk.BatchNormParams(rand(c2, scale=0.3, offset=1.0) if affine else None,
                              rand(c2, scale=0.2) if affine else None,
                              rand(c2, scale=0.5), torch.rand(c2, generator=gen,
                                                              dtype=torch.float64) + 0.5)
    expected = reference.channel_attention(x, conv_w, cfc_w, cfc_b, None, bn_b, False)
    result = channel_attention_eval(x, conv_w, cfc_w, cfc_b, bn_b)
    assert torch.equal(result.isnan(), expected.isnan())
    if h * w == 1:  # unbiased std of one value: NaN in the X2 half only, as the reference
        assert result[:, c1:].isnan().all() and not result[:, :c1].isnan().any()
        result, expected = result[:, :c1], expected[:, :c1]
    assert rel_error(result, expected) < 1e-13
    as32 = [t.float() for t in (x, conv_w, cfc_w, cfc_b)]
    bn32 = pk.BatchNormParams(*[None if t is None else t.float() for t in bn_b[:4]])
    result32 = channel_attention_eval(*as32, bn32)
    if h * w > 1:
        assert rel_error(result32.double(), expected) < 2e-6


@pytest.mark.parametrize("shape, heads", [((1, 20, 7, 7), 3), ((2, 13, 5, 9), 2),
                                          ((1, 8, 1, 1), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_self_mixer_eval_form_matches_reference(shape, heads, affine):
    """The CPU eval form of PAT_sf against the reference ops composed as SPEC.md section 4
    states them (LayerNorm2d, qkv, rpe_attention, merge, self_mixer_output), float64."""
    gen = torch.Generator().manual_seed(sum(shape) + heads)
    b, c, h, w = shape
    c1 = c // 4
    c2, n = c - c1, h * w
    d = c2 // heads

    def rand(*size, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset

    x, conv_w = rand(b, c, h, w), rand(c1, c1, 3, 3, scale=0.3)
    ln_w, ln_b = (rand(c2, scale=0.3, offset=1.0), rand(c2, scale=0.2)) if affine else (None, None)
    qkv_w, qkv_b = rand(3 * c2, c2, scale=0.3), rand(3 * c2, scale=0.1) if affine else None
    table, bucket = rand(heads, 81), pk.rpe_buckets(h, w)
    proj_w, proj_b = rand(c2, c2, scale=0.3), rand(c2) if affine else None
    scale = d ** -0.5

    tokens = torch.nn.functional.layer_norm(x[:, c1:].permute(0, 2, 3, 1), (c2,), ln_w, ln_b,
                                            1e-6).permute(0, 3, 1, 2).reshape(b, c2, n)
    qkv = torch.nn.functional.linear(tokens.transpose(1, 2), qkv_w, qkv_b)
    q, k, v = qkv.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    merged = reference.rpe_attention(q, k, v, table, bucket, scale).transpose(1, 2)
    expected = reference.self_mixer_output(x, conv_w, merged.reshape(b, n, c2), proj_w, proj_b,
                                           None)
    result = self_mixer_eval(x, conv_w, ln_w, ln_b, 1e-6, qkv_w, qkv_b, table, bucket, heads,
                             scale, proj_w, proj_b)
    assert rel_error(result, expected) < 1e-13


def test_channel_attention_eval_form_refuses_other_layouts():
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    bn = pk.BatchNormParams(None, None, torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="NCHW-contiguous.*patnet_kernels.channel_attention for other"):
        channel_attention_eval(x, torch.randn(2, 2, 3, 3), torch.randn(6, 6, 1, 2), None, bn)


def test_backend_plan_names_each_op_and_is_logged(caplog):
    model = patnet.create_model("patnet_t1", embed_dim=16, depths=(1, 1, 1, 1)).eval()
    plan = model.backend_plan()
    assert plan == {"channel_attention": "torch", "spatial_attention": "torch",
                    "rpe_attention": "torch", "self_mixer_output": "torch"}
    assert patnet.create_model("fasternet_t0").backend_plan() == {"partial_conv3x3": "torch"}
    with caplog.at_level(logging.INFO, logger="patnet"):
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    lines = [r.getMessage() for r in caplog.records if r.name == "patnet"]
    assert lines == ["PATNet on cpu runs channel_attention -> torch, spatial_attention -> "
                     "torch, rpe_attention -> torch, self_mixer_output -> torch"]


def test_backend_plan_of_fused_backends(fused_backend):
    options = dict(embed_dim=16, depths=(1, 1, 1, 1))
    plan = patnet.create_model("patnet_t0", backend=fused_backend, **options).backend_plan(
        DEVICE)
    assert plan == {op: fused_backend for op in ("channel_attention", "rpe_attention",
                                                 "self_mixer_output")}
