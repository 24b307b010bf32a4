"""DistributedDataParallel training of a fused PATNet over two processes.

The CPU test launches two gloo ranks (and a third process for the single-process emulation) as
subprocesses of this file, each with TRITON_INTERPRET=1 set in its environment before anything
imports triton and the GPUs hidden, so the Triton kernels run on CPU tensors under the
interpreter on any machine. Every process builds the same seeded model (non-trivial norms, a
random iRPE table, so the bucket map matters) and data, trains with SGD + momentum and saves
its parameters and buffers for the test to compare.

What DDP computes, and so what the emulation reproduces: each rank runs the forward and
backward of its own half-batch with its own module, and DDP averages the parameter gradients
over the ranks before the (identical) optimizer steps. BatchNorm in training normalises with the
statistics of the rank's own half-batch, so every activation and gradient of a rank equals
those of one process running that half-batch alone with the same parameters. The running
statistics are the part that differs between ranks:

- without buffer sync (``forward_sync_buffers=False``, formerly ``broadcast_buffers=False``)
  each rank's running statistics follow only its own half-batches: the emulation keeps one copy
  of the buffers per half-batch and loads it before running that half;
- with buffer sync (the default, ``broadcast_buffers=True``) rank 0's buffers (the iRPE bucket
  map among them) are broadcast to every rank when DDP wraps the model and before each forward,
  which the forward then updates: rank 1 ends with rank 0's buffers from before the last step,
  updated by its own last half-batch. The parameters are those of the run without sync, since
  training-mode outputs do not read the running statistics.

The emulation averages the two half-batch gradients, (g0 + g1) / 2, exactly what DDP's
all-reduce of g / 2 gives. Both DDP configurations train the same model on the same data, so
one emulation serves both. Every process runs one thread; the results agree to the bit here,
and are compared with a tight fp32 tolerance.

Also here: the bucket map as a module buffer (what .to(), deepcopy, DDP and torch.compile need),
and SyncBatchNorm over two GPUs (skipped without them; the CPU part is
tests/test_sync_batchnorm.py).
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import DEVICE, rel_error, require_fused_backend

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK = 2  # images per rank and step (training PATNet needs a batch of at least 2)
SIZE = 64  # input H = W: the stage-4 token grid is SIZE // 32 = 2 x 2
STEPS = 2
NUM_CLASSES = 5
CONFIG = dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=NUM_CLASSES, drop_path_rate=0.0,
              attn_drop=0.0, proj_drop=0.0)
TIMEOUT_S = 600  # of a whole launch (a hang); the process group gives up on a lost peer first
CPU_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _make_model(name: str = "patnet_t0", **overrides) -> torch.nn.Module:
    """The seeded model every process builds, its bucket buffer made for the 2 x 2 grid."""
    import patnet
    from patnet.layers import set_token_grid
    from patnet.testing import randomize_norms

    torch.manual_seed(0)
    model = patnet.create_model(name, backend="triton", **dict(CONFIG, **overrides))
    randomize_norms(model, seed=1)
    return set_token_grid(model, SIZE // 32, SIZE // 32).train()


def _data():
    """images (STEPS, WORLD, PER_RANK, 3, SIZE, SIZE), labels (STEPS, WORLD, PER_RANK)."""
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(STEPS, WORLD, PER_RANK, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (STEPS, WORLD, PER_RANK), generator=gen)
    return images, labels


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _buffers(model: torch.nn.Module) -> dict:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


@torch.no_grad()
def _load_buffers(model: torch.nn.Module, buffers: dict) -> None:
    for name, b in model.named_buffers():
        b.copy_(buffers[name])


def _state(model: torch.nn.Module) -> dict:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "buffers": _buffers(model)}


def _attention(model: torch.nn.Module):
    return model.stages[6].blocks[0].spatial_mixing.attn


def _ddp(model: torch.nn.Module, sync_buffers: bool) -> DDP:
    """DDP that broadcasts rank 0's buffers before each forward or not: the option is
    ``forward_sync_buffers`` since torch 2.13 (``broadcast_buffers``, deprecated there, before)."""
    key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
           else "broadcast_buffers")
    return DDP(model, **{key: sync_buffers})


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    """One gloo rank: the two configurations (buffer sync off, then on), STEPS steps each."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        images, labels = _data()
        results = {}
        for sync_buffers in (False, True):
            model = _make_model()
            bucket = _attention(model).bucket_ids
            if sync_buffers and rank == 1:
                bucket.zero_()  # a wrong (in-range) map: DDP must replace it with rank 0's
            ddp = _ddp(model, sync_buffers)
            bucket_after_wrap = bucket.clone()
            if sync_buffers and rank == 1:
                bucket.zero_()  # again: the broadcast before each forward must mend it
            optimizer = _optimizer(ddp.parameters())
            for step in range(STEPS):
                optimizer.zero_grad()
                F.cross_entropy(ddp(images[step, rank]), labels[step, rank]).backward()
                optimizer.step()
            results[sync_buffers] = dict(_state(model), bucket_after_wrap=bucket_after_wrap)
        torch.save(results, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    # (on success the process group is left to the process's exit: see __main__)


def _single_process_worker(out: str) -> None:
    """One process, both half-batches of each step, as the module docstring explains."""
    torch.set_num_threads(1)
    model = _make_model()
    params = list(model.parameters())
    optimizer = _optimizer(params)
    images, labels = _data()
    own = [_buffers(model) for _ in range(WORLD)]  # each rank's buffers, without sync
    synced_rank1 = None  # rank 1's final buffers with rank 0's broadcast before each forward
    for step in range(STEPS):
        rank0_before = own[0]
        grads = []
        for rank in range(WORLD):
            _load_buffers(model, own[rank])
            model.zero_grad()
            F.cross_entropy(model(images[step, rank]), labels[step, rank]).backward()
            grads.append([p.grad for p in params])
            own[rank] = _buffers(model)
        if step == STEPS - 1:
            _load_buffers(model, rank0_before)
            with torch.no_grad():
                model(images[step, 1])
            synced_rank1 = _buffers(model)
        for p, *rank_grads in zip(params, *grads):
            p.grad = sum(rank_grads) / WORLD
        optimizer.step()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"params": params, "own": own, "synced_rank1": synced_rank1}, out)


