"""torch.compile(fullgraph=True) of PATNet blocks on each fused backend (Triton, CUDA): no graph
break, and the compiled block equals the eager one, output and gradients, in training mode."""
from __future__ import annotations

import pytest
import torch

import patnet
from patnet.testing import randomize_norms

from conftest import DEVICE, FUSED_BACKENDS, rel_error

NO_DROPOUT = dict(drop_path_rate=0.0, attn_drop=0.0, proj_drop=0.0)


BLOCKS = {
    "patnet_t0-stage1": ("patnet_t0", 0, 8),  # PAT_ch
    "patnet_t1-stage1": ("patnet_t1", 0, 8),  # PAT_ch + PAT_sp in the MLP (no CUDA PAT_sp)
    "patnet_t0-stage4": ("patnet_t0", 6, 3),  # PAT_sf: rpe_attention + the fused mixer output
}
CASES = [pytest.param(backend, *block, id=f"{backend}-{key}")
         for backend in FUSED_BACKENDS for key, block in BLOCKS.items()
         if not (backend == "cuda" and key == "patnet_t1-stage1")]


@pytest.mark.parametrize("fused_backend, name, stage, size", CASES, indirect=["fused_backend"])
def test_compiled_block_matches_eager(fused_backend, name, stage, size):
    torch.manual_seed(0)
    model = patnet.create_model(name, backend=fused_backend, **NO_DROPOUT).to(DEVICE)
    randomize_norms(model, seed=1)
    block = model.stages[stage].blocks[0].train()
    dim = block.mlp[0].in_channels
    gen = torch.Generator().manual_seed(2)
    # (batch 4: at batch 2 BN_a's output is +-1 whatever its input, so the gradients that
    # pass through it are rounding noise, different for any change of summation order)
    x = torch.randn(4, dim, size, size + 1, generator=gen).to(DEVICE)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)
    # BatchNorm statistics move each call: run eager and compiled from the same state.
    state = {k: v.clone() for k, v in block.state_dict().items()}
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        block.load_state_dict(state)
        block.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(grad)
        results.append([y.detach(), xi.grad] + [p.grad for p in block.parameters()]
                       + [b.clone() for b in block.buffers()])
    # Inductor fuses the small gate math in another order: compare by relative norm, with a
    # floor for gradients that vanish analytically (a bias feeding a training BatchNorm gets
    # rounding noise only).
    largest = max(t.norm().item() for t in results[0][2:2 + len(list(block.parameters()))])
    for index, (eager, compiled) in enumerate(zip(*results)):
        assert compiled.shape == eager.shape
        error = rel_error(compiled, eager, floor=1e-3 * largest if index >= 2 else 0.0)
        assert error < 1e-5, f"tensor {index}: {error:.2e}"
