"""Traffic model on the CPU: device kernels and activation bytes of one eval forward, per provider.

    python -m benchmarks.traffic                                   # every model, 64 x 64
    python -m benchmarks.traffic --models patnet_t2,fasternet_t2 --size 128 --json out.json
    python -m benchmarks.traffic --models patnet_t2 --autocast      # under bfloat16 autocast,
                                                                    # with the roofline
    python -m benchmarks.traffic --models patnet_t2 --train         # one training step
    python -m benchmarks.traffic --autocast --channels-last --size 224  # as the GPU benchmarks

For each model and provider, one eval forward under ``torch.no_grad()`` (fp32, NCHW, random
weights; with ``--autocast`` under bfloat16 autocast, whose weight casts are kernels too; with
``--channels-last`` the model and its input in channels_last, as the GPU benchmarks run AMP; with
``--train`` one training step's forward and backward of the training model instead, see
:func:`record_step`) is recorded with a ``TorchDispatchMode``, after one untraced warm-up forward (so caches
such as PAT_sf's bucket map are built: the steady state is counted). Providers:

- ``eager``: the reference model, ``patnet.create_model(name, backend="torch")`` (BatchNorms
  not folded: the authors' eager code);
- ``torch`` / ``triton`` / ``cuda``: our inference path,
  ``patnet.optimize_for_inference(model, backend=...)``. On the CPU ``backend="torch"`` runs the
  CPU eval forms of :mod:`patnet_kernels.eval_cpu` with their convolutions on oneDNN, as it
  does with ``PATNET_CPU_MEASURE=0`` (counted so on every machine: by default each call runs
  whichever of the reference and its eval form, and each convolution whichever of F.conv2d
  and oneDNN, was faster on this machine, :mod:`patnet_kernels.cpu_choice`; on a GPU it would
  run the reference ops);
  ``triton`` runs its kernels under ``TRITON_INTERPRET=1`` and ``cuda`` through the CPU emulation
  (``PATNET_CUDA_EMULATE=1``), both set by this module when no GPU is present.

**Kernels.** Every aten op the dispatcher sees counts as one kernel launch, except views (an op
whose every return aliases an input, by its schema: ``view``, ``permute``, ``slice``,
``expand``, ...; one that may alias but copied, as ``contiguous``, ``to`` or ``reshape`` of a
strided tensor inside a fused op, is one kernel that reads its input and writes its result)
and allocations and metadata ops that launch nothing (``empty*``, ``new_empty*``, ``detach``,
``lift_fresh``, ``resize_``, ``as_strided_``) and host work (``.item()``, a copy to the host;
the attention's dropout seed, drawn from the CPU generator on every device). An op
known to copy a non-contiguous input inside its kernel first (``native_layer_norm``, as PAT_sf's
LayerNorm gets its channel slice: the profiler shows the ``clone``, a dispatch mode does not)
counts that copy as a kernel of its own. A fused
op (``patnet_triton::*`` or ``patnet_cuda::*``) counts as the kernels it launches: for Triton the launches themselves,
seen by wrapping Triton's launcher (``JITFunction.run`` / the interpreter's
``InterpretedFunction.run``) while the op runs; for CUDA one per launcher call in
``csrc/bindings.cpp`` (every forward op calls one), plus, for both, the aten ops the op runs
around its kernels (weight re-layouts, the ``copy_`` of in-place PConv's saved X1, PAT_sf's
output projection by ``bmm``), recorded by a nested mode and counted by the aten rule.

**Bytes.** An aten op reads its tensor inputs and writes its tensor outputs, each counted once
at its logical size (numel x element size; a dimension of stride 0, an ``expand``, counted
once). In-place ops read and write their ``self`` (``relu_``: 2 N), except the overwriting ones
(``copy_``, ``fill_``, ``zero_``, which only write it); an ``out=`` argument is written, not
read. Views move nothing. A fused kernel is counted by what it must move: its tensor inputs read
once (one passed twice, as the block's input and its residual, once) and outputs written once,
except where it touches part of a tensor: the statistics of
PAT_ch read X2 only (both forms), in-place PConv reads the saved X1 and writes Y1 into X, PAT_sf's output
reads X1, not X2 (unless it adds the residual X; CUDA's conv kernel writes Y1 only, its
projection is the ``bmm`` beside it), the attention reads its bucket ids as int32, the MLP in
two passes (its default past 256 output channels) also writes and reads its hidden activation. Halo re-reads, register spills and caches are not modelled.

**Weight reads.** Each program of a fused kernel reads the weights its pixel tile needs, its
own copy: from L2 after the first read from memory, at a rate the copy bandwidth does not bound.
``weight_reads`` counts those bytes per image for the Triton backend's eval ops
(``FUSED_WEIGHT_READS``, at each kernel's GPU configuration: the MLP kernel's 64-pixel tiles
in fp16 read W1 and W2, 64 multiply-adds per weight read, so at 790 TFLOP/s they need over
12 TB/s from L2); aten ops' (cuBLAS, cuDNN: their own tiles) and the CUDA backend's are not
counted.

**Per image.** Every provider runs at batch 2 and batch 3: per-image bytes = bytes(batch 3) -
bytes(batch 2), so whatever does not scale with the batch (weights, their re-laid-out copies,
per-channel constants) cancels; "per batch" = bytes(batch 2) - 2 x per image is that remainder,
weights included. Kernel counts are the same at both batches (checked; a provider whose counts
differ is reported as an error). Not batch 1: there some reshapes are views that are copies at
any larger batch (eager's ``q @ k^T`` in PAT_sf: one ``clone`` per block more at batch >= 2),
so batch 1 launches fewer kernels than the general case.

**Floor.** Each layer's input read once and output written once, per image: the stem
(``patch_embed``), every block, every merging layer, the pre-head (pool, 1x1 conv, activation:
one layer) and the classifier, all of the folded model (its BatchNorms folded, as no inference
path computes them); one kernel per layer is the launch floor, and the folded model's
parameters read once the weight floor (2 bytes each under ``--autocast``).

**Roofline** (under ``--autocast`` only: 2-byte activations, and the matmul rate is fp16's;
eval, or with ``--train`` the training step, which has no floor). Each op's multiply-adds are
counted too (aten ops by :func:`patnet.flops.op_macs`, fvcore's convention, a convolution's
backward as one forward convolution per gradient; fused ops from their arguments,
``FUSED_MACS``: the Triton ops' as their kernels perform them on a GPU, per pixel tile,
``TILE_WORK``, a tile's rows past its map's last pixel included, the training ops' weight
gradients, attention and PAT_sp the arithmetic they must do; the CUDA ops' the arithmetic
they must do), and each kernel is given
the longer of its bytes at the copy bandwidth and its FLOPs (2 per multiply-add) at the
matmul rate, at batch 256 (its per-image bytes and multiply-adds times the batch, its
per-batch bytes once), the kernels one after the other (a fused op's launches as one: the
two-pass MLP's passes taken together): a lower bound on a provider's time per batch, no launch
gaps, every kernel perfect. The floor's: each layer one such kernel (its input
and output, its parameters once, its multiply-adds). The rates default to the H200's measured
4,244 GB/s copy and 790 TFLOP/s fp16 matmul (``--copy-gbps``, ``--matmul-tflops``, or
``--rates`` with a GPU's report of ``python -m benchmarks.machine_rates``). Weight reads are
timed only at a measured L2 rate (``--l2-gbps``, or the report's ``l2_read``): then a kernel
takes the longest of the three. Without one, the table gives the L2 rate each op would need
to keep its roofline time. It says where the time must go (how much of it is arithmetic no
fusion removes), not what a GPU will measure.

Everything is counted at the size run (``--size``, default 64; H, W >= 32), never scaled: the
activation bytes scale as H x W for every layer, but at sizes other than 224 PAT_sf's attention
is on another grid (2 x 2 at 64, 7 x 7 at 224), so the figures at 224 are not exactly 12.25x.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import env  # noqa: E402

if not torch.cuda.is_available():  # before triton or the CUDA extension are first imported
    env.use_cpu_emulation()

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

import patnet  # noqa: E402
import patnet.testing  # noqa: E402
from benchmarks.report import pretty, run_models, split_list  # noqa: E402
from benchmarks.report import write_json as write_json_file  # noqa: E402
from patnet.flops import layer_norm_macs, op_macs  # noqa: E402
from patnet.layers import FasterNetBlock, PatchEmbed, PatchMerging, PATNetBlock  # noqa: E402

PROVIDERS = ("eager", "torch", "triton", "cuda")
TRAIN_PROVIDERS = ("eager", "triton")  # (--train: the training model on a backend)
PROVIDER_LABELS = {"eager": "eager reference", "torch": "ours, backend=torch",
                   "triton": "ours, backend=triton", "cuda": "ours, backend=cuda"}
FUSED_NAMESPACES = ("patnet_triton", "patnet_cuda")
DEFAULT_SIZE = 64
BATCHES = (2, 3)  # batch 1 is special: some reshapes are views there, copies above

# aten ops that launch no kernel (allocation, metadata, a scalar read to the host: ``item``
# seen undecomposed inside a fused op, the attention's CPU dropout seed); views are found by
# their schema.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "detach", "lift_fresh", "resize_", "_reshape_alias", "alias", "_unsafe_view",
             "_local_scalar_dense", "item", "as_strided_"}  # (as_strided_: restrides self,
# e.g. a reduction's output to its input's channels_last; a mutating view by its schema)
# aten ops that read device data on the host: a synchronisation on a GPU, which also breaks a
# CUDA graph's capture (the tests pin that no forward or training step dispatches one).
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "aminmax", "is_nonzero", "equal",
                 "allclose", "_assert_async", "masked_select", "unique_consecutive", "_unique2"}
# Ops whose kernels (CPU and CUDA alike) copy a non-contiguous input to a contiguous one first,
# a copy no dispatch mode sees: counted as one more kernel that reads and writes the input.
COPIES_INPUT = {"native_layer_norm"}
# In-place ops that overwrite ``self`` without reading it.
WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_",
                   "exponential_"}
# The roofline's rates: the H200's measured copy bandwidth (read + write,
# results/h200-2026-12-04/README.md) and the fp16 matmul rate measured there (issue 13);
# --copy-gbps / --matmul-tflops for another GPU.
COPY_GBPS = 4244.0
MATMUL_TFLOPS = 790.0
ROOFLINE_BATCH = 256


def _weights_macs(*names: str):
    """MACs of a fused op that applies the named weights at every pixel of its (B, C', H', W')
    output, its first (a missing optional weight counts 0): the arithmetic it must do."""
    def count(bound: dict, out) -> int:
        y = _tensors(out)[0]
        pixels = y.shape[0] * y.shape[2] * y.shape[3]
        return pixels * sum(bound[n].numel() for n in names if bound.get(n) is not None)
    return count


def _mlp_config(bound: dict, out):
    """The MLP kernel's configuration of a ``pointwise_mlp*`` call on a GPU (its default: the
    same choice of one or two passes as under the interpreter)."""
    from patnet_kernels.triton import pointwise_mlp as mlp_kernel
    w1, w2, conv, sp_conv = (bound["w1"], bound["w2"], bound.get("conv_weight"),
                             bound.get("sp_conv_weight"))
    half = 0 if sp_conv is None else max(sp_conv.shape[0], w2.shape[0] - sp_conv.shape[0])
    return mlp_kernel.default_config(w1.shape[1], w1.shape[0], w2.shape[0],
                                     _tensors(out)[0].dtype, 0 if conv is None else
                                     conv.shape[0], half, interpret=False)


class TileWork(NamedTuple):
    """Programs of a fused kernel over pixel tiles: ``tiles`` tiles of ``block_p`` pixels,
    each applying ``weights`` weight elements (of ``element_size`` bytes) at every pixel of
    its tile, the rows past the map's last pixel too (a tile's dot products run whole), and
    reading them once (from L2 after their first read from memory)."""
    tiles: float
    block_p: int
    weights: int
    element_size: int


def _tiles(batch: int, samples: int, pixels: int, block_p: int) -> float:
    """Pixel tiles of a launch on ``batch`` samples taken as ``samples`` rows of ``pixels``
    each, ``block_p`` per tile: whole tiles per sample, or, where its tiles span samples (fewer
    rows than samples), the pixels over the tile, the launch's one partial tile left out (per
    image what a large batch sees: two or three samples would count it as a whole tile)."""
    if samples < batch:
        return pixels / block_p
    return samples * -(-pixels // block_p)


def mlp_tile_work(x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, head: int, spatial: int, per_sample: bool, affine: bool,
                  config) -> List[TileWork]:
    """The MLP kernel's tile work in one call with ``config`` (a ``pointwise_mlp.Config``) on
    x (B, C, H, W) into y with residual r (or y): per pixel tile, in one pass, the conv head's
    ``head`` taps and W1 once per output block (each block's programs recompute them) and W2
    once (with PAT_sp also its ``spatial`` weights: conv and gate); in two passes, the first
    pass's tiles the taps and W1 (its hidden activation, in x's layout, tiled as x), the
    second's W2. ``per_sample``: PAT_ch's affine or statistics; ``affine``: the affine (each
    pass's tiles ``pointwise_mlp.tile_grid``'s)."""
    from patnet_kernels.triton import pointwise_mlp as mlp_kernel
    size, block_p = w1.element_size(), config.block_p

    def tiles_of(r: torch.Tensor, y: torch.Tensor, per_sample: bool) -> float:
        grid = mlp_kernel.tile_grid(x, r, y, block_p, per_sample).grid
        return _tiles(x.shape[0], grid[1], x.shape[2] * x.shape[3] * x.shape[0] // grid[1],
                      block_p)

    tiles = tiles_of(r, y, per_sample)
    if config.two_pass:
        first = tiles_of(x, x, affine)
        return [TileWork(first, block_p, head + w1.numel(), size),
                TileWork(tiles, block_p, w2.numel(), size)]
    if spatial:
        return [TileWork(tiles, block_p, head + w1.numel() + w2.numel() + spatial, size)]
    blocks = -(-w2.shape[0] // (config.block_n + config.block_n2))
    return [TileWork(tiles, block_p, blocks * (head + w1.numel()) + w2.numel(), size)]


def weight_reads(work: Sequence[TileWork]) -> float:
    """Weight bytes the programs of ``work`` read."""
    return sum(w.tiles * w.weights * w.element_size for w in work)


def performed_macs(work: Sequence[TileWork]) -> float:
    """Multiply-adds the programs of ``work`` perform."""
    return sum(w.tiles * w.block_p * w.weights for w in work)


def _mlp_work(bound: dict, out) -> List[TileWork]:
    """:func:`mlp_tile_work` of a ``pointwise_mlp*`` call at the kernel's default
    configuration on a GPU (:func:`_mlp_config`)."""
    y, residual, conv = _tensors(out)[0], bound.get("residual"), bound.get("conv_weight")
    affine = bound.get("scale") is not None
    spatial = (0 if bound.get("sp_conv_weight") is None else
               bound["sp_conv_weight"].numel() + bound["gate_weight"].numel())
    return mlp_tile_work(bound["x"], y if residual is None else residual, y, bound["w1"],
                         bound["w2"], 0 if conv is None else conv.numel(), spatial,
                         affine or bound.get("stats_first", -1) >= 0, affine,
                         _mlp_config(bound, out))


def _patch_conv_tiles(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                      statistics: bool) -> List[TileWork]:
    """The patch conv kernel's on a GPU (x (B, C_IN, H, W), weight (C_OUT, C_IN, k, k), y its
    (B, C_OUT, H // k, W // k) output): per pixel tile the whole weight (each of its programs
    its block of output channels)."""
    from patnet_kernels.triton import patch_conv as kernel
    k = weight.shape[-1]
    config = kernel.config_for(weight.shape[1], weight.shape[0], k, weight.dtype,
                               interpret=False)
    samples, rows = kernel.pixel_rows(x, y, k, statistics)
    return [TileWork(_tiles(x.shape[0], samples, rows * y.shape[3], config.block_p),
                     config.block_p, weight.numel(), weight.element_size())]


def _patch_conv_work(bound: dict, out) -> List[TileWork]:
    """The stem's and merging layers' (``patch_conv``)."""
    return _patch_conv_tiles(bound["x"], bound["weight"], _tensors(out)[0],
                             bound["stats_first"] >= 0)


def _layer_norm_linear_work(bound: dict, out) -> List[TileWork]:
    """PAT_sf's LayerNorm + qkv (the patch conv's kernel, k = 1, into the tokens (B, N, C_OUT)
    as a channels_last map)."""
    x, weight, tokens = bound["x"], bound["weight"], _tensors(out)[0]
    y = tokens.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
    return _patch_conv_tiles(x, weight[:, :, None, None], y, False)


def _conv_work(*names: str, source: str = "x"):
    """Ops whose programs tile each sample's pixels of their ``source`` as the 3 x 3 conv kernels
    do on a GPU and apply the named weights whole per tile."""
    def work(bound: dict, out) -> List[TileWork]:
        from patnet_kernels.triton import partial_conv
        x = bound[source]
        c1 = bound[names[0]].shape[0]
        block_p = partial_conv._conv_blocks(c1, x.dtype, interpret=False)[0]
        tiles = _tiles(x.shape[0], x.shape[0], x.shape[2] * x.shape[3], block_p)
        return [TileWork(tiles, block_p, sum(bound[n].numel() for n in names),
                         bound[names[0]].element_size())]
    return work


def _self_mixer_work(bound: dict, out) -> List[TileWork]:
    """PAT_sf's output kernel: per pixel tile the conv's taps and the projection's weight;
    its tiles over the samples taken as rows of one where ``self_mixer_rows`` says."""
    from patnet_kernels.triton import partial_conv
    x, conv, proj = bound["x"], bound["conv_weight"], bound["proj_weight"]
    c1 = conv.shape[0]
    block_p = partial_conv._self_mixer_blocks(c1, x.shape[1] - c1, x.dtype, interpret=False)[0]
    samples, pixels = partial_conv.self_mixer_rows(x, bound["tokens"], _tensors(out)[0])
    return [TileWork(_tiles(x.shape[0], samples, pixels, block_p), block_p,
                     conv.numel() + proj.numel(), conv.element_size())]


# The tile work of each Triton eval op that applies weights per pixel tile (TileWork): where
# its multiply-adds (as performed: the tiles' rows past the map's last pixel, and a one-pass
# MLP's recomputed first layer, included) and its weight reads come from.
TILE_WORK = {
    "partial_conv3x3": _conv_work("weight"),
    "partial_conv3x3_": _conv_work("weight"),
    "channel_attention_apply": _conv_work("conv_weight"),
    "partial_conv3x3_input_grad": _conv_work("weight", source="grad_y"),
    "channel_attention_input_grad": _conv_work("conv_weight", source="grad_y"),
    "pointwise_mlp": _mlp_work,
    "pointwise_mlp_stats": _mlp_work,
    "pointwise_mlp_spatial": _mlp_work,
    "self_mixer_output": _self_mixer_work,
    "patch_conv": _patch_conv_work,
    "layer_norm_linear": _layer_norm_linear_work,
}


def _performed_macs(name: str):
    def count(bound: dict, out) -> int:
        return performed_macs(TILE_WORK[name](bound, out))
    return count


def _layer_norm_linear_macs(bound: dict, out) -> float:
    """The qkv projection's per tile, and each token's normalisation (no affine) once."""
    tokens = _tensors(out)[0]  # (B, N, C_OUT)
    return _performed_macs("layer_norm_linear")(bound, out) + layer_norm_macs(
        tokens.shape[0] * tokens.shape[1] * bound["weight"].shape[1], affine=False)


def _tile_weight_reads(name: str):
    def count(bound: dict, out) -> int:
        return weight_reads(TILE_WORK[name](bound, out))
    return count


def _attention_macs(bound: dict, out) -> int:
    q = bound["q"]  # (B, heads, N, d): q k^T and the probabilities times v
    return 2 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]


def _gate_macs(bound: dict, out) -> int:
    return bound["mean"].shape[0] * bound["cfc_weight"].numel()  # (B, C2) x (C2, C2, 1, 2)


def _attention_backward_macs(bound: dict, out) -> int:
    """The backward kernels': per head the logits recomputed, dP, dV, dK and dQ (5 products of
    N x N x d) where one key block holds every key (N <= its BLOCK_N: 7 x 7 tokens), else
    the dQ kernel's logits and dP again (7)."""
    from patnet_kernels.triton import rpe_attention
    q = bound["q"]
    one_block = q.shape[2] <= rpe_attention._config(q.shape[3], q.dtype, "kv")[1]
    return (5 if one_block else 7) * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]


