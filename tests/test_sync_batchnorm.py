"""SyncBatchNorm in fused PATNet / FasterNet models (the CPU-testable part; the two-GPU run is
tests/test_ddp.py::test_sync_batchnorm_two_gpus).

``nn.SyncBatchNorm.convert_sync_batchnorm`` replaces every BatchNorm2d, those whose parameters
PAT_ch and PAT_sp pass to their fused ops included. Without a process group, with a group of one
rank, or in eval, a SyncBatchNorm is a plain BatchNorm: the fused ops serve it and the converted
model gives the unconverted one's numbers. In training over several ranks its statistics must
be gathered across the ranks, which a fused op cannot do: those layers then call the modules
(``patnet.layers.syncs_statistics`` picks the branch). SyncBatchNorm refuses CPU tensors when
it syncs, so here the branch is checked with torch.distributed reporting two ranks and the
SyncBatchNorm forward standing in for ranks that all hold this same batch (then the gathered
statistics are the batch's own).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import patnet
import patnet_kernels as pk
from patnet.layers import PartialSpatialAttention, PATChannelMixer, syncs_statistics
from patnet.testing import randomize_norms

from conftest import DEVICE, rel_error, require_fused_backend

MODELS = {
    # PAT_ch, PAT_sp and PAT_sf
    "patnet_t1": dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0,
                      attn_drop=0.0, proj_drop=0.0),
    "fasternet_t0": dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0),
}


def _pair(build):
    """A module made by ``build()`` with random norms, and its SyncBatchNorm conversion."""
    torch.manual_seed(0)
    module = randomize_norms(build(), seed=1).to(DEVICE)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(build().to(DEVICE))
    converted.load_state_dict(module.state_dict())
    return module, converted


def _run(module: nn.Module, x: torch.Tensor, grad_seed: int = 3):
    """Output, input gradient, parameter gradients and buffers after one forward + backward."""
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
               .to(y.device))
    return ([y.detach(), x.grad] + [p.grad for p in module.parameters()]
            + [b.clone() for b in module.buffers()])


def _assert_close(ours, expected, bound: float) -> None:
    """Each tensor within a relative (Frobenius) error of ``bound``."""
    assert len(ours) == len(expected)
    for index, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"tensor {index}"
        error = rel_error(a, b)
        assert error <= bound, f"tensor {index}: relative error {error:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_matches_without_group(name):
    """Eval and training with no process group: the fused ops serve the SyncBatchNorms, so the
    converted model gives the same numbers (and counts num_batches_tracked) as the unconverted
    one; the state_dict keys are unchanged."""
    require_fused_backend("triton")
    model, converted = _pair(lambda: patnet.create_model(name, backend="triton",
                                                         **MODELS[name]))
    assert converted.state_dict().keys() == model.state_dict().keys()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    # (batch 4: at batch 2 BN_a's output is +-1 whatever its input, and the gradients through
    # it are rounding noise, which a GPU's reduction order could change)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        _assert_close([converted.eval()(x)], [model.eval()(x)], 1e-6)
    counts = [b.num_batches_tracked.item() for b in converted.modules()
              if isinstance(b, nn.SyncBatchNorm)]
    # the same ops on the same tensors: equal on the CPU, to rounding on a GPU
    _assert_close(_run(converted.train(), x), _run(model.train(), x), 1e-6)
    assert [b.num_batches_tracked.item() for b in converted.modules()
            if isinstance(b, nn.SyncBatchNorm)] == [c + 1 for c in counts]


def test_sync_decision(monkeypatch):
    """Only a SyncBatchNorm, in training, in an initialised group of more than one rank."""
    bn, sync = nn.BatchNorm2d(4), nn.SyncBatchNorm(4)
    assert not syncs_statistics(True, sync)  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    sizes = {}
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: sizes.get(group, 1))
    assert not syncs_statistics(True, bn, sync)  # one rank
    sizes[None] = 2
    assert syncs_statistics(True, bn, sync)
    assert syncs_statistics(True, sync, nn.Identity())
    assert not syncs_statistics(False, sync)  # eval: running statistics, nothing to gather
    assert not syncs_statistics(True, bn, nn.Identity())
    group = object()  # the SyncBatchNorm's own group is asked, not the default one
    sync.process_group = group
    assert not syncs_statistics(True, sync)
    sizes[group] = 2
    assert syncs_statistics(True, sync)


def test_world_size_one_group_uses_fused_op(tmp_path):
    """A real gloo group of one rank: the SyncBatchNorms of PAT_ch are plain BatchNorms, served
    by the fused op (SyncBatchNorm's own forward would refuse CPU tensors in a group)."""
    require_fused_backend("triton")
    mixer, converted = _pair(lambda: PATChannelMixer(16, 4, backend="triton"))
    x = torch.randn(4, 16, 5, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        assert not syncs_statistics(True, converted.attn.bn, converted.norm)
        ours = _run(converted.train(), x)
    finally:
        dist.destroy_process_group()
    _assert_close(ours, _run(mixer.train(), x), 1e-6)


LAYERS = {
    "PAT_ch": (lambda: PATChannelMixer(16, 4, backend="triton"), "channel_attention"),
    "PAT_sp": (lambda: PartialSpatialAttention(16, backend="triton"), "spatial_attention"),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_syncing_layer_calls_the_modules(layer, monkeypatch):
    """With torch.distributed reporting two ranks, PAT_ch and PAT_sp call their SyncBatchNorm
    modules instead of the fused op, and (the ranks all holding this batch) give the fused op's
    output, gradients and running statistics of the unconverted layer."""
    require_fused_backend("triton")
    build, op = LAYERS[layer]
    module, converted = _pair(build)
    x = torch.randn(4, 16, 5, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = _run(module.train(), x)

    calls = []

    def one_rank_sync(bn, input):  # the gathered statistics of identical ranks: the batch's own
        calls.append(bn)
        return nn.modules.batchnorm._BatchNorm.forward(bn, input)

    def refuse(*args, **kwargs):
        raise AssertionError(f"pk.{op} cannot gather statistics across ranks")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", one_rank_sync)
    monkeypatch.setattr(pk, op, refuse)
    ours = _run(converted.train(), x)
    syncs = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(calls) == len(syncs) == 2 and set(map(id, calls)) == set(map(id, syncs))
    _assert_close(ours, expected, 1e-5)  # the composition rounds unlike the fused kernels
