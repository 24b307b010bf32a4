"""Small value types and helpers shared by the functional API, every backend and the models."""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

# The devices whose tensors the ops take and that have an autocast mode.
AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")

# The dropout seeds of the fused attention, [low, high): above 2^32, so that Triton types the
# kernel argument as int64 (the shipped signature) and the whole 64-bit Philox key is used.
DROPOUT_SEED_RANGE = (1 << 32, 1 << 62)


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Tensors made inside are ordinary tensors, also where the caller runs under
    ``torch.inference_mode``; grad mode stays as it was. For what is kept beyond the call
    (caches, the inference copies of a model): an inference tensor cannot be saved for backward
    nor updated in place outside inference mode, so one kept from an inference-mode call would
    break a later training step or conversion."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


class FrozenDerived:
    """Tensors derived from frozen parameters (an ``nn.Parameter`` that requires no gradient:
    those of ``patnet.optimize_for_inference``'s copy), each made once per (parameter, tag)
    and kept while the parameter is unchanged (same version counter and storage): autocast's
    casts of the weights (:mod:`patnet_kernels.functional`), oneDNN's reordered weights
    (:mod:`patnet_kernels.cpu_conv`). Weakly keyed: freed with their parameter. With
    ``tags_per_parameter``, at most that many tags are kept per parameter: a new one drops the
    one made first."""

    def __init__(self, tags_per_parameter: Optional[int] = None):
        # id(parameter) -> (a weak reference to it, {tag: (its version key, tensor)}); the
        # entry is dropped when the parameter is freed (a plain dictionary: a look-up per
        # weight per call, where torch's WeakIdKeyDictionary took several Python calls)
        self._kept: Dict[int, Tuple[weakref.ref, dict]] = {}
        self._tags_per_parameter = tags_per_parameter

    def _entries(self, parameter: torch.Tensor) -> Optional[dict]:
        held = self._kept.get(id(parameter))
        return held[1] if held is not None and held[0]() is parameter else None

    def get(self, parameter: torch.Tensor, tag: object, make) -> Optional[torch.Tensor]:
        """``make(parameter)``, made once and kept (outside inference mode, so that any later
        call can use it); None where nothing is kept: ``parameter`` is not a frozen parameter,
        is an inference tensor (it has no version counter), or torch.compile is tracing (it
        sees the plain computation and hoists or fuses it itself)."""
        if torch.compiler.is_compiling():
            return None
        kept = self._entries(parameter)
        entry = None if kept is None else kept.get(tag)
        if (entry is not None and not parameter.requires_grad
                and entry[0] == (parameter._version, parameter.data_ptr())):
            return entry[1]  # (kept: so a frozen parameter, not an inference tensor)
        if (not isinstance(parameter, nn.Parameter) or parameter.requires_grad
                or parameter.is_inference()):
            return None
        if kept is None:
            ident = id(parameter)
            kept = {}
            self._kept[ident] = (weakref.ref(parameter, lambda _, ident=ident:
                                             self._kept.pop(ident, None)), kept)
        if self._tags_per_parameter is not None and tag not in kept:
            # the oldest first (a dictionary keeps its insertion order); list() and pop with a
            # default, so that threads making entries at once cannot fail on each other's
            for oldest in list(kept)[:max(0, len(kept) - self._tags_per_parameter + 1)]:
                kept.pop(oldest, None)
        with outside_inference_mode():
            made = make(parameter)
        kept[tag] = ((parameter._version, parameter.data_ptr()), made)
        return made

    def kept(self, parameter: torch.Tensor, tag: object) -> Optional[torch.Tensor]:
        """What :meth:`get` keeps for (parameter, tag) now, current or not; None if nothing."""
        entry = (self._entries(parameter) or {}).get(tag)
        return None if entry is None else entry[1]


