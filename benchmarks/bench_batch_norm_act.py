"""Benchmark the block MLP's BatchNorm + activation: eager reference vs torch.compile vs Triton.

    python -m benchmarks.bench_batch_norm_act [--dtypes float16] [--batches 256] [--quick] ...

pk.batch_norm_act: act(BN(x)) on the MLP's hidden activation (2C channels), between its two 1x1
convs, as the training model (and the eval model before folding) runs it. Shapes: the hidden
activation of every stage of PATNet-T2 and FasterNet-T2 (ReLU), read off the model code at
224 x 224. Modes: fwd is the eval forward (running statistics), fwd+bwd the training forward
(batch statistics, running ones updated) and its backward. See benchmarks/README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, fused_op_targets  # noqa: E402
from benchmarks.op_inputs import Problem, random_activation, random_batch_norm  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import FasterNetBlock, PATNetBlock  # noqa: E402


def shapes(quick: bool):
    hidden = lambda block: block.mlp[0].out_channels  # noqa: E731 - kept in ``split``
    return (stage_shapes("patnet_t2", (PATNetBlock,), hidden, quick)
            + stage_shapes("fasternet_t2", (FasterNetBlock,), hidden, quick))


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The MLP's hidden activation (B, 2C, H, W), its BatchNorm (random affine and running
    statistics), ReLU (T2); training in fwd+bwd, where x and the affine require a gradient."""
    training = mode == "fwd+bwd"
    x = random_activation((batch, shape.split, shape.height, shape.width), dtype, device, gen)
    bn = random_batch_norm(shape.split, dtype, device, gen, training)
    leaves = [x.requires_grad_(True), bn.weight, bn.bias] if training else []
    return Problem((x, bn, "relu", training), leaves)


def functional(args, backend: str):
    x, bn, activation, training = args
    return pk.batch_norm_act(x, bn, activation, training=training, backend=backend)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    n = batch * shape.split * shape.height * shape.width
    params = 4 * shape.split
    if mode == "fwd":
        return (2 * n + params) * elem
    return (8 * n + 2 * params) * elem


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for it)
    name="batch_norm_act",
    title="the block MLP's BatchNorm + activation: pk.batch_norm_act",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.batch_norm_act, bytes_moved=bytes_moved,
    formulas={
        "fwd": "(2N + P) * e: read X, write Y (N = B*Hd*H*W elements of the Hd = 2C hidden "
               "channels, P = 4 Hd BatchNorm parameters, e = bytes per element)",
        "fwd+bwd": "(8N + 2P) * e: training forward reads X for the batch statistics, then "
                   "reads X and writes Y (3N); backward reads dY and X for the two sums, then "
                   "reads dY and X and writes dX (5N); parameters read twice",
    },
    mode_text={
        "fwd": "eval forward (running statistics) under torch.no_grad()",
        "fwd+bwd": "training forward (batch statistics; running statistics updated) + backward "
                   "into x and the BatchNorm's affine",
    },
    notes=["the eager reference runs BatchNorm then ReLU in place: training forward 3 + 2 "
           "passes, backward threshold_backward 3 + BatchNorm's 5; the fused op's forward and "
           "backward never write the BN output Z"],
    targets=fused_op_targets("fused BatchNorm + activation"),
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