def _launch(jobs, env: dict, logs: Path, timeout: float = TIMEOUT_S) -> None:
    """Run ``python this_file *args`` for each args of ``jobs`` at once, the output of each into
    a log under ``logs``; fail with the log of any that fails, or if they are not all done
    within ``timeout`` seconds (then those left are killed)."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))
    full_env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks meet on the loopback interface
    deadline = time.monotonic() + timeout
    runs = []
    try:
        for index, args in enumerate(jobs):
            log = logs / f"job{index}.log"
            with open(log, "w") as stream:
                runs.append((args, log, subprocess.Popen(
                    [sys.executable, __file__, *map(str, args)], cwd=REPO, env=full_env,
                    stdout=stream, stderr=subprocess.STDOUT)))
        failures = []
        for args, log, proc in runs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                failures.append(f"{args}: not done after {timeout} s\n{log.read_text()[-4000:]}")
                continue
            if proc.returncode != 0:
                failures.append(f"{args}: exit code {proc.returncode}\n{log.read_text()[-4000:]}")
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """{"ranks": [rank 0's results, rank 1's], "single": the emulation's}."""
    tmp = tmp_path_factory.mktemp("ddp")
    outs = [tmp / f"rank{rank}.pt" for rank in range(WORLD)]
    jobs = [("ddp", rank, tmp / "rendezvous", out) for rank, out in enumerate(outs)]
    _launch(jobs + [("single", tmp / "single.pt")], CPU_ENV, tmp)
    return {"ranks": [torch.load(out, weights_only=True) for out in outs],
            "single": torch.load(tmp / "single.pt", weights_only=True)}


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}, {name}: {m}")


def _check_parameters(ranks: list, single: dict) -> None:
    for name, value in ranks[0]["params"].items():  # DDP keeps the replicas bit-identical
        assert torch.equal(value, ranks[1]["params"][name]), f"ranks differ in {name}"
    _assert_close(ranks[0]["params"], single["params"], "parameters vs the emulation")
    initial = dict(_make_model().named_parameters())
    assert not torch.allclose(ranks[0]["params"]["head.weight"], initial["head.weight"]), \
        "training did not move the parameters"


def test_ddp_matches_single_process_emulation(cpu_runs):
    """Without buffer sync: identical parameters on both ranks, equal to one process averaging
    the two half-batch gradients; each rank's BatchNorm statistics are its own half-batches'."""
    ranks = [run[False] for run in cpu_runs["ranks"]]
    single = cpu_runs["single"]
    _check_parameters(ranks, single)
    for rank in range(WORLD):
        _assert_close(ranks[rank]["buffers"], single["own"][rank], f"rank {rank}'s buffers")
    key = "stages.0.blocks.0.mlp.1.running_mean"
    assert not torch.allclose(ranks[0]["buffers"][key], ranks[1]["buffers"][key]), \
        "the ranks' BatchNorm statistics should be their own"


