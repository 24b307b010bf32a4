"""Benchmark the stem and the merging layers for inference: eager reference vs torch.compile vs
Triton.

    python -m benchmarks.bench_patch_conv [--dtypes float16] [--batches 256] [--quick] ...

pk.patch_conv: conv(x, W, b) with kernel size = stride = k, the BatchNorm folded into W and b
(what ``patnet.optimize_for_inference`` runs): the stem, 4 x 4 from the 3-channel image, and
the merging layers, 2 x 2 from C to 2C, of PATNet-T2 and FasterNet-T2 at 224 x 224. The stem
reads the float32 image whatever the benchmark dtype (as under autocast: the reference casts
it to the weight's dtype first, the fused kernel converts it as it reads it). Mode: fwd only
(an inference op: it has no backward). See benchmarks/README.md (its layout section: the
harness modules).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import Family, Target  # noqa: E402
from benchmarks.op_inputs import Problem, random_activation, random_weight  # noqa: E402
from benchmarks.op_shapes import StageShape, meta_network  # noqa: E402
from patnet.layers import PatchEmbed, PatchMerging  # noqa: E402

MODELS = ("patnet_t2", "fasternet_t2")


def _patch(shape: StageShape) -> int:
    """k: the stem's 4 x 4 (it feeds stage 1), the merging layers' 2 x 2."""
    return 4 if shape.stage == 1 else 2


def shapes(quick: bool) -> List[StageShape]:
    """The input of the stem and of each merging layer of each model, ``stage`` the stage it
    feeds, ``split`` its output channels (read off the models built on the meta device)."""
    found = []
    for name in MODELS:
        model, size = meta_network(name, quick)
        layers = [m for m in model.modules() if isinstance(m, (PatchEmbed, PatchMerging))]
        seen = []

        def hook(module, inputs, layer_index):
            _, c, h, w = inputs[0].shape
            conv = module.proj if isinstance(module, PatchEmbed) else module.reduction
            seen.append(StageShape(name, layer_index + 1, int(c), int(h), int(w),
                                   conv.out_channels, 1))

        handles = [m.register_forward_pre_hook(lambda mod, inp, i=i: hook(mod, inp, i))
                   for i, m in enumerate(layers)]
        with torch.no_grad():
            model(torch.empty(1, model.in_chans, size, size, device="meta"))
        for handle in handles:
            handle.remove()
        found += seen
    return found


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """The arguments the inference path passes: x (the stem's: the float32 image), the folded
    weight and bias."""
    k = _patch(shape)
    x_dtype = torch.float32 if shape.stage == 1 else dtype
    x = random_activation((batch, shape.channels, shape.height, shape.width), x_dtype, device,
                          gen)
    weight = random_weight((shape.split, shape.channels, k, k), dtype, device, gen)
    bias = random_activation((shape.split,), dtype, device, gen) * 0.1
    return Problem((x, weight, bias))


def functional(args, backend: str):
    x, weight, bias = args
    return pk.patch_conv(x, weight, bias, backend=backend)


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    k = _patch(shape)
    x_elem = 4 if shape.stage == 1 else elem
    out = batch * shape.split * (shape.height // k) * (shape.width // k)
    weights = shape.split * (shape.channels * k * k + 1)
    return batch * shape.channels * shape.height * shape.width * x_elem + (out + weights) * elem


def flops(shape: StageShape, batch: int, mode: str) -> int:
    k = _patch(shape)
    out_pixels = batch * (shape.height // k) * (shape.width // k)
    return 2 * out_pixels * shape.split * shape.channels * k * k


FAMILY = Family(
    base_providers=("torch", "torch.compile", "triton"),  # (no CUDA kernel for it)
    name="patch_conv",
    title="the stem and the merging layers for inference (BN folded): pk.patch_conv",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.patch_conv, bytes_moved=bytes_moved,
    formulas={"fwd": "N_in * e_in + (N_out + C_out (C_in k^2 + 1)) * e: read X once (the "
                     "stem's float32 image: e_in = 4), write Y, read W and b (N = elements of "
                     "the map, e = bytes per element)"},
    mode_text={"fwd": "eval forward under torch.no_grad()"},
    modes=("fwd",),  # (an inference op: no backward)
    flops=flops,
    flop_formulas={"fwd": "2 B (H / k) (W / k) C_out C_in k^2"},
    targets=[Target("triton", "fwd", 256, "speedup_vs_eager", 1.0,
                    "the fused conv no slower than the reference (cuDNN) at batch 256 (fwd): "
                    "else the inference path should not run it")],
    notes=["the reference casts the stem's float32 image to the weight's dtype in a pass of "
           "its own (as autocast does); the fused kernel converts it as it reads it, and can "
           "take the next PAT_ch block's X2 statistics in its epilogue (not timed here)"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
