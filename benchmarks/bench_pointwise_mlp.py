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
from benchmarks.op_inputs import (Problem, random_activation,  # noqa: E402
                                  random_spatial_attention, random_weight,
                                  spatial_attention_size, stage_activation)
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import FasterNetBlock, PATNetBlock  # noqa: E402


def shapes(quick: bool):
    hidden = lambda block: block.mlp[0].out_channels  # noqa: E731 - kept in ``split``
    return (stage_shapes("patnet_t2", (PATNetBlock,), hidden, quick)
            + stage_shapes("fasternet_t2", (FasterNetBlock,), hidden, quick)
            + stage_shapes("patnet_t1", (PATNetBlock,), hidden, quick, stages=(4,)))


def _spatial(shape: StageShape) -> bool:
    """PAT_sp after the MLP: PATNet-T1's (its stage-4 MLPs run this op with it)."""
    return shape.model == "patnet_t1"


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The arguments the inference path passes: x, the folded W1 and b1, W2 (no bias: the
    model's second conv has none), the block's input as the residual, ReLU (T2); for
    PATNet-T1, GELU and PAT_sp's tensors (BN_d folded: a conv bias; BN_c's running
    statistics)."""
    c, hidden = shape.channels, shape.split
    x = stage_activation(shape, batch, dtype, device, gen)
    w1 = random_weight((hidden, c, 1, 1), dtype, device, gen)
    b1 = random_activation((hidden,), dtype, device, gen) * 0.1
    w2 = random_weight((c, hidden, 1, 1), dtype, device, gen)
    residual = stage_activation(shape, batch, dtype, device, gen)
    if not _spatial(shape):
        return Problem((x, w1, b1, w2, None, residual, "relu"))
    spatial = random_spatial_attention(c, dtype, device, gen)
    return Problem((x, w1, b1, w2, None, residual, "gelu", spatial))


def functional(args, backend: str):
    x, w1, b1, w2, b2, residual, activation, *spatial = args
    return pk.pointwise_mlp(x, w1, b1, w2, b2, residual=residual, activation=activation,
                            spatial=spatial[0] if spatial else None, backend=backend)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    n = batch * shape.channels * shape.height * shape.width
    c, hidden = shape.channels, shape.split
    spatial = spatial_attention_size(c)[0] if _spatial(shape) else 0
    return (3 * n + 2 * c * hidden + hidden + spatial) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    spatial = spatial_attention_size(shape.channels)[1] if _spatial(shape) else 0
    return batch * shape.height * shape.width * (4 * shape.channels * shape.split + spatial)


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for the MLP)
    name="pointwise_mlp",
    title="the block's MLP for inference (BN folded, residual): pk.pointwise_mlp",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.pointwise_mlp, bytes_moved=bytes_moved,
    formulas={"fwd": "(3N + 2 C Hd + Hd [+ P^2 + P + 5Q]) * e: read X and the residual, write "
                     "Y (N = B*C*H*W elements; the hidden B*Hd*H*W activation stays on chip), "
                     "read W1, b1, W2 [and PATNet-T1's PAT_sp: P = C/2 = C - Q] (Hd = 2C hidden "
                     "channels, e = bytes per element)"},
    mode_text={"fwd": "eval forward under torch.no_grad()"},
    modes=("fwd",),  # (an inference op: no backward)
    flops=flops,
    flop_formulas={"fwd": "4 B H W C Hd [+ 2 B H W (P^2 + Q)]: the two 1x1 convs (multiply-add "
                          "= 2 FLOPs) [and PAT_sp's conv and gate]"},
    targets=[Target("triton", "fwd", 256, "speedup_vs_compile", 1.3,
                    "fused MLP >= 1.3x torch.compile of the reference at batch 256 (fwd)")],
    notes=["the eager reference writes the 2C hidden activation and reads it back twice (ReLU "
           "in place, then the second conv) and adds the residual in a separate pass: 13 "
           "activation passes of C channels against the fused kernel's 3"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