def chunk_pixels(pixels: int, chunks: int) -> int:
    """S, the pixels per chunk of PAT_ch statistics taken in ``chunks`` chunks of H * W =
    ``pixels`` (``partial_block``'s ``statistics``): chunk t holds pixels [t S, min((t + 1) S,
    H W)), S a power of two, so S is the one in [ceil(P / T), 2 ceil(P / T)) (unique for T > 1;
    for T = 1 any S >= P gives the same single chunk)."""
    need = -(-pixels // chunks)
    return 1 << max(0, need - 1).bit_length()


def chunk_layout(pixels: int, chunks: int) -> Optional[Tuple[int, int]]:
    """(S, shift) of PAT_ch statistics taken in ``chunks`` chunks a sample of H * W =
    ``pixels`` (``partial_block``'s ``statistics``, (B, T, C2)), or None where no layout has
    that many: chunk t of sample b holds its pixels [t S - o, (t + 1) S - o) within [0, P),
    o = b shift mod S (empty chunks hold nothing to read). Taken in tiles of one sample each,
    shift = 0 and T = ceil(P / S) (:func:`chunk_pixels`); in tiles of S pixels over the samples
    one after another (the MLP kernel's where its tiles span samples), shift = P mod S and
    T = ceil(P / S) + 1, taken only where P > 2 S and S does not divide P, so that the two
    never have the same count."""
    size = chunk_pixels(pixels, chunks)
    if -(-pixels // size) == chunks:
        return size, 0
    if chunks > 2:
        size = chunk_pixels(pixels, chunks - 1)
        if -(-pixels // size) == chunks - 1 and pixels > 2 * size and pixels % size:
            return size, pixels % size
    return None


def chunk_counts(pixels: int, chunks: int, sample: int) -> List[int]:
    """The pixels of each of sample ``sample``'s ``chunks`` chunks in :func:`chunk_layout`."""
    size, shift = chunk_layout(pixels, chunks)
    offset = sample * shift % size
    return [max(0, min((t + 1) * size - offset, pixels) - max(t * size - offset, 0))
            for t in range(chunks)]


def pixel_stride(t: torch.Tensor) -> Optional[int]:
    """The one stride of the flattened pixel index h * W + w of a (B, C, H, W) tensor (NCHW,
    channels_last, channel slices of either), or None when its (h, w) strides do not flatten
    (no layout PyTorch makes; a crop of H or W does)."""
    _, _, h, w = t.shape
    _, _, sh, sw = t.stride()
    if h == 1:
        return sw
    if w == 1:
        return sh
    return sw if sh == w * sw else None


class BatchNormParams(NamedTuple):
    """The tensors and settings of one ``BatchNorm2d`` over C channels, passed to a fused op.

    Every tensor is of shape (C,). ``weight``/``bias`` may be None (no affine);
    ``running_mean``/``running_var`` may be None only in training mode (no running statistics).
    In training mode the op normalises with batch statistics and updates the running
    statistics in place with ``momentum``, exactly as ``torch.nn.functional.batch_norm``.
    """

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    momentum: float = 0.1
    eps: float = 1e-5

    @classmethod
    def of(cls, bn: nn.BatchNorm2d, training: bool) -> "BatchNormParams":
        """The parameters of ``bn`` for one forward pass, without side effects.

        ``momentum=None`` (cumulative average) resolves to 1 / (batches so far + 1), as
        ``nn.BatchNorm2d`` does (the module counts its batches: ``patnet.layers.count_batches``).
        """
        momentum = bn.momentum
        if momentum is None:
            seen = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0
            momentum = 1.0 / (seen + 1) if training else 0.0
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)


class SpatialAttentionParams(NamedTuple):
    """PAT_sp's tensors (SPEC.md section 3) for a block op in inference that runs it after its
    MLP (``partial_block``'s ``spatial``): Q gated channels, P = C - Q conv channels.

    ``bn_c`` and ``bn_d`` take their running statistics (eval); ``bn_d`` is None once folded
    into the conv (its weight and ``conv_bias``), as in ``patnet.optimize_for_inference``.
    """

    gate_weight: torch.Tensor  # (1, Q, 1, 1): the per-pixel gate w
    conv_weight: torch.Tensor  # (P, P, 1, 1)
    conv_bias: Optional[torch.Tensor]  # (P,) or None
    bn_c: BatchNormParams  # over Q channels
    bn_d: Optional[BatchNormParams] = None  # over P channels, or None (folded)

    def with_weights(self, cast) -> "SpatialAttentionParams":
        """These parameters with ``cast`` applied to the gate and conv tensors (not the
        BatchNorms': they stay float32 under autocast, as ``nn.BatchNorm2d``'s do)."""
        return self._replace(gate_weight=cast(self.gate_weight),
                             conv_weight=cast(self.conv_weight), conv_bias=cast(self.conv_bias))


def update_running_statistics(*updates: Tuple[BatchNormParams, torch.Tensor, torch.Tensor]
                              ) -> None:
    """For each (BatchNorm, batch mean, unbiased batch variance), fp32 (C,), move its running
    statistics (where present) towards the batch's, as ``F.batch_norm`` does in training:
    ``running = (1 - momentum) running + momentum batch``, written ``running + momentum (batch -
    running)``, in float32 and stored in the buffers' dtype. The float32 buffers of one momentum
    take one ``torch._foreach_lerp_`` (one launch on a GPU), others one op each."""
    together: Dict[float, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
    with torch.no_grad():
        for bn, mean, unbiased_var in updates:
            for running, batch in ((bn.running_mean, mean), (bn.running_var, unbiased_var)):
                if running is None:
                    continue
                if running.dtype == batch.dtype:
                    lists = together.setdefault(bn.momentum, ([], []))
                    lists[0].append(running)
                    lists[1].append(batch)
                else:
                    running.copy_(torch.lerp(running.float(), batch, bn.momentum))
        for momentum, (running, batch) in together.items():
            torch._foreach_lerp_(running, batch, momentum)