def test_ddp_broadcasts_bucket_buffer(cpu_runs):
    """With buffer sync (DDP's default): the bucket map is a buffer, broadcast from rank 0 when
    DDP wraps the model and before each forward (rank 1 spoilt its map before both); training
    gives the emulation's parameters, and each rank the buffers of DDP's sync semantics."""
    import patnet_kernels as pk

    ranks = [run[True] for run in cpu_runs["ranks"]]
    single = cpu_runs["single"]
    grid = SIZE // 32
    expected = pk.rpe_buckets(grid, grid)
    name = "stages.6.blocks.0.spatial_mixing.attn.bucket_ids"
    for rank in range(WORLD):
        assert torch.equal(ranks[rank]["bucket_after_wrap"], expected), f"rank {rank}"
        assert torch.equal(ranks[rank]["buffers"][name], expected), f"rank {rank}"
    _check_parameters(ranks, single)
    _assert_close(ranks[0]["buffers"], single["own"][0], "rank 0's buffers")
    _assert_close(ranks[1]["buffers"], single["synced_rank1"], "rank 1's buffers")


# The bucket map as a module buffer: what .to(), deepcopy, DDP and torch.compile rely on.

BUCKET_BUFFER = "stages.6.blocks.0.spatial_mixing.attn.bucket_ids"


def test_bucket_buffer_follows_the_module():
    """A non-persistent buffer of its own (not the cache's tensor, outside the state_dict),
    copied by deepcopy and fuse_for_inference, moved by .to(), remade by set_token_grid."""
    import copy

    import patnet
    import patnet_kernels as pk
    from patnet.layers import RPESelfAttention, set_token_grid

    model = patnet.create_model("patnet_t0", backend="torch", **CONFIG)
    attn = _attention(model)
    assert BUCKET_BUFFER in dict(model.named_buffers())
    assert BUCKET_BUFFER not in model.state_dict()
    assert attn.token_grid == (7, 7) and attn.bucket_range == (40, 48)  # SPEC.md section 4
    assert torch.equal(attn.bucket_ids, pk.rpe_buckets(7, 7))
    assert attn.bucket_ids.data_ptr() != pk.rpe_buckets(7, 7).data_ptr()  # DDP writes into it
    for other in (copy.deepcopy(model), patnet.fuse_for_inference(model)):
        copied = _attention(other)
        assert torch.equal(copied.bucket_ids, attn.bucket_ids)
        assert (copied.token_grid, copied.bucket_range) == (attn.token_grid, attn.bucket_range)
    on_meta = _attention(copy.deepcopy(model).to("meta"))
    assert on_meta.bucket_ids.device.type == "meta"
    on_meta.set_token_grid(3, 2)  # made on the device of the module
    assert on_meta.bucket_ids.device.type == "meta" and on_meta.bucket_ids.shape == (6, 6)
    with torch.device("meta"):  # built on meta (the cache keeps CPU maps)
        built_on_meta = RPESelfAttention(48, 4, token_grid=(5, 9))
    assert built_on_meta.bucket_ids.device.type == "meta"
    assert built_on_meta.bucket_range == (40, int(pk.rpe_buckets(5, 9).max()))
    assert pk.rpe_buckets(5, 9).device.type == "cpu"
    keys = model.state_dict().keys()
    set_token_grid(model, 25, 42)  # a detection map: the logarithmic buckets
    assert torch.equal(attn.bucket_ids, pk.rpe_buckets(25, 42))
    assert attn.bucket_range == (40, int(pk.rpe_buckets(25, 42).max()))
    assert model.state_dict().keys() == keys


