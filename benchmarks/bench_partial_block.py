"""Benchmark a whole FasterNet or PAT_ch block in inference (PATNet-T1's with its PAT_sp): eager
reference vs torch.compile vs Triton.

    python -m benchmarks.bench_partial_block [--dtypes float16] [--batches 256] [--quick] ...

pk.partial_block: x + MLP(mixer(x)) with the mixer PConv (FasterNet-T2's blocks) or PAT_ch in
eval (PATNet-T2's stage 1-3 blocks), BatchNorms folded, ReLU; x + PAT_sp(MLP(PAT_ch(x))) with
GELU (PATNet-T1's stage 1-3 blocks, PAT_sp's BN_d folded into its conv): what
``patnet.optimize_for_inference(model, backend="triton")`` runs per block. Shapes read off the
model code at 224 x 224. Mode: fwd only (an inference op: it has no backward).
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
from benchmarks.op_inputs import (Problem, random_activation, random_batch_norm,  # noqa: E402
                                  random_spatial_attention, random_weight,
                                  spatial_attention_size, stage_activation)
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import FasterNetBlock, PATNetBlock  # noqa: E402


def shapes(quick: bool):
    c1 = lambda block: block.spatial_mixing.dim_conv3  # noqa: E731 - the conv channels
    return (stage_shapes("fasternet_t2", (FasterNetBlock,), c1, quick)
            + stage_shapes("patnet_t2", (PATNetBlock,), c1, quick, stages=(1, 2, 3))
            + stage_shapes("patnet_t1", (PATNetBlock,), c1, quick, stages=(1, 2, 3)))


def _pat_ch(shape: StageShape) -> bool:
    return shape.model.startswith("patnet")


def _spatial(shape: StageShape) -> bool:
    """PAT_sp after the MLP: PATNet-T1's blocks."""
    return shape.model == "patnet_t1"


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The reference's arguments as the inference path passes them: PAT_ch with BN_a folded
    (W_ch and a bias) and BN_b from running statistics; the MLP's W1 and b1 folded, W2; for
    PATNet-T1 then (statistics, return_statistics, residual) as by default and PAT_sp's
    tensors (BN_d folded: a conv bias; BN_c from running statistics)."""
    c, c1 = shape.channels, shape.split
    c2, hidden = c - c1, 2 * c
    x = stage_activation(shape, batch, dtype, device, gen)
    conv = random_weight((c1, c1, 3, 3), dtype, device, gen)
    gate = [None, None, None, None]
    if _pat_ch(shape):
        gate = [random_weight((c2, c2, 1, 2), dtype, device, gen),
                random_activation((c2,), dtype, device, gen) * 0.1, None,
                random_batch_norm(c2, dtype, device, gen, training=False)]
    w1 = random_weight((hidden, c, 1, 1), dtype, device, gen)
    b1 = random_activation((hidden,), dtype, device, gen) * 0.1
    w2 = random_weight((c, hidden, 1, 1), dtype, device, gen)
    if not _spatial(shape):
        return Problem((x, conv, *gate, w1, b1, w2, None, "relu"))
    spatial = random_spatial_attention(c, dtype, device, gen)
    return Problem((x, conv, *gate, w1, b1, w2, None, "gelu", None, False, True, spatial))


def functional(args, backend: str):
    x, conv, cfc_weight, cfc_bias, bn_a, bn_b, w1, b1, w2, b2, activation, *rest = args
    return pk.partial_block(x, conv, w1, b1, w2, b2, cfc_weight=cfc_weight, cfc_bias=cfc_bias,
                            bn_a=bn_a, bn_b=bn_b, activation=activation,
                            spatial=rest[-1] if rest else None, backend=backend)


def _parameters(shape: StageShape) -> int:
    c, c1 = shape.channels, shape.split
    c2, hidden = c - c1, 2 * c
    gate = 2 * c2 * c2 + c2 + 4 * c2 if _pat_ch(shape) else 0
    spatial = spatial_attention_size(c)[0] if _spatial(shape) else 0
    return 9 * c1 * c1 + gate + 2 * c * hidden + hidden + spatial


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    n = batch * shape.channels * shape.height * shape.width
    return (2 * n + _parameters(shape)) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    c, c1 = shape.channels, shape.split
    spatial = spatial_attention_size(c)[1] if _spatial(shape) else 0
    return batch * shape.height * shape.width * (2 * (9 * c1 * c1 + 4 * c * c) + spatial)


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for the block)
    name="partial_block",
    title="a FasterNet / PAT_ch block for inference (BN folded): pk.partial_block",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.partial_block, bytes_moved=bytes_moved,
    formulas={"fwd": "(2N + P) * e: the block's floor, read X and write Y once (N = B*C*H*W "
                     "elements, P = the folded parameters: 9 C1^2 conv, 2 C2^2 + 5 C2 PAT_ch "
                     "gate, 4 C^2 + 2C MLP, P^2 + P + 5Q PAT_sp (T1, P = C/2 = C - Q); e = "
                     "bytes per element). The Triton path moves this for a FasterNet block "
                     "(one kernel; the conv's one-pixel halo of X1 re-read from cache) and "
                     "0.75N more for a PAT_ch block (its statistics read X2 first)"},
    mode_text={"fwd": "eval forward under torch.no_grad()"},
    modes=("fwd",),  # (an inference op: no backward)
    flops=flops,
    flop_formulas={"fwd": "2 B H W (9 C1^2 + 4 C^2 [+ P^2 + Q]): the 3x3 conv on C1 channels, "
                          "the two 1x1 convs (C -> 2C -> C) [and PAT_sp's conv and gate]; the "
                          "PAT_ch gate's (B, C2) math is not counted"},
    targets=[Target("triton", "fwd", 256, "speedup_vs_compile", 1.5,
                    "fused block >= 1.5x torch.compile of the reference at batch 256 (fwd)")],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