def _weight_grad_macs(bound: dict, out) -> int:
    """A 3 x 3 conv's weight gradient (C1, C1, 3, 3) over grad_y's (B, C1, H, W) pixels."""
    grad_y = bound["grad_y"]
    return grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3] * _tensors(out)[0].numel()


def _self_mixer_backward_macs(bound: dict, out) -> int:
    """PAT_sf output's backward kernels: the 3 x 3 conv's input and weight gradients (the
    projection's are the aten matmuls beside them, counted there)."""
    grad_y = bound["grad_y"]
    pixels = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    return 2 * pixels * bound["conv_weight"].numel()


def _spatial_macs(gradients: int):
    """PAT_sp's (training op): the 1 x 1 conv (P x P) and the gate (Q) at every pixel of its
    (B, P + Q, H, W) input ``m``, once forward, ``gradients`` times backward."""
    def count(bound: dict, out) -> int:
        m = bound["m"]
        pixels = m.shape[0] * m.shape[2] * m.shape[3]
        return gradients * pixels * (bound["conv_weight"].numel() + bound["gate_weight"].numel())
    return count


def _gate_weight_reads(bound: dict, out) -> int:
    """PAT_ch's gate: W_ch once per group of samples (its programs' sample blocks)."""
    from patnet_kernels.triton import channel_attention
    block_b = channel_attention._gate_blocks(bound["mean"].shape[0], 0, interpret=False)[0]
    return -(-bound["mean"].shape[0] // block_b) * nbytes(bound["cfc_weight"])


def _zero(bound: dict, out) -> int:
    """An op with no multiply-adds, or whose programs read no weights."""
    return 0


_NO_WEIGHTS = {"channel_attention_stats": _zero, "channel_attention_chunk_stats": _zero}
# Multiply-adds each fused op of the Triton backend performs (its matrix products and
# convolutions, as patnet.flops counts the reference's; per pixel tile, as the kernel runs
# them on a GPU: TILE_WORK; the training ops' weight gradients, attention and PAT_sp: the
# arithmetic they must do), from its arguments by name and its output; an op not listed has
# no count, and a run with one has no roofline.
FUSED_MACS = {**{name: _performed_macs(name) for name in TILE_WORK}, **_NO_WEIGHTS,
              "layer_norm_linear": _layer_norm_linear_macs,
              "channel_attention_gate": _gate_macs, "rpe_attention_fwd": _attention_macs,
              # training: forward ops not run in eval, and the backward ops
              "batch_norm_act": _zero, "batch_norm_act_backward": _zero,
              "channel_attention_grad_sums": _zero,
              "channel_attention_gate_backward": lambda bound, out: 2 * _gate_macs(bound, out),
              "conv3x3_weight_grad": _weight_grad_macs,
              "self_mixer_output_backward": _self_mixer_backward_macs,
              "rpe_attention_bwd": _attention_backward_macs,
              "spatial_attention": _spatial_macs(1), "spatial_attention_backward": _spatial_macs(2)}
# The CUDA backend's: the arithmetic each op must do (its kernels' tiles are not modelled); its
# PAT_sf output runs the projection as the aten bmm beside its kernel (counted there).
CUDA_MACS = {"partial_conv3x3": _weights_macs("weight"),
             "partial_conv3x3_": _weights_macs("weight"),
             "channel_attention_stats": _zero,
             "channel_attention_apply": _weights_macs("conv_weight"),
             "rpe_attention_fwd": _attention_macs,
             "self_mixer_output": _weights_macs("conv_weight")}
# Weight bytes each fused op's programs read (the Triton backend's eval ops; see Op): a weight
# every program tile reads again is read from L2 after its first read from memory, at a rate
# the copy bandwidth does not bound. Not counted: biases and per-channel vectors, activation
# halos and the inputs several output blocks' programs, or one program's loops, re-read. An
# op not listed has no count (None), as have the CUDA backend's.
FUSED_WEIGHT_READS = {
    **{name: _tile_weight_reads(name) for name in TILE_WORK},
    **_NO_WEIGHTS,
    "channel_attention_gate": _gate_weight_reads,
    "rpe_attention_fwd": _zero,  # (its bias table: (2 * 7 - 1)^2 entries a head)
}

# Kernels each fused CUDA op launches in eval (one launcher call each, csrc/bindings.cpp).
CUDA_LAUNCHES = {"partial_conv3x3": 1, "partial_conv3x3_": 1, "channel_attention_stats": 1,
                 "channel_attention_apply": 1, "rpe_attention_fwd": 1, "self_mixer_output": 1}


class TensorInfo(NamedTuple):
    """What an op's input or output tensor was (TrafficRecorder(describe=True))."""
    dtype: torch.dtype
    shape: Tuple[int, ...]
    contiguous: bool      # contiguous NCHW (row-major)
    channels_last: bool   # 4-d and contiguous in channels_last

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(t.dtype, tuple(t.shape), t.is_contiguous(),
                   t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class Op(NamedTuple):
    """One recorded op: name ("aten::convolution", "patnet_triton::channel_attention_apply"),
    kernels launched, bytes read and written, and the fused op it ran inside ("" if none);
    whether its schema makes it a view (it returns only aliases of its inputs) or in place;
    with TrafficRecorder(describe=True) its tensor inputs and outputs (TensorInfo); ``macs``:
    its multiply-adds (None: not known, see FUSED_MACS); ``weight_reads``: the bytes of
    weights its programs read, each its own copy, from L2 after the first (a fused op's, see
    FUSED_WEIGHT_READS; None: not known; 0 for aten ops: not modelled)."""
    name: str
    kernels: int
    read: int
    written: int
    inside: str = ""
    view: bool = False
    mutates: bool = False
    inputs: Tuple[TensorInfo, ...] = ()
    outputs: Tuple[TensorInfo, ...] = ()
    macs: Optional[int] = 0
    weight_reads: Optional[int] = 0

    @property
    def short_name(self) -> str:
        """The name without its namespace: "convolution"."""
        return self.name.split("::", 1)[-1]


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` at its logical size, a stride-0 (expanded) dimension counted once (a
    weight in oneDNN's blocked layout, whose strides say nothing, at its size)."""
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _same_view(a, b) -> bool:
    """Whether ``a.copy_(b)`` is a no-op (the same elements: ``copy_`` then returns at once,
    as after ``out[:, c:] += y``, whose write-back copies a view onto itself)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


def _host_seed(name: str, out) -> bool:
    """Whether the op draws a random integer into a 0-dim int64 tensor: the attention's dropout
    seed (``ops.rpe_attention.draw_seed``), drawn from the CPU generator on every device."""
    return (name == "randint" and isinstance(out, torch.Tensor) and out.dim() == 0
            and out.dtype == torch.int64)


def _aliases_an_input(args, out) -> bool:
    """Whether every tensor ``out`` holds shares memory with a tensor argument. An op whose
    schema lets its result alias its input (``contiguous``, ``to``, ``reshape``, ``flatten``)
    copies where it cannot: seen undecomposed inside a fused op (below autograd, where such
    composite ops reach this mode before they decompose)."""
    inputs = {t.untyped_storage().data_ptr() for t in _tensors(args) if t.numel()}
    return all(not t.numel() or t.untyped_storage().data_ptr() in inputs for t in _tensors(out))


def aten_op(func, args, kwargs, out) -> Op:
    """The kernels and bytes of one aten op (rules in the module docstring)."""
    schema = func._schema
    name = func.overloadpacket.__name__
    returns_alias = bool(schema.returns) and all(r.alias_info is not None for r in schema.returns)
    view = returns_alias and not schema.is_mutable
    nothing = Op(f"aten::{name}", 0, 0, 0, view=view, mutates=schema.is_mutable)
    if view and not _aliases_an_input(args, out):  # (contiguous, to, reshape: a copy here)
        return nothing._replace(kernels=1, read=nbytes(args[0]),
                                written=sum(nbytes(t) for t in _tensors(out)))
    if view or name in NO_KERNEL or _host_seed(name, out):
        return nothing
    if name == "copy_" and _same_view(args[0], args[1]):  # copy_ returns at once: no kernel
        return nothing
    read = 0
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            continue
        info = arg.alias_info
        if info is not None and info.is_write:
            if arg.kwarg_only or name in WRITE_ONLY_SELF:  # out= / overwritten: not read
                continue
        read += sum(nbytes(t) for t in _tensors(value))
    written = sum(nbytes(t) for t in _tensors(out))
    kernels = 1
    if name in COPIES_INPUT and not args[0].is_contiguous():  # (its hidden contiguous copy)
        kernels, read, written = 2, read + nbytes(args[0]), written + nbytes(args[0])
    return nothing._replace(kernels=kernels, read=read, written=written,
                            macs=op_macs(func, args, out))


def fused_bytes(op: str, args, out, namespace: str = "patnet_triton",
                bound: Optional[dict] = None) -> Tuple[int, int]:
    """What a fused op's kernels must move: (read, written) (rules in the module docstring);
    ``bound``: the op's arguments by name (the MLP's rule reads them)."""
    inputs: List[torch.Tensor] = []
    for t in _tensors(args):  # (a tensor passed twice is read once: the block's x, its residual)
        if not any(_same_view(t, seen) for seen in inputs):
            inputs.append(t)
    read = sum(nbytes(t) for t in inputs)
    written = sum(nbytes(t) for t in _tensors(out))
    if op in ("channel_attention_stats", "channel_attention_chunk_stats"):  # reads X2 only
        x, c1 = args[0], int(args[1])
        read = nbytes(x[:, c1:])
    elif op == "partial_conv3x3_":  # the conv reads the saved X1 and writes Y1 into x
        x, weight = args[0], args[1]
        x1 = x[:, :weight.shape[0]]
        read, written = nbytes(x1) + nbytes(weight), nbytes(x1)
    elif op == "self_mixer_output" and namespace == "patnet_cuda":
        # the conv of X1 into Y1; tokens -> Y2 is the bmm beside it, the residual its add_
        x, weight = args[0], args[1]
        x1 = x[:, :weight.shape[0]]
        read, written = nbytes(x1) + nbytes(weight), nbytes(x1)
    elif op == "self_mixer_output":  # one kernel: X1 (all of X with the residual) and tokens
        x, weight, residual = args[0], args[1], args[6]
        if not residual:
            read -= nbytes(x) - nbytes(x[:, :weight.shape[0]])
    elif op == "rpe_attention_fwd":  # bucket ids read as int32
        bucket = args[4]
        read += bucket.numel() * 4 - nbytes(bucket)
    elif op.startswith("pointwise_mlp") and _mlp_config(bound, out).two_pass:
        y = _tensors(out)[0]  # the hidden activation written by the first pass, read by the
        hidden = y.shape[0] * bound["w1"].shape[0] * y.shape[2] * y.shape[3] * y.element_size()
        read, written = read + hidden, written + hidden  # second
    return read, written


@contextlib.contextmanager
def triton_launches(names: List[str], run_kernels: bool = True,
                    grids: Optional[List[tuple]] = None):
    """Append the name of every Triton kernel launched inside to ``names`` (the launch itself
    runs with no dispatch mode active, so the interpreter's own tensor work is not recorded),
    and its grid to ``grids`` if given. With ``run_kernels`` False the kernels are counted but
    not run (their outputs stay as allocated: for counting only; nothing in an eval forward
    branches on values)."""
    patched = []
    try:
        import triton.runtime.jit as jit
        patched.append(jit.JITFunction)
        try:
            import triton.runtime.interpreter as interpreter
            patched.append(interpreter.InterpretedFunction)
        except ImportError:  # pragma: no cover
            pass
    except ImportError:  # pragma: no cover
        pass
    originals = [cls.run for cls in patched]

    def wrap(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            names.append(getattr(self, "__name__", type(self).__name__))
            if grids is not None:
                grids.append(tuple(kwargs["grid"]))
            if not run_kernels:
                return None
            with _disable_current_modes():
                return original(self, *args, **kwargs)
        return run

    for cls, original in zip(patched, originals):
        cls.run = wrap(original)
    try:
        yield names
    finally:
        for cls, original in zip(patched, originals):
            cls.run = original


class TrafficRecorder(TorchDispatchMode):
    """Records every op dispatched while active as :class:`Op` rows in ``self.ops``; with
    ``describe``, each aten op's tensor inputs and outputs too (dtype, shape, layout: what
    tests/test_reference_traffic.py checks of the eager reference)."""

    def __init__(self, inside: str = "", run_kernels: bool = True, describe: bool = False):
        super().__init__()
        self.ops: List[Op] = []
        self.inside = inside
        self.run_kernels = run_kernels
        self.describe = describe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in FUSED_NAMESPACES:
            name = func.overloadpacket.__name__
            full = f"{func.namespace}::{name}"
            inner, launched = TrafficRecorder(full, self.run_kernels, self.describe), []
            # Run the op's kernel for its device (skipping the Python key, so that this mode
            # does not see the op again), with a nested mode that records the aten ops it runs.
            device = next(t.device for t in _tensors((args, kwargs)))
            keys = torch._C.DispatchKeySet(
                torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)
            with triton_launches(launched, self.run_kernels), inner:
                out = func.redispatch(keys, *args, **kwargs)
            if func.namespace == "patnet_cuda":
                if name not in CUDA_LAUNCHES:
                    raise NotImplementedError(f"traffic: no launch count for {full}")
                kernels = CUDA_LAUNCHES[name]
            else:
                kernels = len(launched)
            bound = {**{a.name: v for a, v in zip(func._schema.arguments, args)}, **kwargs}
            read, written = fused_bytes(name, args, out, func.namespace, bound)
            macs = (CUDA_MACS if func.namespace == "patnet_cuda" else FUSED_MACS).get(name)
            if macs is not None:
                macs = macs(bound, out)
            reads = (FUSED_WEIGHT_READS.get(name) if func.namespace == "patnet_triton"
                     else None)
            self.ops.append(Op(full, kernels, read, written, self.inside, macs=macs,
                               weight_reads=None if reads is None else reads(bound, out)))
            self.ops.extend(inner.ops)
            return out
        out = func(*args, **kwargs)
        op = aten_op(func, args, kwargs, out)._replace(inside=self.inside)
        if self.describe:
            op = op._replace(inputs=tuple(map(TensorInfo.of, _tensors((args, kwargs)))),
                             outputs=tuple(map(TensorInfo.of, _tensors(out))))
        self.ops.append(op)
        return out


class Count(NamedTuple):
    kernels: int
    fused: int      # of which fused-backend kernels
    read: int
    written: int


def summarize(ops: Iterable[Op]) -> Count:
    ops = list(ops)
    return Count(sum(o.kernels for o in ops),
                 sum(o.kernels for o in ops if o.name.split("::")[0] in FUSED_NAMESPACES),
                 sum(o.read for o in ops), sum(o.written for o in ops))


def precision(autocast: bool):
    """The context a forward is counted in: bfloat16 autocast (the CPU's autocast dtype; on a
    GPU, fp16 autocast casts the same tensors) or none (float32)."""
    return (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
            else contextlib.nullcontext())


def record_forward(model: torch.nn.Module, x: torch.Tensor, warmup: bool = True,
                   run_kernels: bool = True, autocast: bool = False) -> List[Op]:
    """The ops of one eval forward of ``model`` on ``x`` (after an untraced warm-up forward on
    a copy of ``x``, unless ``warmup`` is False: what is made once per input shape, such as the
    CPU path's oneDNN weight layouts, is made there); ``run_kernels``: see
    :func:`triton_launches`; ``autocast``: see :func:`precision`."""
    skip = contextlib.nullcontext() if run_kernels else triton_launches([], run_kernels=False)
    with torch.no_grad(), skip:
        if warmup:
            with precision(autocast):  # (each forward in its own autocast region, as a caller
                model(x.clone())       # would run it: autocast's cache lasts one region)
        x = x.clone()  # (the model may overwrite its input)
        recorder = TrafficRecorder(run_kernels=run_kernels)
        with recorder, precision(autocast):
            model(x)
    return recorder.ops


def record_step(model: torch.nn.Module, x: torch.Tensor, warmup: bool = True,
                run_kernels: bool = True, autocast: bool = False) -> List[Op]:
    """The ops of one training step's forward and backward of ``model`` (in train mode) on
    ``x``, the output's gradient all ones (made outside the count), after an untraced warm-up
    step at batch 2 unless ``warmup`` is False; no optimizer step."""
    skip = contextlib.nullcontext() if run_kernels else triton_launches([], run_kernels=False)
    with skip:
        if warmup:
            with precision(autocast):
                out = model(x[:2].clone())
            out.float().sum().backward()
        model.zero_grad(set_to_none=True)  # (the step's gradients written, not accumulated)
        x = x.clone()
        recorder = TrafficRecorder(run_kernels=run_kernels)
        with recorder:
            with precision(autocast):
                out = model(x)
            with _disable_current_modes():  # (not counted)
                grad = torch.ones_like(out)
            out.backward(grad)
    return recorder.ops


def build(name: str, provider: str, seed: int = 0, train: bool = False,
          device: str = "cpu", **overrides) -> torch.nn.Module:
    """The model a provider runs on ``device``: eager reference, or our inference path on a
    backend (made from the model on that device); with ``train`` the training model (in train
    mode) on that backend (eager: the reference)."""
    torch.manual_seed(seed)
    backend = "torch" if provider == "eager" or not train else provider
    model = patnet.create_model(name, backend=backend, **overrides).to(device)
    patnet.testing.randomize_norms(model, seed)
    if train:
        return model.train()
    if provider == "eager":
        return model.eval()
    return patnet.optimize_for_inference(model, backend=provider)


class _LayerMacs(TorchDispatchMode):
    """Multiply-adds (patnet.flops.op_macs) of the ops run while ``layer`` is set, per layer."""

    def __init__(self, layers: int):
        super().__init__()
        self.layer: Optional[int] = None
        self.macs = [0] * layers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.layer is not None:
            self.macs[self.layer] += op_macs(func, args, out)
        return out


def floor(name: str, size: int, autocast: bool = False, **overrides) -> Dict[str, object]:
    """Per-image activation bytes of each layer's input read once and output written once,
    the layer count (one kernel per layer) and the folded model's parameter bytes (2 per
    parameter under autocast, as the fused path casts them once); ``layers``:
    per layer (its name, input + output bytes per image, multiply-adds per image, parameter
    bytes) for the roofline. All of the folded model (``patnet.fuse_for_inference``): a
    layer's arithmetic is what it needs with its BatchNorms folded, which no inference path
    has to do (eager's counts them: fvcore's 2 per element)."""
    torch.manual_seed(0)
    model = patnet.fuse_for_inference(
        patnet.create_model(name, backend="torch", **overrides).eval())
    names = {m: n for n, m in model.named_modules()}

    def weight_bytes(p: torch.Tensor) -> int:  # (under autocast the weights run in bfloat16)
        return p.numel() * (2 if autocast else p.element_size())

    layers = [m for m in model.modules()
              if isinstance(m, (PatchEmbed, PatchMerging, PATNetBlock, FasterNetBlock))]
    layers += [model.avgpool_pre_head, model.head]
    rows = [{"name": names[m], "bytes": 0, "macs": 0,
             "weights": sum(weight_bytes(p) for p in m.parameters())} for m in layers]
    totals = {"read": 0, "written": 0}
    batch = 1
    counter = _LayerMacs(len(layers))

    def enter(index):
        def hook(module, inputs):
            counter.layer = index
        return hook

    def leave(index):
        def hook(module, inputs, output):
            counter.layer = None
            read, written = nbytes(inputs[0]) // batch, nbytes(output) // batch
            totals["read"] += read
            totals["written"] += written
            rows[index]["bytes"] = read + written
        return hook

    handles = [h for i, m in enumerate(layers)
               for h in (m.register_forward_pre_hook(enter(i)),
                         m.register_forward_hook(leave(i)))]
    try:
        with torch.no_grad(), precision(autocast), counter:
            model(torch.randn(batch, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    for row, macs in zip(rows, counter.macs):
        row["macs"] = macs // batch
    weights = sum(weight_bytes(p) for p in model.parameters())
    return {"kernels": len(layers), "read": totals["read"], "written": totals["written"],
            "bytes": totals["read"] + totals["written"], "weights": weights, "layers": rows}


class Rates(NamedTuple):
    """What the roofline assumes of the GPU: copy bandwidth (read + write, GB/s), matmul rate
    (TFLOP/s; 2 FLOPs per multiply-add), the batch it times, and the rate at which programs
    read from L2 (GB/s; None: weight reads not timed, as no rate was measured)."""
    copy_gbps: float = COPY_GBPS
    matmul_tflops: float = MATMUL_TFLOPS
    batch: int = ROOFLINE_BATCH
    l2_gbps: Optional[float] = None

    def seconds(self, nbytes_: float, macs: float, weight_reads: float = 0.0
                ) -> Tuple[float, str]:
        """The lower bound of one kernel: the longest of its bytes at the copy bandwidth, its
        multiply-adds at the matmul rate and (with ``l2_gbps``) the weights its programs read
        at the L2 rate; and which binds ("copy", "matmul" or "l2")."""
        times = {"copy": nbytes_ / (self.copy_gbps * 1e9),
                 "matmul": 2 * macs / (self.matmul_tflops * 1e12),
                 "l2": weight_reads / (self.l2_gbps * 1e9) if self.l2_gbps else 0.0}
        bound = max(times, key=lambda k: (times[k], k == "copy"))
        return times[bound], bound


def _roofline_row(kernels: Sequence[Tuple[float, str]], rates: Rates) -> dict:
    """The sum of kernels' (seconds, what binds) as ms per batch, the parts bound by the
    matmul rate and by L2, and images/s."""
    seconds = sum(t for t, _ in kernels)
    return {"ms": 1e3 * seconds,
            "compute_bound_ms": 1e3 * sum(t for t, bound in kernels if bound == "matmul"),
            "l2_bound_ms": 1e3 * sum(t for t, bound in kernels if bound == "l2"),
            "images_per_s": rates.batch / seconds if seconds else None}


def _per_batch(a: int, b: int, batch: int) -> int:
    """A count at ``batch`` from its values a and b at the two BATCHES (per image the
    difference, the rest per batch)."""
    return (a - BATCHES[0] * (b - a)) + batch * (b - a)


def _roofline_calls(runs: Dict[int, Sequence[Op]], rates: Rates
                    ) -> Optional[List[Tuple[str, float, str]]]:
    """Per op call that launches kernels: (its op_breakdown key, its roofline seconds at
    ``rates.batch``, what binds: :meth:`Rates.seconds`); its bytes, multiply-adds and weight
    reads (where ``rates.l2_gbps`` times them; an op without a count reads none) scaled from
    the two batches counted (per image the difference, per batch the rest). None if an op's
    multiply-adds are unknown or the two batches' ops do not pair up."""
    small, large = runs[BATCHES[0]], runs[BATCHES[1]]
    if len(small) != len(large):
        return None
    calls = []
    for a, b in zip(small, large):
        if not b.kernels:
            continue
        if a.macs is None or b.macs is None or a.name != b.name:
            return None
        calls.append((_key(b),) + rates.seconds(
            _per_batch(a.read + a.written, b.read + b.written, rates.batch),
            rates.batch * (b.macs - a.macs),
            _per_batch(a.weight_reads or 0, b.weight_reads or 0, rates.batch)))
    return calls


def provider_roofline(runs: Dict[int, Sequence[Op]], rates: Rates) -> Optional[dict]:
    """The provider's time per batch of ``rates.batch`` if every op it launches ran at the
    roofline (:meth:`Rates.seconds`), one after the other: ``ms``, ``compute_bound_ms`` and
    ``l2_bound_ms`` (the parts in ops bound by the matmul rate, by L2), ``images_per_s``; None
    where :func:`_roofline_calls` is."""
    calls = _roofline_calls(runs, rates)
    if calls is None:
        return None
    return _roofline_row([(t, bound) for _, t, bound in calls], rates)


def floor_roofline(fl: dict, rates: Rates) -> dict:
    """The floor's time per batch: each layer as one kernel at the roofline (its input and
    output per image, its parameters once per batch; its multiply-adds)."""
    return _roofline_row([rates.seconds(rates.batch * layer["bytes"] + layer["weights"],
                                        rates.batch * layer["macs"])
                          for layer in fl["layers"]], rates)


def _key(op: Op) -> str:
    return f"{op.name} (in {op.inside})" if op.inside else op.name


def _breakdown(ops: Sequence[Op]) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = {}
    for op in ops:
        if not op.kernels:
            continue
        key = _key(op)
        row = out.setdefault(key, {"calls": 0, "kernels": 0, "read": 0, "written": 0,
                                   "weight_reads": 0})
        row["calls"] += 1
        row["kernels"] += op.kernels
        row["read"] += op.read
        row["written"] += op.written
        if row["weight_reads"] is not None:
            row["weight_reads"] = (None if op.weight_reads is None
                                   else row["weight_reads"] + op.weight_reads)
    return out


def op_breakdown(runs: Dict[int, Sequence[Op]], rates: Optional[Rates] = None
                 ) -> Dict[str, Dict[str, int]]:
    """Per op (``aten::name``, ``patnet_triton::name``, or ``name (in fused op)`` for an aten op
    that a fused op runs): ``calls`` and ``kernels`` per forward, activation bytes per image
    (``act_read``, ``act_written``, ``act_bytes``: the difference of the two batches, as for the
    totals) and per-batch bytes (``batch_bytes``: weights, ...), weight bytes its programs read
    per image (``weight_reads``, see Op; None where unknown), with ``rates`` its calls'
    roofline time (``roofline_ms``, see :func:`provider_roofline`; None where unknown), the
    most activation bytes first. ``runs``: the ops recorded at each of BATCHES."""
    small, large = (_breakdown(runs[b]) for b in BATCHES)
    calls = None if rates is None else _roofline_calls(runs, rates)
    rows = {}
    for key, row in large.items():
        base = small.get(key, {"read": 0, "written": 0, "weight_reads": 0})
        read, written = row["read"] - base["read"], row["written"] - base["written"]
        reads = (None if row["weight_reads"] is None or base["weight_reads"] is None
                 else row["weight_reads"] - base["weight_reads"])
        rows[key] = {"calls": row["calls"], "kernels": row["kernels"], "act_read": read,
                     "act_written": written, "act_bytes": read + written,
                     "batch_bytes": base["read"] + base["written"] - BATCHES[0] * (read + written),
                     "weight_reads": reads}
        if rates is not None:
            rows[key]["roofline_ms"] = (None if calls is None else
                                        1e3 * sum(t for k, t, _ in calls if k == key))
    return dict(sorted(rows.items(), key=lambda kv: (-kv[1]["act_bytes"], -kv[1]["kernels"],
                                                     kv[0])))


def _per_image(runs: Dict[int, Sequence[Op]], field: str) -> Optional[int]:
    """An Op count (``macs``, ``weight_reads``) per image (the difference of the two batches),
    None where an op's is unknown."""
    totals = []
    for batch in BATCHES:
        counts = [getattr(op, field) for op in runs[batch] if op.kernels]
        if any(c is None for c in counts):
            return None
        totals.append(sum(counts))
    return totals[1] - totals[0]


def measure_provider(name: str, provider: str, size: int, seed: int = 0,
                     run_kernels: bool = True, autocast: bool = False, train: bool = False,
                     rates: Optional[Rates] = None, channels_last: bool = False,
                     **overrides) -> dict:
    """Kernels and bytes of one provider on one model: a dict (see :func:`measure`)."""
    from patnet_kernels import cpu_choice

    start = time.perf_counter()
    record = record_step if train else record_forward
    layout = torch.channels_last if channels_last else torch.contiguous_format
    try:  # (the model and its input in the layout, as benchmarks/bench_models.py runs them)
        model = build(name, provider, seed, train, **overrides).to(memory_format=layout)
        runs = {}
        for batch in BATCHES:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)
                            ).contiguous(memory_format=layout)
            # in eval a warm-up per batch (what the path makes once per input shape, such as
            # the CPU path's oneDNN weight layouts, depends on the batch too); in training one;
            # the CPU path's ops all in their eval forms (no measured choice: fixed)
            with cpu_choice.measuring_as(False):
                runs[batch] = record(model, x, not train or batch == BATCHES[0], run_kernels,
                                     autocast)
    except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
        from patnet_kernels import BackendUnavailableError
        status = "unavailable" if isinstance(exc, BackendUnavailableError) else "error"
        return {"status": status, "reason": f"{type(exc).__name__}: {exc}"}
    one, two = (summarize(runs[b]) for b in BATCHES)
    if one.kernels != two.kernels:
        return {"status": "error", "reason": f"{one.kernels} kernels at batch {BATCHES[0]} but "
                f"{two.kernels} at batch {BATCHES[1]}: the per-image difference would be wrong"}
    read, written = two.read - one.read, two.written - one.written
    return {
        "status": "ok",
        "kernels": two.kernels,
        "fused_kernels": two.fused,
        "act_read": read,
        "act_written": written,
        "act_bytes": read + written,
        "batch_bytes": (one.read + one.written) - BATCHES[0] * (read + written),
        "macs": _per_image(runs, "macs"),
        "weight_reads": _per_image(runs, "weight_reads"),
        "ops": op_breakdown(runs, rates),
        "roofline": None if rates is None else provider_roofline(runs, rates),
        "seconds": round(time.perf_counter() - start, 2),
    }


def measure(name: str, size: int = DEFAULT_SIZE, providers: Sequence[str] = PROVIDERS,
            seed: int = 0, run_kernels: bool = True, autocast: bool = False,
            train: bool = False, rates: Optional[Rates] = None, channels_last: bool = False,
            **overrides) -> dict:
    """The traffic report of one model: floor and, per provider, kernels per forward
    (``kernels``, of which ``fused_kernels``), activation bytes per image (``act_read``,
    ``act_written``, ``act_bytes``), per-batch bytes (``batch_bytes``: weights and other
    batch-independent tensors), the same per op (``ops``: :func:`op_breakdown`), or ``status`` /
    ``reason`` where the provider cannot run; ``autocast``: counted under bfloat16 autocast
    (:func:`precision`); ``train``: one training step's forward and backward (train mode, no
    optimizer step) of the training model, eager against ours on each fused backend (no floor:
    ``floor`` is None). ``roofline`` (under autocast only, where activations have the 2 bytes
    and matmuls the rate that ``rates`` assume; else None): the rates, and the floor's time per
    batch at them (None in training); each provider's in its row (:func:`provider_roofline`).
    ``channels_last``: the models and their input in channels_last (NCHW otherwise)."""
    rates = rates or Rates()
    timed = autocast
    report = {"model": name, "size": size, "channels_last": channels_last,
              "dtype": "bfloat16 autocast" if autocast else "float32", "batches": list(BATCHES),
              "run_kernels": run_kernels, "train": train,
              "floor": None if train else floor(name, size, autocast, **overrides),
              "providers": {}}
    report["roofline"] = ({"rates": rates._asdict(),
                           "floor": report["floor"] and floor_roofline(report["floor"], rates)}
                          if timed else None)
    for provider in providers:
        report["providers"][provider] = measure_provider(name, provider, size, seed,
                                                         run_kernels, autocast, train,
                                                         rates if timed else None,
                                                         channels_last, **overrides)
    return report


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def format_table(report: dict, top_ops: int = 0) -> str:
    """A readable table of one model's report; with ``top_ops`` also each provider's ops that
    move the most activation bytes per image (that many, with their kernels and share)."""
    fl = report["floor"]
    size = report["size"]
    what = ("training step (forward and backward)" if report.get("train")
            else "eval forward (no_grad)")
    layout = ", channels_last" if report.get("channels_last") else ""
    title = (f"{pretty(report['model'])} at {size} x {size}{layout}, {report['dtype']}, {what}; "
             f"bytes per image (batch {BATCHES[1]} - batch {BATCHES[0]}), MB = 1e6 bytes")
    header = (f"{'provider':<22}{'kernels':>8}{'fused':>7}{'read MB':>10}{'write MB':>10}"
              f"{'act MB':>10}{'x eager':>9}{'x floor':>9}{'batch MB':>10}")
    lines = [title, header, "-" * len(header)]
    eager = report["providers"].get("eager", {})
    for provider, row in report["providers"].items():
        label = PROVIDER_LABELS.get(provider, provider)
        if row.get("status") != "ok":
            lines.append(f"{label:<22}{row.get('status')}: {row.get('reason', '')[:90]}")
            continue
        vs_eager = (f"{row['act_bytes'] / eager['act_bytes']:.2f}"
                    if eager.get("status") == "ok" else "-")
        lines.append(
            f"{label:<22}{row['kernels']:>8}{row['fused_kernels']:>7}{_mb(row['act_read']):>10}"
            f"{_mb(row['act_written']):>10}{_mb(row['act_bytes']):>10}{vs_eager:>9}"
            + (f"{row['act_bytes'] / fl['bytes']:>9.2f}" if fl else f"{'-':>9}")
            + f"{_mb(row['batch_bytes']):>10}")
    if fl:
        lines.append(
            f"{'floor (per layer)':<22}{fl['kernels']:>8}{'-':>7}{_mb(fl['read']):>10}"
            f"{_mb(fl['written']):>10}{_mb(fl['bytes']):>10}"
            + (f"{fl['bytes'] / eager['act_bytes']:>9.2f}" if eager.get("status") == "ok"
               else f"{'-':>9}")
            + f"{1.0:>9.2f}{_mb(fl['weights']):>10}")
    if eager.get("status") == "ok":
        ratios = [f"{p}: {r['kernels'] / eager['kernels']:.2f}"
                  for p, r in report["providers"].items()
                  if p != "eager" and r.get("status") == "ok"]
        if ratios:
            lines.append("kernels x eager: " + ", ".join(ratios))
    if report.get("roofline"):
        lines.extend(_roofline_lines(report))
    for provider, row in report["providers"].items():
        if top_ops <= 0 or row.get("status") != "ok":
            continue
        lines.append(f"the {top_ops} ops of {PROVIDER_LABELS.get(provider, provider)} that "
                     f"move the most (act MB per image, share of its {_mb(row['act_bytes'])}):")
        for name, op in list(row["ops"].items())[:top_ops]:
            share = op["act_bytes"] / row["act_bytes"] if row["act_bytes"] else 0.0
            roofline = op.get("roofline_ms")
            rates = report.get("roofline") and Rates(**report["roofline"]["rates"])
            need = (l2_rate_needed(op, rates.batch)
                    if rates and not rates.l2_gbps else None)
            lines.append(f"  {name:<58}{op['kernels']:>5} kernels{_mb(op['act_bytes']):>9}"
                         f"{100 * share:>6.1f}%"
                         + (f"{roofline:>9.3f} ms roofline" if roofline is not None else "")
                         + (f"  weights {_mb(op['weight_reads'])} MB" if op.get("weight_reads")
                            else "")
                         + (f" (L2 {need / 1e3:,.1f} TB/s)" if need else ""))
    return "\n".join(lines)


def l2_rate_needed(op: dict, batch: int) -> Optional[float]:
    """The L2 read rate (GB/s) at which one op's weight reads, ``batch`` images' worth, take
    as long as its roofline time (an op row of :func:`op_breakdown` with ``roofline_ms``);
    None where either is unknown or zero. Below it, L2 binds the op before copy and matmul."""
    reads, ms = op.get("weight_reads"), op.get("roofline_ms")
    if not reads or not ms:
        return None
    return batch * reads / (ms * 1e-3) / 1e9


def _roofline_lines(report: dict) -> List[str]:
    rates = Rates(**report["roofline"]["rates"])
    l2 = (f" or weights read per program at {rates.l2_gbps:,.0f} GB/s from L2" if rates.l2_gbps
          else "")
    lines = [f"roofline (a lower bound, not a measurement): each kernel at {rates.copy_gbps:,.0f}"
             f" GB/s copy or {rates.matmul_tflops:,.0f} TFLOP/s matmul{l2}, one after the "
             f"other, no launch gaps; batch {rates.batch}, {report['size']} x {report['size']}:"]
    rows = [(PROVIDER_LABELS.get(p, p), r.get("roofline")) for p, r in
            report["providers"].items() if r.get("status") == "ok"]
    if report["roofline"]["floor"]:
        rows.append(("floor (per layer)", report["roofline"]["floor"]))
    eager = report["providers"].get("eager", {}).get("roofline")
    for label, row in rows:
        if row is None:
            lines.append(f"  {label:<22}-  (an op without a multiply-add count)")
            continue
        speedup = f"{eager['ms'] / row['ms']:>7.2f}x eager" if eager else ""
        lines.append(f"  {label:<22}{row['ms']:>8.3f} ms{row['images_per_s']:>12,.0f} img/s"
                     f"{speedup}"
                     f"{100 * row['compute_bound_ms'] / row['ms']:>6.0f}% of it compute-bound"
                     + (f", {100 * row.get('l2_bound_ms', 0.0) / row['ms']:.0f}% L2-bound"
                        if rates.l2_gbps else ""))
    for provider, row in report["providers"].items():
        if row.get("status") != "ok" or not row.get("weight_reads"):
            continue
        reading = {key: op for key, op in row["ops"].items() if l2_rate_needed(op, 1)}
        line = (f"  {PROVIDER_LABELS.get(provider, provider)}: its programs read "
                f"{_mb(row['weight_reads'])} MB of weights per image"
                + ("" if rates.l2_gbps else " (from L2; not timed: no L2 rate given)"))
        if reading and not rates.l2_gbps:
            overall = l2_rate_needed(
                {"weight_reads": sum(op["weight_reads"] for op in reading.values()),
                 "roofline_ms": sum(op["roofline_ms"] for op in reading.values())}, rates.batch)
            key = max(reading, key=lambda k: l2_rate_needed(reading[k], rates.batch))
            line += (f"; to keep their roofline time the ops that read them need "
                     f"{overall / 1e3:,.1f} TB/s from L2 (the most, "
                     f"{l2_rate_needed(reading[key], rates.batch) / 1e3:,.1f} TB/s: {key})")
        lines.append(line)
    return lines


def write_json(reports: Sequence[dict], path: Path, settings: Optional[dict] = None) -> None:
    write_json_file(path, {"what": "kernels per eval forward and activation bytes per image "
                                   "(benchmarks/traffic.py)",
                           "torch": torch.__version__, "settings": settings or {},
                           "models": {r["model"]: r for r in reports}})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.traffic",
        description="Kernels launched and activation bytes per image of one eval forward, "
                    "per model and provider, beside the floor (counts, not times).")
    parser.add_argument("--models", type=split_list, default=patnet.list_models(),
                        help="comma list (default: all 12)")
    parser.add_argument("--providers", type=split_list, default=None,
                        help=f"comma list of {','.join(PROVIDERS)} (default: all; with "
                             f"--train {','.join(TRAIN_PROVIDERS)})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"input height and width, >= 32 (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    parser.add_argument("--autocast", action="store_true",
                        help="count under bfloat16 autocast (the mixed-precision inference a "
                             "GPU benchmark runs in fp16 autocast): casts included")
    parser.add_argument("--channels-last", action="store_true",
                        help="the models and their input in channels_last, as the GPU "
                             "benchmarks run them under AMP (default NCHW)")
    parser.add_argument("--train", action="store_true",
                        help="count one training step (forward and backward, train mode) of "
                             "the training model: eager against ours on Triton (default "
                             "providers eager,triton)")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N",
                        help="also list each provider's N ops that move the most activation "
                             "bytes per image")
    parser.add_argument("--copy-gbps", type=float, default=COPY_GBPS,
                        help="the roofline's copy bandwidth, read + write (default: the H200's "
                             f"measured {COPY_GBPS:,.0f}); the roofline is printed with "
                             "--autocast, for an eval forward")
    parser.add_argument("--matmul-tflops", type=float, default=MATMUL_TFLOPS,
                        help=f"the roofline's fp16 matmul rate (default {MATMUL_TFLOPS:,.0f}, "
                             "measured on the H200)")
    parser.add_argument("--l2-gbps", type=float, default=None,
                        help="the rate at which programs read from L2 (GB/s): the roofline "
                             "then times the weights each op's programs re-read (default: "
                             "none, not timed; no rate has been measured)")
    parser.add_argument("--rates", metavar="PATH",
                        help="take the copy bandwidth, the fp16 matmul rate and the L2 read "
                             "rate from this report of python -m benchmarks.machine_rates, or "
                             "a GPU check's ops.json holding one (a GPU's measured rates), "
                             "instead of --copy-gbps / --matmul-tflops / --l2-gbps")
    parser.add_argument("--roofline-batch", type=int, default=ROOFLINE_BATCH,
                        help=f"the batch the roofline times (default {ROOFLINE_BATCH})")
    parser.add_argument("--count-only", action="store_true",
                        help="count the Triton launches without running them (much faster "
                             "under the interpreter; the counts are the same)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in patnet.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {patnet.list_models()}")
    choices = TRAIN_PROVIDERS if args.train else PROVIDERS
    args.providers = list(choices) if args.providers is None else args.providers
    bad = [p for p in args.providers if p not in choices]
    if bad:
        parser.error(f"unknown provider(s) {bad}{' with --train' if args.train else ''}; "
                     f"choose from {list(choices)}"
                     + (" (the reference is 'eager'; the CUDA backend's backward ops have no "
                        "launch counts)" if args.train else ""))
    if not args.providers:
        parser.error("no provider given")
    if args.top_ops < 0:
        parser.error(f"--top-ops must be 0 or more, got {args.top_ops}")
    if args.rates:
        try:
            measured = json.loads(Path(args.rates).read_text())
            measured = measured.get("machine_rates", measured)  # (a GPU check's ops.json)
            args.copy_gbps = float(measured["copy"]["gbps"])
            args.matmul_tflops = float(measured["matmul"]["float16"]["tflops"])
            if "l2_read" in measured:  # (absent: weight reads not timed)
                args.l2_gbps = float(measured["l2_read"]["gbps"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--rates {args.rates}: not a report of python -m "
                         f"benchmarks.machine_rates ({type(exc).__name__}: {exc})")
    if (args.copy_gbps <= 0 or args.matmul_tflops <= 0 or args.roofline_batch < 1
            or (args.l2_gbps is not None and args.l2_gbps <= 0)):
        parser.error("--copy-gbps, --matmul-tflops and --l2-gbps must be positive, "
                     "--roofline-batch >= 1")
    if args.size < 32:
        parser.error(f"--size must be at least 32 (the models' smallest input), got {args.size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {"size": args.size, "providers": args.providers, "seed": args.seed,
                "models": args.models, "count_only": args.count_only,
                "autocast": args.autocast, "train": args.train,
                "channels_last": args.channels_last}
    rates = Rates(args.copy_gbps, args.matmul_tflops, args.roofline_batch, args.l2_gbps)
    return run_models(
        args.models,
        lambda name: measure(name, args.size, args.providers, args.seed,
                             run_kernels=not args.count_only, autocast=args.autocast,
                             train=args.train, rates=rates, channels_last=args.channels_last),
        lambda report: format_table(report, args.top_ops),
        None if args.json is None else lambda reports: write_json(reports, args.json, settings))


if __name__ == "__main__":
    sys.exit(main())
