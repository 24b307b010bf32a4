"""Benchmark the iRPE attention of PAT_sf: eager vs SDPA vs compiled FlexAttention vs Triton.

    python -m benchmarks.bench_rpe_attention [--dtypes float16] [--batches 256] [--quick] ...

O = softmax(scale * q k^T + table[h, bucket[i, j]]) v (dropout 0), q, k, v (B, heads, N, d),
table (heads, 81), bucket = pk.rpe_buckets(H, W). Shapes: the attention of stage 4 of
PATNet-T0, T2 and L (heads = 4, d = C2 / 4 = 48, 96, 240), read off the model code, on the
7 x 7 map of a 224 x 224 image (N = 49; batch 1, 64, 256) and on the 25 x 42 map of an
800 x 1344 detection image (N = 1050; batch 1 and 8). Providers, all on the same inputs:

* ``torch``: ``pk.rpe_attention(..., backend="torch")``, the authors' way: the (heads, N, N)
  bias and the (B, heads, N, N) scores are materialised;
* ``sdpa``: ``F.scaled_dot_product_attention`` with ``attn_mask = table[:, bucket]`` (the bias
  materialised, broadcast over the batch; its gradient reaches the table through the gather);
* ``flex``: ``torch.compile(flex_attention)`` with the table and the bucket map captured in
  ``score_mod``;
* ``triton``: ``pk.rpe_attention(..., backend="triton")``.

Throughput is reported in TFLOP/s (see FLOPS_TEXT) besides GB/s of a minimum byte count; every
provider is checked against the reference run in fp32 before it is timed. See
benchmarks/README.md.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import patnet_kernels as pk  # noqa: E402
from benchmarks.op_cli import main_of  # noqa: E402
from benchmarks.op_family import MODES, Family, Target  # noqa: E402
from benchmarks.op_inputs import Problem, random_activation  # noqa: E402
from benchmarks.op_shapes import StageShape, stage_shapes  # noqa: E402
from benchmarks.providers import Unavailable  # noqa: E402
from patnet.layers import RPESelfAttention  # noqa: E402
from patnet_kernels.reference import NUM_BUCKETS  # noqa: E402

MODELS = ("patnet_t0", "patnet_t2", "patnet_l")
CLS_INPUT = (224, 224)      # stage 4: 7 x 7, N = 49
DET_INPUT = (800, 1344)     # stage 4 (stride 32): 25 x 42, N = 1050
QUICK_DET_INPUT = (160, 288)  # --quick: 5 x 9, an odd map with a partial last key block
# FLOPs: the forward's two matmuls (q k^T and P v), 2 * N^2 * d each per (sample, head); the
# backward counted as BWD_FLOP_RATIO forwards (FlashAttention's convention: its five matmuls,
# the recomputed q k^T included). Softmax, bias and scaling are not counted.
BWD_FLOP_RATIO = 2.5
FLOPS_TEXT = {
    "fwd": "4 * B * heads * N^2 * d (q k^T and P v, 2 FLOPs per multiply-add; softmax, bias "
           "and scaling not counted)",
    "fwd+bwd": f"{1 + BWD_FLOP_RATIO:g} * 4 * B * heads * N^2 * d: the forward plus a backward "
               f"of {BWD_FLOP_RATIO:g} forwards (FlashAttention's convention: five matmuls, "
               "the recomputed q k^T included; a backward from stored scores needs four)",
}


def shapes(quick: bool):
    """Stage 4 of each model on the classification map, then on the detection map. --quick:
    one network (the shrunk networks of op_shapes.QUICK_CONFIG all have the same stage-4 width:
    C2 = 48, d = 12) on a 7 x 7 and a 5 x 9 map."""
    heads = lambda module: module.num_heads  # noqa: E731 - kept in StageShape.split
    models = MODELS[:1] if quick else MODELS
    det = QUICK_DET_INPUT if quick else DET_INPUT
    out = []
    for size, tag in ((CLS_INPUT, "cls"), (det, "det")):
        for model in models:
            out += stage_shapes(model, (RPESelfAttention,), heads, quick,
                                         input_hw=size, tag=tag, stages=(4,))
    return out


def default_batches(shape: StageShape, quick: bool):
    """Classification: 1, 64, 256. Detection: 1 (one image, inference) and 8 (a training batch
    that fills an H100 at N = 1050; detectors usually train with 2 images per GPU: see the
    README). --quick: 2 and 1."""
    if shape.tag == "det":
        return [1] if quick else [1, 8]
    return [2] if quick else [1, 64, 256]


def dims(shape: StageShape):
    """(heads, N, d)."""
    heads = shape.split
    return heads, shape.height * shape.width, shape.channels // heads


def row_info(shape: StageShape) -> dict:
    heads, n, d = dims(shape)
    return {"heads": heads, "tokens": n, "head_dim": d}


def build(shape: StageShape, batch: int, dtype, device, mode: str, gen) -> Problem:
    """q, k, v standard normal (B, heads, N, d), contiguous; a standard normal table (so that
    the bias matters; the model's starts at zero); the cached bucket map; scale d^-0.5."""
    heads, n, d = dims(shape)
    q, k, v = (random_activation((batch, heads, n, d), dtype, device, gen)
               for _ in range(3))
    table = random_activation((heads, NUM_BUCKETS), dtype, device, gen)
    bucket = pk.rpe_buckets(shape.height, shape.width, device)
    leaves = []
    if mode == "fwd+bwd":
        leaves = [t.requires_grad_(True) for t in (q, k, v, table)]
    return Problem((q, k, v, table, bucket, d ** -0.5), leaves)


def functional(args, backend: str):
    q, k, v, table, bucket, scale = args
    return pk.rpe_attention(q, k, v, table, bucket, scale=scale, dropout_p=0.0, backend=backend)


def make_sdpa(problem: Problem):
    """SDPA with the bias gathered (heads, N, N) on every call, broadcast over the batch."""
    q, k, v, table, bucket, scale = problem.args

    def call():
        bias = table[:, bucket]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=scale)
    return call


