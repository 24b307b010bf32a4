"""Benchmark PAT_ch (partial conv + Gaussian channel attention): eager vs torch.compile vs Triton.

    python -m benchmarks.bench_channel_attention [--dtypes float16] [--batches 256] [--quick] ...

Shapes: stages 1-3 of PATNet-T2 (where PAT_ch is the token mixer), read off the model code at
224 x 224. Modes: fwd is the eval forward (running statistics), fwd+bwd the training forward
(batch statistics) and its backward. See benchmarks/README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target, fused_op_targets  # noqa: E402
from benchmarks.op_inputs import Problem, two_norm_functional, two_norm_problem  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import PATChannelMixer  # noqa: E402


def shapes(quick: bool):
    return stage_shapes("patnet_t2", (PATChannelMixer,), lambda module: module.dim_conv3, quick)


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The arguments PATChannelMixer.forward passes: cfc bias None (bias=False in the model),
    BN_a and BN_b with random affines and running statistics."""
    c1, c2 = shape.split, shape.channels - shape.split
    return two_norm_problem(shape, batch, dtype, device, mode, gen,
                            weight_shapes=[(c1, c1, 3, 3), (c2, c2, 1, 2)],  # conv, cfc
                            norm_channels=[c2, c2])                         # BN_a, BN_b


# (x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, training), backend
functional = two_norm_functional(pk.channel_attention)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    hw = shape.height * shape.width
    c1, c2 = shape.split, shape.channels - shape.split
    n, n2 = batch * shape.channels * hw, batch * c2 * hw
    params = 9 * c1 ** 2 + 2 * c2 ** 2 + 8 * c2  # conv, W_ch, BN_a and BN_b (4 vectors each)
    if mode == "fwd":
        return (2 * n + n2 + params) * elem
    return (5 * n + 3 * n2 + 3 * params) * elem


def skip(shape: StageShape, batch: int, mode: str):
    if mode == "fwd+bwd" and batch < 2:
        return "training needs a batch of at least 2 (BN_a normalises a 1 x 1 map over the batch)"
    return None


FAMILY = Family(
    name="channel_attention",
    title="PAT_ch (partial conv + Gaussian channel attention): pk.channel_attention",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.channel_attention, bytes_moved=bytes_moved, skip=skip,
    formulas={
        "fwd": "(2N + N2 + P) * e: read X, read X2 once more for its per-(sample, channel) "
               "mean and std (the gate needs all of them before any of Y2 can be written), "
               "write Y (N = B*C*H*W, N2 = B*C2*H*W elements, P = 9*C1^2 + 2*C2^2 + 8*C2 "
               "parameters, e = bytes per element)",
        "fwd+bwd": "(5N + 3N2 + 3P) * e: training forward as fwd (BN_b's batch statistics "
                   "follow from the per-(sample, channel) mean and std: no extra pass); "
                   "backward reads dY2 and X2 for the reductions (2N2), then reads dY and X "
                   "and writes dX (3N); parameters read twice, gradients written once",
    },
    mode_text={
        "fwd": "eval forward (training=False: BN_a, BN_b use running statistics) under "
               "torch.no_grad()",
        "fwd+bwd": "training forward (batch statistics; running statistics updated) + backward "
                   "into x, conv_weight, cfc_weight and the affines of BN_a and BN_b",
    },
    targets=fused_op_targets("fused PAT_ch") + [
        Target("cuda", "fwd", 256, "speedup_vs_best", 1 / 1.1,
               "CUDA PAT_ch within 10% of the faster of Triton and torch.compile at batch 256 "
               "(fwd)"),
    ],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
