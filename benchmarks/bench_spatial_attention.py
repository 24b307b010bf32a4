"""Benchmark PAT_sp (partial spatial attention): eager reference vs torch.compile vs Triton.

    python -m benchmarks.bench_spatial_attention [--dtypes float16] [--batches 256] [--quick] ...

Shapes: the MLP outputs of PATNet-T2 (the block's dim, every stage), read off the model code at
224 x 224 with use_spatial_attn=True. PATNet-T2 as released has no PAT_sp (only T1 enables it);
these are the shapes where it would run. Modes: fwd is the eval forward, fwd+bwd the training
forward and its backward. See benchmarks/README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, fused_op_targets  # noqa: E402
from benchmarks.op_inputs import Problem, two_norm_functional, two_norm_problem  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import PartialSpatialAttention  # noqa: E402


def shapes(quick: bool):
    return stage_shapes("patnet_t2", (PartialSpatialAttention,), lambda module: module.dim_conv,
                        quick, use_spatial_attn=True)


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The arguments PartialSpatialAttention.forward passes: conv bias None (bias=False in the
    model), BN_c over Q channels and BN_d over P with random affines and running statistics."""
    p = shape.split
    q = shape.channels - p
    return two_norm_problem(shape, batch, dtype, device, mode, gen,
                            weight_shapes=[(1, q, 1, 1), (p, p, 1, 1)],  # gate, 1x1 conv
                            norm_channels=[q, p])                       # BN_c, BN_d


# (m, gate_weight, conv_weight, conv_bias, bn_c, bn_d, training), backend
functional = two_norm_functional(pk.spatial_attention)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    p = shape.split
    q = shape.channels - p
    n = batch * shape.channels * shape.height * shape.width
    params = q + p ** 2 + 4 * q + 4 * p  # gate, 1x1 conv, BN_c and BN_d (4 vectors each)
    if mode == "fwd":
        return (2 * n + params) * elem
    return (8 * n + 3 * params) * elem


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for PAT_sp)
    name="spatial_attention",
    title="PAT_sp (partial spatial attention): pk.spatial_attention",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.spatial_attention, bytes_moved=bytes_moved,
    formulas={
        "fwd": "(2N + P) * e: read M, write Y; everything is per pixel in eval "
               "(N = B*C*H*W elements, P = Q + P'^2 + 4Q + 4P' parameters with P' = C/2 conv "
               "channels, Q = C - P', e = bytes per element)",
        "fwd+bwd": "(8N + 3P) * e: training forward reads M for the batch statistics of "
                   "Ma*s and Mb, then reads M and writes Y (3N); backward reads dY and M for "
                   "the BN reductions (2N), then reads dY and M and writes dM (3N); parameters "
                   "read twice, gradients written once",
    },
    mode_text={
        "fwd": "eval forward (training=False: BN_c, BN_d use running statistics) under "
               "torch.no_grad()",
        "fwd+bwd": "training forward (batch statistics; running statistics updated) + backward "
                   "into m, gate_weight, conv_weight and the affines of BN_c and BN_d",
    },
    notes=["PATNet-T2 as released has no PAT_sp (only T1 enables it): the shapes are T2's "
           "block dims where it would run (create_model('patnet_t2', use_spatial_attn=True))"],
    targets=fused_op_targets("fused PAT_sp"),
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
