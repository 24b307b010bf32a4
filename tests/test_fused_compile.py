"""torch.compile(fullgraph=True) of PATNet blocks and whole models on each fused backend (Triton,
CUDA): no graph break, no recompilation on a second batch, and the compiled block or model
equals the eager one, output and gradients, in training mode (models also in eval); and
torch.export of the eval model and of its inference copy, whose fused ops it keeps as ops."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import patnet
from patnet.testing import randomize_norms

from conftest import BUDGET_FACTOR, BUDGET_FLOOR, DEVICE, FUSED_BACKENDS, rel_error

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


# Whole models: one graph (fullgraph=True, and the compile counter sees one frame), no
# recompilation on a second batch of the same shape (error_on_recompile), and the compiled model
# equals the eager one. Under the Triton interpreter a PATNet-T1 training step takes ~40 s, so:
# "aot_eager" (dynamo's capture and AOT autograd's forward and backward graphs, run by eager
# kernels: the compiled model must equal eager to 1e-5) for PATNet-T0 in training and eval and
# PATNet-T1 in eval; Inductor for PATNet-T1 in training (every Triton op, test_inductor_...).
# Each at one block per stage (every op of the model; more blocks per stage repeat them) and at
# the released depths, which on the CPU are "slow" (PATNet-T0 training took 97 s under the
# interpreter, 35 s at one block per stage; a GPU run includes them).
MODEL_INPUT = (224, 224) if DEVICE.type == "cuda" else (64, 32)
DEPTHS = {"1-1-1-1": (1, 1, 1, 1), "released": None}
WHOLE_MODELS = [
    pytest.param(backend, name, mode, depths, id=f"{backend}-{name}-{mode}-{key}",
                 marks=[pytest.mark.slow] if depths is None and DEVICE.type == "cpu" else [])
    for backend, name, mode in ([(backend, "patnet_t0", mode) for backend in FUSED_BACKENDS
                                 for mode in ("train", "eval")] + [("triton", "patnet_t1", "eval")])
    for key, depths in DEPTHS.items()]


def _whole_model(name, backend, mode, **overrides):
    torch.manual_seed(0)
    model = patnet.create_model(name, backend=backend, **NO_DROPOUT, **overrides).to(DEVICE)
    randomize_norms(model, seed=1)
    return model.train(mode == "train")


def _batch(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    batch = 3 if mode == "train" else 2  # (training BN_a needs 3 for meaningful gradients)
    return (torch.randn(batch, 3, *MODEL_INPUT, generator=gen).to(DEVICE),
            torch.randn(batch, 1000, generator=gen).to(DEVICE))


def _run_model(model, fn, x, grad, mode):
    """Output, input and parameter gradients (train) and the buffers after one call of fn."""
    model.zero_grad(set_to_none=True)
    if mode == "eval":
        with torch.no_grad():
            return [fn(x)] + [b.clone() for b in model.buffers()]
    xi = x.clone().requires_grad_()
    y = fn(xi)
    y.backward(grad)
    return ([y.detach(), xi.grad] + [p.grad for p in model.parameters()]
            + [b.clone() for b in model.buffers()])


def _eager_then_compiled(model, compiled, x, grad, mode):
    """Both from the same state (BatchNorm statistics move in training)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = _run_model(model, model, x, grad, mode)
    model.load_state_dict(state)  # (in place: the compiled graph's guards still hold)
    return eager, _run_model(model, compiled, x, grad, mode)


def _assert_second_batch_reuses_the_graph(counter, compiled, mode):
    """A second batch of the same shape runs the compiled graph: no recompilation (dynamo
    raises if one is needed), still one graph. Forward only: guards are checked there."""
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for one model"
    x, _ = _batch(3, mode)
    with torch._dynamo.config.patch(error_on_recompile=True), \
            torch.set_grad_enabled(mode == "train"):
        y = compiled(x.clone().requires_grad_(mode == "train"))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs after a second batch"
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("fused_backend, name, mode, depths", WHOLE_MODELS,
                         indirect=["fused_backend"])
def test_compiled_model_one_graph_no_recompile(fused_backend, name, mode, depths):
    torch._dynamo.reset()
    depth_option = {} if depths is None else {"depths": depths}
    model = _whole_model(name, fused_backend, mode, **depth_option)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x, grad = _batch(2, mode)
    eager, ours = _eager_then_compiled(model, compiled, x, grad, mode)
    assert len(eager) == len(ours)
    n_params = len(list(model.parameters())) if mode == "train" else 0
    largest = max([t.norm().item() for t in eager[2:2 + n_params]], default=0.0)
    for index, (e, c) in enumerate(zip(eager, ours)):
        assert c.shape == e.shape, f"tensor {index}"
        if not e.is_floating_point():
            assert torch.equal(c, e), f"tensor {index}"
            continue
        error = rel_error(c, e, floor=1e-3 * largest if 2 <= index < 2 + n_params else 0.0)
        assert error < 1e-5, f"tensor {index}: {error:.2e}"
    _assert_second_batch_reuses_the_graph(counter, compiled, mode)


