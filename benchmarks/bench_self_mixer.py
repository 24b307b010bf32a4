"""Benchmark PAT_sf's output: eager reference vs torch.compile vs Triton vs CUDA.

    python -m benchmarks.bench_self_mixer [--dtypes float16] [--batches 256] [--quick] ...

pk.self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, residual=True): the
stage-4 block's first residual sum, x + [conv3x3(X1) | tokens @ proj_weight^T + proj_bias as a
map], X1 = x[:, :C1], the tokens (B, N = H * W, C2) the attention's output with its heads
merged, as PATNet's PAT_sf blocks (and their inference path) call it. Shapes: the PAT_sf blocks
of stage 4 of PATNet-T0, T2 and L (those of bench_rpe_attention.py) on the 7 x 7 map of a
224 x 224 image; ``channels`` is C, ``split`` C1. Modes: fwd, and fwd+bwd (a training op:
gradients of x, both weights, the bias and the tokens). See benchmarks/README.md (its layout
section: the harness modules).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target  # noqa: E402
from benchmarks.op_inputs import (Problem, random_activation, random_weight,  # noqa: E402
                                  stage_activation)
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import PATSelfMixer  # noqa: E402

MODELS = ("patnet_t0", "patnet_t2", "patnet_l")
# Stage 4: 7 x 7, --quick too (the shrunk network's own 32 x 32 input leaves a 1 x 1 map).
CLS_INPUT = (224, 224)


def shapes(quick: bool) -> List[StageShape]:
    """The PAT_sf blocks of stage 4 of each model, read off the model code (``channels`` C,
    ``split`` C1); --quick: the shrunk PATNet-T2 on the 7 x 7 map."""
    split = lambda module: module.dim_conv3  # noqa: E731 - C1, the conv channels
    return [shape for model in (MODELS[1:2] if quick else MODELS)
            for shape in stage_shapes(model, (PATSelfMixer,), split, quick,
                                      input_hw=CLS_INPUT, stages=(4,))]


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """x (B, C, H, W), the conv weight (C1, C1, 3, 3), the tokens (B, H * W, C2), the
    projection (C2, C2) and its bias (C2,); in fwd+bwd all of them require a gradient."""
    c1, c2 = shape.split, shape.channels - shape.split
    x = stage_activation(shape, batch, dtype, device, gen)
    conv_weight = random_weight((c1, c1, 3, 3), dtype, device, gen)
    tokens = random_activation((batch, shape.height * shape.width, c2), dtype, device, gen)
    proj_weight = random_weight((c2, c2), dtype, device, gen)
    proj_bias = random_activation((c2,), dtype, device, gen) * 0.1
    args = (x, conv_weight, tokens, proj_weight, proj_bias)
    leaves = [t.requires_grad_(True) for t in args] if mode == "fwd+bwd" else []
    return Problem(args, leaves)


def functional(args, backend: str):
    return pk.self_mixer_output(*args, backend=backend, residual=True)


def reference(x, conv_weight, tokens, proj_weight, proj_bias):
    """pk.reference.self_mixer_output with the residual, no dropout: (B, C, H, W)."""
    return pk.reference.self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias, None,
                                          residual=True)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    c, c1 = shape.channels, shape.split
    c2 = c - c1
    pixels = batch * shape.height * shape.width
    weights = c1 * c1 * 9 + c2 * (c2 + 1)
    forward = (2 * pixels * c + pixels * c2 + weights) * elem  # x read, y written, tokens read
    if mode == "fwd":
        return forward
    # backward: read dy (C), write dx (C) and d tokens (C2); read x's X1 and the tokens again
    # for the weight gradients; read and write the weights' gradients
    return forward + (pixels * (2 * c + c2) + pixels * (c1 + c2) + 2 * weights) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    c, c1 = shape.channels, shape.split
    c2 = c - c1
    forward = 2 * batch * shape.height * shape.width * (9 * c1 * c1 + c2 * c2)
    return forward if mode == "fwd" else 3 * forward  # (backward: input and weight gradients)


FAMILY = Family(
    name="self_mixer",
    title="PAT_sf's output with the block's first residual sum: pk.self_mixer_output",
    shapes=shapes, build=build, functional=functional,
    reference=reference, bytes_moved=bytes_moved,
    formulas={"fwd": "(2 N + N_t + P) * e: read x, write y, read the tokens, read the weights "
                     "(N = B C H W, N_t = B H W C2, P = 9 C1^2 + C2 (C2 + 1), e = bytes per "
                     "element)",
              "fwd+bwd": "fwd + (N + N + N_t + B H W (C1 + C2) + 2 P) * e: read dy, write dx "
                         "and d tokens, read X1 and the tokens for the weight gradients, the "
                         "weights' gradients"},
    mode_text={"fwd": "eval forward under torch.no_grad()",
               "fwd+bwd": "forward and backward (gradients of x, the tokens and the weights)"},
    flops=flops,
    flop_formulas={"fwd": "2 B H W (9 C1^2 + C2^2): the 3 x 3 conv and the projection",
                   "fwd+bwd": "3x fwd: input and weight gradients of both"},
    targets=[Target("triton", "fwd", 256, "speedup_vs_eager", 1.0,
                    "the fused output no slower than the reference at batch 256 (fwd): else "
                    "the inference path should not run it")],
    notes=["C is the block's channels, split C1 (the conv's); C2 = C - C1 the attention's, "
           "whose merged heads are the tokens",
           "the reference runs the conv, the projection, a transpose copy, the concatenation "
           "and the residual add; the fused kernel writes x + both halves in one pass"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
