"""Kernel microbenchmarks (pytest-benchmark): each op family on PATNet-T2's shapes, forward.

One test per family (PConv out of place and in place, PAT_ch, PAT_sp, the attention of PAT_sf,
PAT_sf's output), each parametrised over the stage shapes that benchmarks/bench_*.py read off
the model code, fp16 and fp32, and the providers: the reference (``backend="torch"``) and the
fused backends (``triton``, ``cuda``; PConv also in place). Batch 256 (the attention: the
largest batch its bench uses per shape: 256 on the 7 x 7 map, 8 on the detection map). The
benchmarks of one (family, shape, batch, dtype) share a pytest-benchmark group, so the
providers sit side by side in its table.

Each round is one call followed by ``torch.cuda.synchronize()``: the latency a caller sees,
launch overhead included, with warm caches (benchmarks/bench_*.py report do_bench's GPU times
with the L2 flushed, and GB/s). Every provider's output is first checked against the
reference's (benchmarks/tolerance.py's MISMATCH). Needs a CUDA device (marker ``gpu``):

    python -m pytest tests/test_kernel_benchmarks.py -m gpu --benchmark-json "$OUT/kernels.json"
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():  # (before the shapes are read: nothing to collect here)
    pytest.skip("kernel benchmarks time CUDA kernels: no CUDA device here",
                allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed "
                                               "(bash scripts/install.sh test installs it)")

import patnet_kernels as pk  # noqa: E402
from benchmarks import (  # noqa: E402
    bench_channel_attention, bench_partial_conv, bench_rpe_attention, bench_spatial_attention)
from benchmarks.op_inputs import Problem, random_activation, random_weight  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from benchmarks.tolerance import DTYPE_NAMES, MISMATCH, max_rel_error  # noqa: E402
from patnet.layers import PATSelfMixer  # noqa: E402

from conftest import require_fused_backend  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
MODEL = "patnet_t2"
BATCH = 256
DTYPES = (torch.float16, torch.float32)
WARMUP_ROUNDS = 10
ROUNDS = 100


def _t2(shapes):
    return [s for s in shapes if s.model == MODEL]


def _cases(shapes, providers, batches=lambda shape: [BATCH]):
    return [pytest.param(shape, batch, dtype, provider,
                         id=f"{shape.name}-B{batch}-{DTYPE_NAMES[dtype]}-"
                            f"{provider.replace(' ', '_')}")
            for shape in shapes for batch in batches(shape) for dtype in DTYPES
            for provider in providers]


def _bench(benchmark, family: str, shape: StageShape, batch: int, dtype, provider: str,
           call, reference, nbytes=None) -> None:
    """Check ``call`` against ``reference`` (the same inputs, backend torch), then time it."""
    backend = provider.split()[0]
    if backend != "torch":
        require_fused_backend(backend)
    try:
        with torch.no_grad():
            out = call()
            expected = reference()
    except pk.BackendUnavailableError as e:  # e.g. the CUDA attention beyond 1024 tokens
        pytest.skip(str(e))
    err = max_rel_error([out], [expected])
    assert err <= MISMATCH[dtype], f"{provider}: max rel error {err:.2g} vs the reference"
    del out, expected

    def run():
        with torch.no_grad():
            call()
        torch.cuda.synchronize()

    benchmark.group = f"{family} {shape.name} B={batch} {DTYPE_NAMES[dtype]}"
    benchmark.extra_info.update(family=family, shape=shape.name, batch=batch,
                                channels=shape.channels, hw=f"{shape.height}x{shape.width}",
                                dtype=DTYPE_NAMES[dtype], provider=provider,
                                max_rel_error=err, **({"bytes": nbytes} if nbytes else {}))
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)


def _problem(family, shape, batch, dtype) -> Problem:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return family.build(shape, batch, dtype, DEVICE, "fwd", gen)


def _family_call(family, problem: Problem, provider: str):
    if provider.endswith(" inplace"):
        return bench_partial_conv.make_inplace(provider.split()[0])(problem)
    return lambda: family.functional(problem.args, provider)


def _run_family(benchmark, family, shape, batch, dtype, provider):
    problem = _problem(family, shape, batch, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    _bench(benchmark, family.name, shape, batch, dtype, provider,
           _family_call(family, problem, provider),
           lambda: family.functional(problem.args, "torch"),
           family.bytes_moved(shape, batch, elem, "fwd"))


@pytest.mark.parametrize("shape, batch, dtype, provider", _cases(
    _t2(bench_partial_conv.shapes(False)),
    ["torch", "triton", "cuda", "triton inplace", "cuda inplace"]))
def test_partial_conv3x3(benchmark, shape, batch, dtype, provider):
    _run_family(benchmark, bench_partial_conv.FAMILY, shape, batch, dtype, provider)


@pytest.mark.parametrize("shape, batch, dtype, provider", _cases(
    bench_channel_attention.shapes(False), ["torch", "triton", "cuda"]))
def test_channel_attention(benchmark, shape, batch, dtype, provider):
    _run_family(benchmark, bench_channel_attention.FAMILY, shape, batch, dtype, provider)


@pytest.mark.parametrize("shape, batch, dtype, provider", _cases(
    bench_spatial_attention.shapes(False), ["torch", "triton"]))   # no CUDA kernel for PAT_sp
def test_spatial_attention(benchmark, shape, batch, dtype, provider):
    _run_family(benchmark, bench_spatial_attention.FAMILY, shape, batch, dtype, provider)


@pytest.mark.parametrize("shape, batch, dtype, provider", _cases(
    _t2(bench_rpe_attention.shapes(False)), ["torch", "triton", "cuda"],
    batches=lambda shape: [max(bench_rpe_attention.FAMILY.batches_of(shape, False))]))
def test_rpe_attention(benchmark, shape, batch, dtype, provider):
    _run_family(benchmark, bench_rpe_attention.FAMILY, shape, batch, dtype, provider)


SELF_MIXER_SHAPES = stage_shapes(MODEL, (PATSelfMixer,), lambda m: m.dim_conv3)


@pytest.mark.parametrize("shape, batch, dtype, provider", _cases(
    SELF_MIXER_SHAPES, ["torch", "triton", "cuda"]))
def test_self_mixer_output(benchmark, shape, batch, dtype, provider):
    """PAT_sf's output: x (B, C, H, W), the conv weight of X1, the attention's tokens
    (B, H * W, C2) and the projection (C2, C2) with its bias; dropout 0 (eval)."""
    device = DEVICE
    gen = torch.Generator(device=device).manual_seed(0)
    c1 = shape.split
    c2 = shape.channels - c1
    x = random_activation((batch, shape.channels, shape.height, shape.width), dtype, device,
                          gen)
    conv_weight = random_weight((c1, c1, 3, 3), dtype, device, gen)
    tokens = random_activation((batch, shape.height * shape.width, c2), dtype, device, gen)
    proj_weight = random_weight((c2, c2), dtype, device, gen)
    proj_bias = random_activation((c2,), dtype, device, gen)
    args = (x, conv_weight, tokens, proj_weight, proj_bias)
    _bench(benchmark, "self_mixer_output", shape, batch, dtype, provider,
           lambda: pk.self_mixer_output(*args, backend=provider),
           lambda: pk.self_mixer_output(*args, backend="torch"))
