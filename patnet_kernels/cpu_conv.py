"""The convolutions of the CPU eval forms: oneDNN with the weights laid out once, or F.conv2d
where that is faster.

On one CPU thread at batch 1, PyTorch runs a 1 x 1 convolution, and a 3 x 3 one on a small
map, through its own im2col + GEMM path (``aten::_slow_conv2d_forward``; its heuristic keeps
oneDNN for several threads or larger inputs), and ``F.linear`` through MKL. oneDNN's
convolution, given its weight already reordered into the blocked layout it computes in, runs
the same arithmetic faster on the development machine's AVX-512 cores: the 1 x 1 convs of
PATNet-T2 and FasterNet-T2 at batch 1 on one thread 2.0-2.3x, the 3 x 3 ones on 14 x 14 and
7 x 7 maps 2.1-3.3x, each model's convolutions per forward 1.97x and 2.07x
(``python -m benchmarks.cpu_conv_speed``; ``benchmarks/results/cpu_conv_speed.cpu.batch1.json``);
on an AVX2 EPYC, where PyTorch's GEMM path runs near the core's peak, only 1.11x per forward
for both (``cpu_conv_speed.cpu.avx2.batch1.json``).
:func:`conv2d` is the one place the eval forms
(:mod:`patnet_kernels.eval_cpu`) choose how a convolution runs:

- ``torch.ops.mkldnn._convolution_pointwise`` (what Inductor's CPU backend calls) with the
  activation, or the block's residual sum, as its post-op (in the same pass over the output),
  or ``F.conv2d`` and the activation or sum, whichever is faster for the call's shapes on this
  machine, timed on the first call of each kind
  (:data:`patnet_kernels.cpu_choice.CONVOLUTIONS`; ``PATNET_CPU_MEASURE=0``: oneDNN), for
  float32, where oneDNN is built in and enabled (``torch.backends.mkldnn``), outside a
  torch.compile trace (Inductor lays out its own), but for a single output channel (PAT_sp's
  per-pixel gate: a dot product per pixel, 4-6x slower on oneDNN's blocked kernels than on
  F.conv2d). oneDNN's op has a fixed cost of about 50 us a call in PyTorch's glue (oneDNN's
  own execution of a tiny conv, by ONEDNN_VERBOSE=1, 3-4 us; F.conv2d's about 10), which
  small convolutions do not win back, and on the AVX2 EPYC its arithmetic was only as fast
  as F.conv2d's for most shapes: there the convs of PATNet-T0 at 32 x 32 took 10-43 us a call
  on F.conv2d and 70-147 on oneDNN (``python -m benchmarks.cpu_conv_speed --models patnet_t0
  --size 32``), and oneDNN (the weights reordered once) ran PATNet-T0's at 224 x 224 at
  0.70-1.73x F.conv2d's speed per shape (``cpu_conv_speed --models patnet_t0`` with
  ``PATNET_CPU_MEASURE=0``: ``cpu_conv_speed.cpu.avx2.batch1.patnet_t0.measure0.json``);
- the weight reordered once per frozen parameter and input shape, into the blocked layout
  oneDNN picks for that shape, and kept while the parameter is unchanged
  (:class:`patnet_kernels._types.FrozenDerived`, which keeps autocast's casts of frozen
  weights too), for the last :data:`SHAPES_KEPT` shapes (a third drops the first: each kept
  shape holds a copy of the weights); any other weight is reordered by oneDNN per call.
  The layout oneDNN picks depends on the whole input shape, and a weight laid out for one
  shape can run 2-50x slower at another (timed by hand on the development machine, now an
  AVX2 EPYC, one thread: a 3 x 3 conv of 128 channels laid out for a 14 x 14 map took 13 ms
  on a 7 x 7 one, 0.3 ms with its own layout; a 1 x 1 conv of 512 -> 1024 channels laid out
  for a 1 x 1 map 33 ms on a 7 x 7 one instead of 0.6), so that the inference copy of
  PATNet-T2, called once at 32 x 32 and then at 224 x 224, took 530 ms a forward where its
  own layouts take 42;
- else ``F.conv2d`` and the activation (float64, a torch without oneDNN, a trace).

Its output is in oneDNN's layout where oneDNN runs it: channels_last (the layout its blocked
kernels read and write fastest); else the input's (channels_last in the inference copy).
:func:`library` says which runs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._types import FrozenDerived
from . import cpu_choice

# How many input shapes a frozen weight keeps a reordered form for (see _reordered).
SHAPES_KEPT = 2
# The frozen weights' reordered forms, one per (weight, padding, stride, input shape).
_REORDERED = FrozenDerived(tags_per_parameter=SHAPES_KEPT)
# oneDNN's names of the activations (the exact, erf GELU is "gelu" with algorithm "none").
_POST_OPS = {None: ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none")}
# Why oneDNN's convolution cannot run in this process (None: it can), found on first use.
_REFUSAL: list = []


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def onednn_refusal() -> Optional[str]:
    """Why :func:`conv2d` cannot run oneDNN here (None if it can): this torch has no oneDNN,
    or its convolution, with one of the post-ops used here, fails or is wrong on a small probe
    against F.conv2d (found once per process)."""
    if not _REFUSAL:
        _REFUSAL.append(_probe() if torch.backends.mkldnn.is_available() else
                        "this torch is built without oneDNN (torch.backends.mkldnn)")
    return _REFUSAL[0]


def _probe() -> Optional[str]:
    """A 3 x 3 conv of a small channels_last map with a reordered weight and each post-op (the
    activations, the sum with a tensor), against F.conv2d and the activation or the sum: None,
    or what went wrong."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 6, generator=generator).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(16, 8, 3, 3, generator=generator)
    bias = torch.randn(16, generator=generator)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    try:
        reordered = torch.ops.mkldnn._reorder_convolution_weight(
            weight, (1, 1), (1, 1), (1, 1), 1, list(x.shape))
        for activation, act in ((None, lambda y: y), ("relu", F.relu), ("gelu", F.gelu)):
            attr, algorithm = _POST_OPS[activation]
            got = torch.ops.mkldnn._convolution_pointwise(
                x, reordered, bias, (1, 1), (1, 1), (1, 1), 1, attr, [], algorithm)
            if not torch.allclose(got.double(), act(want), rtol=1e-4, atol=1e-4):
                return f"oneDNN's convolution with post-op {attr!r} is wrong on a probe"
        added = torch.ops.mkldnn._convolution_pointwise.binary(
            x, got, reordered, bias, (1, 1), (1, 1), (1, 1), 1, "add", None, None, [], None)
        if not torch.allclose(added.double(), want + got.double(), rtol=1e-4, atol=1e-4):
            return "oneDNN's convolution with the post-op 'add' is wrong on a probe"
    except (RuntimeError, AttributeError) as error:
        return f"oneDNN's convolution failed on a probe: {error}"
    return None