def _flex_backward_refused(flex_attention, device) -> str:
    """torch's reason when FlexAttention has no backward on ``device`` (the CPU in torch 2.x:
    it refuses inputs that require a gradient before computing anything), else ""."""
    x = torch.zeros(1, 1, 16, 16, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(x, x, x)
    except NotImplementedError as e:
        return f"FlexAttention on {device.type}: {str(e).splitlines()[0]}"
    except Exception:  # noqa: BLE001 - no verdict from the eager probe: try the compiled one
        return ""
    return ""


def make_flex(problem: Problem, compile_mode: str = "default", compiled: bool = True):
    """flex_attention with score_mod adding table[h, bucket[q_idx, kv_idx]] (both captured),
    compiled with torch.compile (``compiled=False``: eager flex_attention, which materialises
    the scores; the smoke test checks score_mod with it). No padding or block sizes are given:
    FlexAttention masks N that is not a multiple of its blocks and pads the head dim itself."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise Unavailable("unavailable", f"torch {torch.__version__} has no "
                                                  f"FlexAttention ({e})") from None
    q, k, v, table, bucket, scale = problem.args
    if problem.leaves and q.device.type != "cuda":  # it has a backward on CUDA
        reason = _flex_backward_refused(flex_attention, q.device)
        if reason:
            raise Unavailable("unavailable", reason)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, bucket[q_idx, kv_idx]]

    if compiled:
        fn = torch.compile(flex_attention, dynamic=False, mode=compile_mode)
        return lambda: fn(q, k, v, score_mod=score_mod, scale=scale)

    def eager():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile"
            return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    return eager


def bytes_moved(shape: StageShape, batch: int, elem: int, mode: str) -> int:
    heads, n, d = dims(shape)
    x = batch * heads * n * d
    table = heads * NUM_BUCKETS
    ids = 4 * n * n  # the bucket map as int32, what the Triton kernels read
    if mode == "fwd":
        return (4 * x + table) * elem + ids
    return (11 * x + 3 * table) * elem + 2 * ids


def flops(shape: StageShape, batch: int, mode: str) -> int:
    heads, n, d = dims(shape)
    forward = 4 * batch * heads * n * n * d
    return forward if mode == "fwd" else int((1 + BWD_FLOP_RATIO) * forward)


def _n49(row: dict) -> bool:
    return row["height"] * row["width"] == 49


FAMILY = Family(
    name="rpe_attention",
    title="PAT_sf attention with the iRPE bias: pk.rpe_attention",
    shapes=shapes, build=build, functional=functional,
    reference=pk.reference.rpe_attention, bytes_moved=bytes_moved,
    formulas={
        "fwd": "(4X + T) * e + 4 N^2: read q, k, v, write O (X = B*heads*N*d elements each), "
               "read the table (T = heads*81), e = bytes per element; the bucket map read once "
               "as int32",
        "fwd+bwd": "(11X + 3T) * e + 8 N^2: forward 4X + T; backward reads q, k, v, dO and "
                   "writes dq, dk, dv (7X; O and the row log-sum-exp not counted), reads T and "
                   "writes dT; the bucket map read in both passes",
    },
    mode_text={
        "fwd": "forward under torch.no_grad() (dropout 0)",
        "fwd+bwd": "forward + backward into q, k, v and the table (dropout 0)",
    },
    base_providers=("torch", "triton", "cuda"),
    extra_providers={"sdpa": (MODES, make_sdpa), "flex": (MODES, make_flex)},
    order=("torch", "sdpa", "flex", "triton", "cuda"),
    compiled_providers=("flex",),
    speedups={"eager": "torch", "sdpa": "sdpa", "flex": "flex"},
    flops=flops, flop_formulas=FLOPS_TEXT,
    default_dtypes="float16,bfloat16,float32",
    default_batches=default_batches,
    fp32_reference=True,
    row_info=row_info,
    targets=[
        Target("triton", "fwd+bwd", 256, "speedup_vs_sdpa", 1.5,
               "Triton >= 1.5x faster than SDPA with the bias materialised at N = 49, batch "
               "256, fwd+bwd", where=_n49),
        Target("triton", "fwd+bwd", 256, "speedup_vs_flex", 2.0,
               "Triton >= 2x faster than compiled FlexAttention at N = 49, batch 256, "
               "fwd+bwd", where=_n49),
        Target("triton", "fwd+bwd", 256, "speedup_vs_eager", 3.0,
               "Triton >= 3x faster than eager at N = 49, batch 256, fwd+bwd", where=_n49),
    ],
    notes=["C is C2, the attention width of PAT_sf; heads = 4 and d = C2 / 4 (row fields "
           "heads, head_dim, tokens in the JSON); shapes <model>.s4.cls: the 7 x 7 map of a "
           "224 x 224 image, <model>.s4.det: the 25 x 42 map of an 800 x 1344 image",
           "max err: against the reference computed in fp32 on the same (upcast) inputs, so "
           "eager's own rounding in fp16 / bf16 shows too",
           "q, k, v are contiguous (B, heads, N, d) tensors (PAT_sf passes strided views of its "
           "qkv projection; the torch and triton providers take those too)"],
)


main = main_of(FAMILY)


if __name__ == "__main__":
    sys.exit(main())
