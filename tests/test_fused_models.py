"""Whole models on each fused backend (Triton, CUDA): the reference model's numbers, and the
authors' vectors.

On the CPU (CI) under the Triton interpreter and the CUDA kernels' CPU emulation; compiled on a
GPU. Dropouts are off where two backends are compared (their random streams differ by design);
drop-path is 0 in these configs. The CUDA backend has no PAT_sp kernel: a model with spatial
attention (PATNet-T1, the authors' "sp" case) must refuse backend="cuda" with a clear error.
"""
from __future__ import annotations

import pytest
import torch

import patnet
from patnet.layers import PartialSpatialAttention
from patnet.testing import randomize_norms
from patnet_kernels import BackendUnavailableError

from conftest import DEVICE, authors_reference_dir, rel_error
from test_authors_reference import CASES, build, check_against_authors

SMALL = dict(drop_path_rate=0.0)
# One ReLU kink: in this case one pre-activation of stage 1's MLP is 3.3e-7 (float64) and the
# CUDA kernels' float32 rounding (as accurate as the reference's: PAT_ch output 5e-7) makes it
# -1.6e-7, so ReLU drops its gradient: input gradient 4.5e-4 off, over the authors' 2e-5 budget.
# Which fp32 implementation meets a kink is chance (Triton's and torch's do not here).
RELU_KINK = ("a ReLU sign flip at a pre-activation of 3e-7 in fp32 (rounding, not a kernel "
             "error) puts the input gradient over the authors' fp32 budget")


def _refused(backend: str, reference: torch.nn.Module, make) -> bool:
    """Whether ``backend`` lacks a kernel that ``reference`` needs (PAT_sp on CUDA); if so,
    checks that making the model on it, ``make()``, refuses with the way out."""
    if backend != "cuda" or not any(isinstance(m, PartialSpatialAttention)
                                    for m in reference.modules()):
        return False
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' has no kernel for "
                                                      r".*spatial_attention.*backend='triton'"):
        make()
    return True


def _forward_backward(model, x, grad):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["fasternet_t0", "patnet_t0", "patnet_t1"])
def test_model_matches_reference_model(name, mode, fused_backend):
    options = dict(SMALL) if name.startswith("fasternet") else dict(SMALL, attn_drop=0.0,
                                                                    proj_drop=0.0)
    torch.manual_seed(0)
    reference = patnet.create_model(name, backend="torch", **options).to(DEVICE)
    if _refused(fused_backend, reference,
                lambda: patnet.create_model(name, backend=fused_backend, **options)):
        return
    randomize_norms(reference, seed=1)
    ours = patnet.create_model(name, backend=fused_backend, **options).to(DEVICE)
    ours.load_state_dict(reference.state_dict())
    reference.train(mode == "train")
    ours.train(mode == "train")
    gen = torch.Generator().manual_seed(2)
    # batch 3: at batch 2, training BN_a's output is +-1 whatever its input, and the
    # gradients through it are rounding noise
    x = torch.randn(3, 3, 64, 64, generator=gen).to(DEVICE)
    grad = torch.randn(3, 1000, generator=gen).to(DEVICE)
    out_r, gx_r, gp_r = _forward_backward(reference, x, grad)
    out_o, gx_o, gp_o = _forward_backward(ours, x, grad)
    assert rel_error(out_o, out_r) < 1e-5
    assert rel_error(gx_o, gx_r) < 1e-4
    largest = max(g.norm().item() for g in gp_r.values())
    for key, g in gp_r.items():
        assert rel_error(gp_o[key], g, floor=1e-3 * largest) < 1e-4, key
    if mode == "train":  # the fused BatchNorm statistics updated the same running buffers
        for key, value in reference.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                assert rel_error(ours.state_dict()[key], value) < 1e-5, key


@pytest.fixture(scope="module")
def vectors():
    root = authors_reference_dir()
    return {case: torch.load(root / f"{case}.pt", weights_only=False) for case in CASES}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", CASES)
def test_fused_model_reproduces_authors_vectors(vectors, name, mode, fused_backend, request):
    """float32 on each fused backend, with the authors' float32 budgets (train mode runs the
    fused BatchNorm batch statistics and updates)."""
    case = vectors[name]
    model = build(case, mode, torch.float32)
    if _refused(fused_backend, model, lambda: patnet.set_backend(model, fused_backend)):
        return
    if (fused_backend, name, mode) == ("cuda", "patnet_tiny_relu_224", "train"):
        request.applymarker(pytest.mark.xfail(strict=False, reason=RELU_KINK))
    model = patnet.set_backend(model, fused_backend).to(DEVICE)
    check_against_authors(model, case, mode, torch.float32, DEVICE)