def test_bucket_buffer_needs_no_sync(monkeypatch):
    """At its grid the attention passes the buffer with its range known on the host, so the
    ids are never read to check them; another grid takes rpe_buckets' map, same numbers."""
    import patnet_kernels as pk
    import patnet_kernels.functional as functional
    from patnet.layers import RPESelfAttention

    require_fused_backend("triton")
    torch.manual_seed(0)
    attn = RPESelfAttention(48, 4, attn_drop=0.0, backend="triton").eval().to(DEVICE)
    torch.nn.init.normal_(attn.rpe_k.lookup_table_bias)
    x = torch.randn(2, 48, 7, 7).to(DEVICE)

    def read_ids(bucket):
        raise AssertionError("the ids of the bucket buffer were read to check their range")

    monkeypatch.setattr(functional, "_bucket_range", read_ids)
    with torch.no_grad():
        ours = attn(x)
    monkeypatch.undo()
    attn.set_token_grid(2, 2)  # x (7 x 7) now takes the map of rpe_buckets
    with torch.no_grad():
        expected = attn(x)
    assert torch.equal(ours, expected)
    # a caller's range is checked against the table, and must be (low, high) ints
    q = torch.randn(1, 4, 49, 12, device=DEVICE)
    table = attn.rpe_k.lookup_table_bias.detach()
    bucket = pk.rpe_buckets(7, 7, DEVICE).clone()
    for bad, match in (((40, 81), "81 buckets"), ((-1, 48), "span"), ([40, 48], "tuple"),
                       ((48, 40), "low <= high"), ((40.0, 48), "two ints")):
        with pytest.raises(ValueError, match=match):
            pk.rpe_attention(q, q, q, table, bucket, backend="torch", bucket_range=bad)


def test_compiled_stage4_block_reads_the_buffer():
    """torch.compile(fullgraph=True) of a stage-4 block at the buffer's grid: one graph, the
    buffer its input (no rpe_buckets op), no recompilation for a second batch of that shape,
    and the eager numbers."""
    import patnet

    require_fused_backend("triton")
    torch.manual_seed(0)
    model = patnet.create_model("patnet_t0", backend="triton", **CONFIG).to(DEVICE)
    block = model.stages[6].blocks[0].train()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(block, fullgraph=True, backend=record)
    gen = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 64, 7, 7, generator=gen).to(DEVICE)
            y = compiled(x)
            y.sum().backward()
            assert rel_error(y, block(x)) < 1e-6
    assert len(graphs) == 1
    assert "rpe_buckets" not in graphs[0] and "bucket_ids" in graphs[0]


def _sync_bn_worker(rank: int, init_file: str, out: str) -> None:
    """One NCCL rank on cuda:rank: a SyncBatchNorm PATNet-T1 (PAT_ch and PAT_sp) wrapped in DDP,
    one forward and backward of its half-batch; saves outputs, gradients and buffers."""
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_make_model("patnet_t1"))
        ddp = DDP(model.to(device), device_ids=[rank])
        images, labels = _data()
        logits = ddp(images[0, rank].to(device))
        F.cross_entropy(logits, labels[0, rank].to(device)).backward()
        torch.save({"logits": logits.detach().cpu(),
                    "grads": {n: p.grad.cpu() for n, p in model.named_parameters()},
                    "buffers": {n: b.cpu() for n, b in model.named_buffers()}}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")
def test_sync_batchnorm_two_gpus(tmp_path):
    """SyncBatchNorm over two GPUs normalises with the statistics of both half-batches: each
    rank's logits, the averaged gradients and every rank's running statistics equal those of
    one unconverted model on the whole batch (equal halves: the mean loss is the mean of the
    ranks' mean losses)."""
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD)]
    _launch([("syncbn", rank, tmp_path / "rendezvous", out) for rank, out in enumerate(outs)],
            {"OMP_NUM_THREADS": "1"}, tmp_path)
    model = _make_model("patnet_t1").cuda()
    images, labels = _data()
    logits = model(images[0].flatten(0, 1).cuda())
    F.cross_entropy(logits, labels[0].flatten().cuda()).backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    buffers = {n: b.cpu() for n, b in model.named_buffers()}
    for rank, out in enumerate(outs):
        result = torch.load(out, weights_only=True)
        torch.testing.assert_close(result["logits"],
                                   logits[rank * PER_RANK:(rank + 1) * PER_RANK].detach().cpu(),
                                   rtol=1e-4, atol=1e-5)
        for what, ours, expected in (("grads", result["grads"], grads),
                                     ("buffers", result["buffers"], buffers)):
            assert ours.keys() == expected.keys()
            for name, value in ours.items():
                torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"rank {rank} {what} {name}: {m}")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "ddp":
        _ddp_worker(int(rest[0]), rest[1], rest[2])
        # Its results saved, the rank leaves at once: gloo's teardown (destroy_process_group,
        # the interpreter's exit) once hung a rank on a futex after its peer had gone, results
        # written, which the launch could only report as a timeout (a CI run lost 10 minutes).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    elif mode == "syncbn":
        _sync_bn_worker(int(rest[0]), rest[1], rest[2])
    elif mode == "single":
        _single_process_worker(rest[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}: ddp, syncbn or single")
