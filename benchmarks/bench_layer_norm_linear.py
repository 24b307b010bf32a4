"""Benchmark PAT_sf's LayerNorm and qkv projection for inference: eager reference vs
torch.compile vs Triton.

    python -m benchmarks.bench_layer_norm_linear [--dtypes float16] [--batches 256] [--quick] ...

pk.layer_norm_linear: Linear(LayerNorm(tokens of X2)), the LayerNorm's affine folded into the
projection (what ``patnet.optimize_for_inference`` runs in PAT_sf): X2 = x[:, C1:] of the block
input x (B, C, H, W), a channel slice as the inference path passes it (in the block input's
layout: ``--layout channels_last`` lays x out channels_last, so X2 is a channel slice of a
channels_last map), tokens (B, H * W, C_OUT = 3 C2) out. Shapes: the PAT_sf blocks of stage 4
of PATNet-T0, T2 and L (those of bench_rpe_attention.py) on the 7 x 7 map of a 224 x 224
image; ``channels`` is C2 (the op's C_IN, as the auto rule keys it), ``split`` C1. Mode: fwd
only (an inference op: it has no backward). See benchmarks/README.md (its layout section: the
harness modules).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import List

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target  # noqa: E402
from benchmarks.op_inputs import Problem, random_activation, random_weight  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from patnet.layers import PATSelfMixer  # noqa: E402

MODELS = ("patnet_t0", "patnet_t2", "patnet_l")
# Stage 4: 7 x 7, --quick too (the shrunk network's own 32 x 32 input leaves a 1 x 1 map: one
# token per sample, too little for a smoke run of the kernel's pixel tiles).
CLS_INPUT = (224, 224)
EPS = 1e-6  # PAT_sf's LayerNorm2d's
QKV = 3     # C_OUT = 3 C2: q, k and v


def shapes(quick: bool) -> List[StageShape]:
    """The PAT_sf blocks of stage 4 of each model, read off the model code: ``channels`` C2 (X2,
    the op's input), ``split`` C1 (where X2 starts in the block input). --quick: one network
    (the shrunk networks of op_shapes.QUICK_CONFIG all have C2 = 48) on the 7 x 7 map."""
    conv_channels = lambda module: module.dim_conv3  # noqa: E731 - C1, kept in split
    found = []
    for model in (MODELS[1:2] if quick else MODELS):  # (T2 shrunk)
        found += [dataclasses.replace(s, channels=s.channels - s.split)
                  for s in stage_shapes(model, (PATSelfMixer,), conv_channels, quick,
                                        input_hw=CLS_INPUT, stages=(4,))]
    return found


def row_info(shape: StageShape) -> dict:
    return {"block_channels": shape.split + shape.channels, "out_channels": QKV * shape.channels}


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The block input x (B, C1 + C2, H, W), the folded qkv weight (3 C2, C2) and bias (3 C2,)
    and C1: the op gets x[:, C1:] (functional, reference), so the harness's layout applies to
    the block input and X2 is the channel slice the inference path passes, in either layout."""
    c1, c2 = shape.split, shape.channels
    x = random_activation((batch, c1 + c2, shape.height, shape.width), dtype, device, gen)
    weight = random_weight((QKV * c2, c2), dtype, device, gen)
    bias = random_activation((QKV * c2,), dtype, device, gen) * 0.1
    return Problem((x, weight, bias, c1))


def functional(args, backend: str):
    x, weight, bias, c1 = args
    return pk.layer_norm_linear(x[:, c1:], weight, bias, eps=EPS, backend=backend)


def reference(x, weight, bias, c1):
    """pk.reference.layer_norm_linear on X2 = x[:, C1:] (B, C2, H, W): (B, H * W, 3 C2)."""
    return pk.reference.layer_norm_linear(x[:, c1:], weight, bias, EPS)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    c2 = shape.channels
    pixels = batch * shape.height * shape.width
    weights = QKV * c2 * (c2 + 1)
    return (pixels * c2 + pixels * QKV * c2 + weights) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    c2 = shape.channels
    return 2 * batch * shape.height * shape.width * QKV * c2 * c2


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for it)
    name="layer_norm_linear",
    title="PAT_sf's LayerNorm and qkv projection for inference (LN affine folded): "
          "pk.layer_norm_linear",
    shapes=shapes, build=build, functional=functional,
    reference=reference, bytes_moved=bytes_moved,
    formulas={"fwd": "(N_in + N_out + C_out (C_in + 1)) * e: read X2 once (where it lies in "
                     "the block input), write the tokens, read W and b (N_in = B C_in H W, "
                     "N_out = B H W C_out, C_in = C2, C_out = 3 C2, e = bytes per element)"},
    mode_text={"fwd": "eval forward under torch.no_grad()"},
    modes=("fwd",),  # (an inference op: no backward)
    flops=flops,
    flop_formulas={"fwd": "2 B H W C_out C_in (the projection; the LayerNorm not counted)"},
    row_info=row_info,
    targets=[Target("triton", "fwd", 256, "speedup_vs_eager", 1.0,
                    "the fused LayerNorm + projection no slower than the reference at batch "
                    "256 (fwd): else the inference path should not run it")],
    notes=["C is C2, the channels of X2 = x[:, C1:] (row fields block_channels C = C1 + C2, "
           "out_channels 3 C2 in the JSON); every provider gets the block input and takes "
           "the slice itself (a view: not timed apart)",
           "the reference copies the strided slice and writes the normalised tokens in "
           "float32 before the GEMM; the fused kernel reads X2 where it lies (each pixel's "
           "moments first, then its values normalised in float32 as the GEMM reads them)"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
