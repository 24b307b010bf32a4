"""Benchmark the block's MLP for inference: eager reference vs torch.compile vs Triton.

    python -m benchmarks.bench_pointwise_mlp [--dtypes float16] [--batches 256] [--quick] ...

pk.pointwise_mlp: W2 . relu(W1 . X + b1) + R, the MLP of a FasterNet or PATNet block with its
BatchNorm folded and the block's residual added (what ``patnet.optimize_for_inference`` runs).
Shapes: every stage of PATNet-T2 and FasterNet-T2 (hidden = 2C), read off the model code at
224 x 224. Mode: fwd only (an inference op: it has no backward).
See benchmarks/README.md (its layout section: the harness modules).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target  # noqa: E402
from benchmarks.op_inputs import (Problem, random_activation, random_weight,  # noqa: E402
                                  stage_activation)
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import FasterNetBlock, PATNetBlock  # noqa: E402


def shapes(quick: bool):
    hidden = lambda block: block.mlp[0].out_channels  # noqa: E731 - kept in ``split``
    return (stage_shapes("patnet_t2", (PATNetBlock,), hidden, quick)
            + stage_shapes("fasternet_t2", (FasterNetBlock,), hidden, quick))


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The arguments the inference path passes: x, the folded W1 and b1, W2 (no bias: the
    model's second conv has none), the block's input as the residual, ReLU (T2)."""
    c, hidden = shape.channels, shape.split
    x = stage_activation(shape, batch, dtype, device, gen)
    w1 = random_weight((hidden, c, 1, 1), dtype, device, gen)
    b1 = random_activation((hidden,), dtype, device, gen) * 0.1
    w2 = random_weight((c, hidden, 1, 1), dtype, device, gen)
    residual = stage_activation(shape, batch, dtype, device, gen)
    return Problem((x, w1, b1, w2, None, residual, "relu"))


def functional(args, backend: str):
    x, w1, b1, w2, b2, residual, activation = args
    return pk.pointwise_mlp(x, w1, b1, w2, b2, residual=residual, activation=activation,
                            backend=backend)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    n = batch * shape.channels * shape.height * shape.width
    c, hidden = shape.channels, shape.split
    return (3 * n + 2 * c * hidden + hidden) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    return 4 * batch * shape.height * shape.width * shape.channels * shape.split


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for the MLP)
    name="pointwise_mlp",
    title="the block's MLP for inference (BN folded, residual): pk.pointwise_mlp",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.pointwise_mlp, bytes_moved=bytes_moved,
    formulas={"fwd": "(3N + 2 C Hd + Hd) * e: read X and the residual, write Y (N = B*C*H*W "
                     "elements; the hidden B*Hd*H*W activation stays on chip), read W1, b1, "
                     "W2 (Hd = 2C hidden channels, e = bytes per element)"},
    mode_text={"fwd": "eval forward under torch.no_grad()"},
    modes=("fwd",),  # (an inference op: no backward)
    flops=flops,
    flop_formulas={"fwd": "4 B H W C Hd: the two 1x1 convs (multiply-add = 2 FLOPs)"},
    targets=[Target("triton", "fwd", 256, "speedup_vs_compile", 1.3,
                    "fused MLP >= 1.3x torch.compile of the reference at batch 256 (fwd)")],
    notes=["the eager reference writes the 2C hidden activation and reads it back twice (ReLU "
           "in place, then the second conv) and adds the residual in a separate pass: 13 "
           "activation passes of C channels against the fused kernel's 3"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