def library() -> str:
    """Which convolution the CPU eval forms run for float32 in this process (for
    :func:`patnet_kernels.info`)."""
    refusal = onednn_refusal()
    if refusal is not None:
        return f"torch.nn.functional.conv2d ({refusal})"
    if not torch.backends.mkldnn.enabled:
        return "torch.nn.functional.conv2d (oneDNN disabled: torch.backends.mkldnn.enabled)"
    if not cpu_choice.measuring():
        return ("oneDNN (torch.ops.mkldnn._convolution_pointwise), frozen weights reordered once "
                "per input shape (PATNET_CPU_MEASURE=0: not timed against F.conv2d)")
    return ("oneDNN (torch.ops.mkldnn._convolution_pointwise; frozen weights reordered once per "
            "input shape) or torch.nn.functional.conv2d, whichever was faster on each kind of "
            "call's first call")


def _onednn_can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.shape[0] > 1
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.enabled
            and onednn_refusal() is None)


def _reordered(weight: torch.Tensor, x: torch.Tensor, padding, stride) -> torch.Tensor:
    """``weight`` (C_OUT, C_IN, k, k) in oneDNN's blocked layout for x's shape. A frozen
    parameter (an ``nn.Parameter`` that requires no gradient, such as those of
    ``patnet.optimize_for_inference``'s copy) is reordered once per input shape, and the
    result kept while the parameter is unchanged, for the last SHAPES_KEPT shapes; any other
    weight is returned dense (oneDNN reorders it in the call)."""
    kept = _REORDERED.get(weight, (padding, stride, x.shape), lambda w: (
        torch.ops.mkldnn._reorder_convolution_weight(
            _as_4d(w).contiguous(), padding, stride, (1, 1), 1, list(x.shape))))
    return _as_4d(weight).contiguous() if kept is None else kept


