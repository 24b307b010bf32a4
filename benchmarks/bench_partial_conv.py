"""Benchmark PConv, the partial 3x3 convolution: eager reference vs torch.compile vs Triton vs CUDA.

    python -m benchmarks.bench_partial_conv [--dtypes float16] [--batches 256] [--quick] ...

Shapes: every stage of FasterNet-T2 (PConv is its token mixer) and stage 4 of PATNet-T2 (the
conv half of PAT_sf), read off the model code at 224 x 224. Providers: torch (eager), torch.compile
of the reference, triton, cuda, and triton inplace / cuda inplace (``inplace=True`` without
autograd, inference only).
See benchmarks/README.md (its layout section: the harness modules).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target, fused_op_targets  # noqa: E402
from benchmarks.op_inputs import Problem, random_weight, stage_activation  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import PartialConv3, PATSelfMixer  # noqa: E402


def shapes(quick: bool):
    split = lambda module: module.dim_conv3  # noqa: E731 - C1, the conv channels
    return (stage_shapes("fasternet_t2", (PartialConv3,), split, quick)
            + stage_shapes("patnet_t2", (PATSelfMixer,), split, quick))


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    x = stage_activation(shape, batch, dtype, device, gen)
    weight = random_weight((shape.split, shape.split, 3, 3), dtype, device, gen)
    leaves = []
    if mode == "fwd+bwd":
        leaves = [x.requires_grad_(True), weight.requires_grad_(True)]
    return Problem((x, weight), leaves)


def functional(args, backend: str):
    x, weight = args
    return pk.partial_conv3x3(x, weight, backend=backend)


def make_inplace(backend: str):
    """The provider "<backend> inplace": x[:, :C1] rewritten in place, on a copy of the case's
    x (the copy is made untimed; each timed call rewrites it again: the op's cost does not
    depend on the values)."""

    def make(problem: Problem):
        x, weight = problem.args
        copy = x.detach().clone()
        return lambda: pk.partial_conv3x3(copy, weight, inplace=True, backend=backend)

    return make


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    n = batch * shape.channels * shape.height * shape.width
    n1 = batch * shape.split * shape.height * shape.width
    w = 9 * shape.split ** 2
    if mode == "fwd":
        return (2 * n + w) * elem
    return (4 * n + n1 + 3 * w) * elem


FAMILY = Family(
    name="partial_conv",
    title="PConv (partial 3x3 conv): pk.partial_conv3x3",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.partial_conv3x3, bytes_moved=bytes_moved,
    formulas={
        "fwd": "(2N + W) * e: read X, write Y (N = B*C*H*W elements, W = 9*C1^2 weights, "
               "e = bytes per element)",
        "fwd+bwd": "(4N + N1 + 3W) * e: forward 2N + W; backward reads dY (N) and X1 "
                   "(N1 = B*C1*H*W, for the weight gradient), writes dX (N), reads W, writes dW",
    },
    mode_text={
        "fwd": "forward under torch.no_grad()",
        "fwd+bwd": "forward + backward into x and the weight",
    },
    extra_providers={"triton inplace": (("fwd",), make_inplace("triton")),
                     "cuda inplace": (("fwd",), make_inplace("cuda"))},
    targets=fused_op_targets("fused PConv") + [
             Target("cuda", "fwd", 256, "speedup_vs_best", 1 / 1.1,
                    "CUDA PConv within 10% of the faster of Triton and torch.compile at batch "
                    "256 (fwd)")],
    notes=["patnet_t2.s4 is the conv half of PAT_sf (the model itself convolves X1 there and "
           "feeds X2 to the attention); it is timed as the whole PConv at that shape",
           "triton inplace and cuda inplace move only 2*B*C1*H*W elements but are credited with "
           "the same bytes as the others (the rule: one byte count per case), so their GB/s "
           "is an effective rate and their % copy may exceed 100%"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