@pytest.mark.parametrize("fused_backend", ["triton"], indirect=True)
def test_inductor_compiled_model_matches_eager(fused_backend):
    """PATNet-T1 with one block per stage (every Triton op: PAT_ch, PAT_sp, PAT_sf, the MLP's
    BN + act; the released 1, 2, 8, 2 blocks only repeat them and took Inductor 2 minutes of
    CI's 2 cores) compiled by Inductor, one training step, then a second batch: one graph, no
    recompilation; output, every gradient and the
    updated buffers as close to the float64 reference as eager float32 is. (Inductor reorders
    the BatchNorm and gate arithmetic around the kernels, and this model's training gradients
    are ill-conditioned, ~2e-5 in float32, so eager and compiled differ by rounding of that
    order.) Each within BUDGET_FACTOR x the larger error of the eager fused model and the eager
    float32 reference model, + the fp32 floor."""
    torch._dynamo.reset()
    model = _whole_model("patnet_t1", fused_backend, "train", depths=(1, 1, 1, 1))
    reference = patnet.set_backend(copy.deepcopy(model), "torch")
    exact = copy.deepcopy(reference).double()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x, grad = _batch(2, "train")
    results_x = _run_model(exact, exact, x.double(), grad.double(), "train")
    results_r = _run_model(reference, reference, x, grad, "train")
    eager, ours = _eager_then_compiled(model, compiled, x, grad, "train")
    n_params = len(list(model.parameters()))
    largest = max(t.norm().item() for t in results_x[2:2 + n_params])
    for index, (e64, r, e, c) in enumerate(zip(results_x, results_r, eager, ours)):
        assert c.shape == e64.shape, f"tensor {index}"
        if not e64.is_floating_point():
            assert torch.equal(c, e64), f"tensor {index}"
            continue
        floor = 1e-3 * largest if 2 <= index < 2 + n_params else 0.0
        error = rel_error(c, e64, floor)
        budget = (BUDGET_FACTOR * max(rel_error(e, e64, floor), rel_error(r, e64, floor))
                  + BUDGET_FLOOR[torch.float32])
        assert error <= budget, f"tensor {index}: {error:.3g} vs float64, budget {budget:.3g}"
    _assert_second_batch_reuses_the_graph(counter, compiled, "train")


@pytest.mark.parametrize("fused_backend", ["triton"], indirect=True)
def test_inference_copy_compiled_on_its_first_call(fused_backend, monkeypatch):
    """torch.compile(fullgraph=True) of ``patnet.optimize_for_inference``'s copy (PATNet-T1
    with one block per stage: the patch convs, PAT_ch blocks with PAT_sp and the statistics
    they hand on, PAT_sf's LayerNorm + qkv, attention and output, the MLP), its first call
    traced before any eager one, with no op's backend loaded yet: each op's backend is loaded
    while the trace runs (a registry dictionary filled during the trace used to be read stale:
    KeyError); one graph, equal to the eager copy."""
    from patnet_kernels import backends, registry

    for loaded in registry._IMPLEMENTATIONS.values():
        monkeypatch.setattr(loaded, "function", None)
    backends.forget_decisions()
    torch._dynamo.reset()
    model = _whole_model("patnet_t1", fused_backend, "eval", depths=(1, 1, 1, 1))
    fast = patnet.optimize_for_inference(model, backend=fused_backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fast, backend=counter, fullgraph=True)
    x, _ = _batch(2, "eval")
    with torch.no_grad():
        ours = compiled(x)
        assert rel_error(ours, fast(x)) < 1e-6
    assert counter.frame_count == 1
    backends.forget_decisions()


@pytest.mark.parametrize("fused_backend", FUSED_BACKENDS, indirect=True)
def test_exported_model_and_inference_copy_equal_eager(fused_backend):
    """torch.export.export (what deployment takes now that PyTorch deprecates TorchScript) of a
    fused PATNet in eval and of its inference copy: the fused ops stay registered ops in the
    exported program, which computes what the module does."""
    torch.manual_seed(0)
    model = patnet.create_model("patnet_t0", backend=fused_backend, embed_dim=16,
                                depths=(1, 1, 1, 1)).to(DEVICE)
    randomize_norms(model, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    namespace = "patnet_cuda" if fused_backend == "cuda" else "patnet_triton"
    for module in (model.eval(), patnet.optimize_for_inference(model, backend=fused_backend)):
        exported = torch.export.export(module, (x,))
        assert any(namespace in str(node.target) for node in exported.graph.nodes)
        with torch.no_grad():
            assert torch.equal(exported.module()(x), module(x))