def _as_4d(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's (C_OUT, C_IN) weight as a 1 x 1 convolution's."""
    return weight if weight.dim() == 4 else weight.view(*weight.shape, 1, 1)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
           activation: Optional[str] = None, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(conv2d(x, weight, bias, stride, padding)) [+ add], no dilation, one group.

    x: (B, C_IN, H, W), any layout (a channel slice is copied to a dense one for oneDNN);
    weight: (C_OUT, C_IN, k, k), or (C_OUT, C_IN) for a linear layer applied to each pixel (a
    1 x 1 convolution); bias: (C_OUT,) or None; activation: None, "relu" or "gelu" (exact,
    erf); add: None, or a (B, C_OUT, H_OUT, W_OUT) tensor added to the output (a block's
    residual; with no activation: oneDNN adds it as a post-op, in the same pass, where it is
    channels_last like the output). Returns a new (B, C_OUT, H_OUT, W_OUT) tensor (its layout:
    see the module doc); where oneDNN runs it, see the module doc."""
    if add is not None and activation is not None:
        raise ValueError("conv2d adds `add` to a convolution without an activation only")
    stride, padding = _pair(stride), _pair(padding)
    if not _onednn_can_run(x, weight):
        return _conv2d_torch(x, weight, bias, stride, padding, activation, add)
    frozen = isinstance(weight, torch.nn.Parameter) and not weight.requires_grad
    kind = (x.shape, x.stride(), weight.shape, bias is None, stride, padding, activation, frozen,
            None if add is None else add.stride())
    return cpu_choice.CONVOLUTIONS.choose(kind, (_conv2d_torch, _conv2d_onednn))(
        x, weight, bias, stride, padding, activation, add)


def _conv2d_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: Tuple[int, int], padding: Tuple[int, int], activation: Optional[str],
                  add: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`conv2d` by F.conv2d, the activation and the sum (in x's layout)."""
    y = F.conv2d(x, _as_4d(weight), bias, stride, padding)
    if add is not None:
        return y.add_(add)
    return y if activation is None else (F.relu_(y) if activation == "relu" else F.gelu(y))


def _conv2d_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   stride: Tuple[int, int], padding: Tuple[int, int], activation: Optional[str],
                   add: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`conv2d` by oneDNN, the activation or the sum its post-op (channels_last out)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous(memory_format=torch.channels_last)
    reordered = _reordered(weight, x, padding, stride)
    if add is not None:
        if add.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, add, reordered, bias, padding, stride, (1, 1), 1, "add", None, None, [],
                None)
        return torch.ops.mkldnn._convolution_pointwise(
            x, reordered, bias, padding, stride, (1, 1), 1, "none", [], "").add_(add)
    attr, algorithm = _POST_OPS[activation]
    return torch.ops.mkldnn._convolution_pointwise(
        x, reordered, bias, padding, stride, (1, 1), 1, attr, [], algorithm)
