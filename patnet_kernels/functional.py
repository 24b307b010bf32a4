"""The functional API: validated entry points that dispatch to a backend.

Every function checks its inputs once (shapes, channel split, dtypes, devices) and raises a
clear error before anything is computed or written, then runs the backend picked by
``backend="auto" | "torch" | "triton" | "cuda"`` (see :mod:`patnet_kernels.backends`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference, registry
from ._checks import (check_activation, check_batch_norm, check_batch_values,
                      check_conv_weight, check_device, check_flag, check_number, check_same,
                      check_same_or_float32, check_shape, check_statistics_of,
                      check_tensor)
from ._types import (AUTOCAST_DEVICE_TYPES, BatchNormParams, FrozenDerived,
                     SpatialAttentionParams, chunk_layout, outside_inference_mode)
from .backends import choose_implementation
from .ops._layout import memory_format_of
from .reference.pointwise_mlp import ACTIVATIONS as MLP_ACTIVATIONS


# Casts of frozen parameters under autocast, one per (parameter, dtype): see
# :func:`_autocast_copy`.
_FROZEN_CASTS = FrozenDerived()


def _autocast_copy(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """value in ``dtype``. A frozen parameter (an ``nn.Parameter`` that requires no gradient:
    those of ``patnet.optimize_for_inference``'s copies) is cast once and the copy reused
    while the parameter is unchanged (:class:`patnet_kernels._types.FrozenDerived`), instead
    of once per call as autocast casts weights (its own cache keeps only casts of tensors
    requiring gradients, and only within one autocast region): under fp16 autocast that is a
    cast kernel per weight per forward saved. Not while torch.compile traces, nor for an
    inference tensor."""
    kept = _FROZEN_CASTS.get(value, dtype, lambda p: p.detach().to(dtype))
    return value.to(dtype) if kept is None else kept


def autocast_aware(op: Optional[Callable] = None, *, keep: Tuple[str, ...] = ()) -> Callable:
    """Run ``op`` under ``torch.autocast`` as PyTorch runs a convolution there.

    Where autocast is enabled for the device of the op's first tensor argument (positional or
    keyword), every float32, float16
    or bfloat16 tensor argument (activations and weights; not the BatchNorm parameters, which
    stay float32 as ``nn.BatchNorm2d``'s do under autocast, nor integer bucket ids; PAT_sp's
    gate and conv tensors in :class:`SpatialAttentionParams` too) is cast to
    the autocast dtype (a frozen parameter's cast kept for the next call, see
    :func:`_autocast_copy`), and the op runs with autocast off, so that its own float32
    arithmetic (statistics, gates) stays float32. Outside autocast the op runs unchanged.
    ``keep`` (``@autocast_aware(keep=("table",))``): the names of the op's parameters passed as
    they are: an input the op reads in any dtype (no cast pass), or a parameter it reads in
    float32 anyway (PAT_ch's W_ch, the iRPE table), which so keeps its float32 values and
    gets its gradient in float32, unrounded and without cast kernels, as the BatchNorms'.
    """
    if op is None:
        return functools.partial(autocast_aware, keep=keep)
    names = list(inspect.signature(op).parameters)
    unknown = set(keep) - set(names)
    if unknown:
        raise TypeError(f"autocast_aware: {op.__name__} has no parameter {sorted(unknown)}")
    kept_positions = {names.index(name) for name in keep}

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                     None)
        device_type = None if first is None else first.device.type
        # Only calls that torch.compile traces on every supported torch (2.11 ... 2.13):
        # torch.amp.is_autocast_available is not one of them (dynamo 2.11 cannot trace it),
        # so the device types with an autocast mode are named here instead.
        if (device_type not in AUTOCAST_DEVICE_TYPES
                or not torch.is_autocast_enabled(device_type)):
            return op(*args, **kwargs)  # (bad arguments: the op's checks say what is wrong)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(value):  # (a tensor in the autocast dtype, a flag or a name: returned as is)
            if value is None:
                return value
            if isinstance(value, torch.Tensor):
                if value.dtype == dtype or value.dtype not in registry.FUSED_DTYPES:
                    return value
                return _autocast_copy(value, dtype)
            if isinstance(value, SpatialAttentionParams):
                return value.with_weights(cast)
            return value

        args = [a if i in kept_positions else cast(a) for i, a in enumerate(args)]
        kwargs = {key: value if key in keep else cast(value) for key, value in kwargs.items()}
        if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
            with torch.autocast(device_type, enabled=False):  # (what tracers record)
                return op(*args, **kwargs)
        # Autocast off for the op as ``torch.autocast(device_type, enabled=False)`` turns it
        # off inside an enabled region (its cache is kept: the region goes on), without the
        # context manager's Python layers: this wrapper runs for every op call.
        torch.set_autocast_enabled(device_type, False)
        try:
            return op(*args, **kwargs)
        finally:
            torch.set_autocast_enabled(device_type, True)
    return wrapper


@autocast_aware
def partial_conv3x3(x: torch.Tensor, weight: torch.Tensor, *, inplace: bool = False,
                    backend: str = "auto", eval_form: bool = False) -> torch.Tensor:
    """PConv: Y = [conv3x3(X1) | X2], X1 the first C1 = weight.shape[0] channels of x.

    x: (B, C, H, W), NCHW or channels_last. weight: (C1, C1, 3, 3), same dtype and device.
    Returns a new (B, C, H, W) tensor in x's memory format; with ``inplace=True`` only
    x[:, :C1] is rewritten (the passthrough channels are not touched) and x is returned;
    autograd still gets the weight gradient from the original X1. ``eval_form``: see
    :func:`rpe_attention`.
    """
    check_activation("x", x)
    check_conv_weight("weight", weight, x.shape[1], 3)
    check_same("x", x, weight=weight)
    check_flag("inplace", inplace)
    check_flag("eval_form", eval_form)
    if inplace and any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
        raise ValueError("x is an expanded view (a stride of 0: several of its elements share "
                         "one memory location), so inplace=True would write each of them "
                         "many times; pass x.contiguous() or inplace=False")
    return choose_implementation("partial_conv3x3", backend, x, weight, eval_form=eval_form,
                                 writes_input=inplace)(x, weight, inplace)


@autocast_aware(keep=("cfc_weight", "cfc_bias"))
def channel_attention(x: torch.Tensor, conv_weight: torch.Tensor, cfc_weight: torch.Tensor,
                      cfc_bias: Optional[torch.Tensor], bn_a: Optional[BatchNormParams],
                      bn_b: BatchNormParams, *, training: bool = False,
                      backend: str = "auto", eval_form: bool = False) -> torch.Tensor:
    """The PAT_ch token mixer: [conv3x3(X1) | BN_b(X2 * hsig(BN_a(W_ch . [mu, sigma])))].

    x: (B, C, H, W); conv_weight: (C1, C1, 3, 3), x's dtype; cfc_weight: (C2, C2, 1, 2) with
    C2 = C - C1, and cfc_bias: (C2,) or None, both in x's dtype, or both float32 beside
    float16 / bfloat16 x (the gate runs in float32; under autocast they stay float32); bn_a:
    BatchNormParams over C2 or None (folded into W_ch); bn_b: BatchNormParams over C2. mu and
    sigma are the per-(sample, channel) mean and unbiased
    std of X2 over H * W; with H * W = 1, sigma is NaN (as ``Tensor.std``) and so is Y2.
    In training mode BN_a and BN_b use batch statistics and update their running statistics
    (BN_a then needs a batch of at least 2). ``eval_form``: see :func:`rpe_attention`.
    Returns (B, C, H, W).
    """
    _check_channel_attention(x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, training)
    check_flag("eval_form", eval_form)
    return choose_implementation("channel_attention", backend, x, conv_weight, cfc_weight,
                                 eval_form=eval_form and not training)(
        x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, training)


def _check_channel_attention(x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b,
                             training: bool) -> None:
    """The checks of :func:`channel_attention`'s arguments."""
    check_flag("training", training)
    check_activation("x", x)
    c1 = check_conv_weight("conv_weight", conv_weight, x.shape[1], 3, min_rest=1)
    c2 = x.shape[1] - c1
    check_shape("cfc_weight", cfc_weight, (c2, c2, 1, 2), f"C2 = C - C1 = {c2}")
    if cfc_bias is not None:
        check_shape("cfc_bias", cfc_bias, (c2,))
    check_same("x", x, conv_weight=conv_weight)
    check_same_or_float32("x", x, cfc_weight=cfc_weight)
    check_same("cfc_weight", cfc_weight, cfc_bias=cfc_bias)
    check_batch_norm("bn_a", bn_a, c2, x, training, optional=True)
    check_batch_norm("bn_b", bn_b, c2, x, training)
    if training:
        b, _, h, w = x.shape
        if bn_a is not None:  # (over the (B, C2, 1, 1) logits)
            check_batch_values(b, (b, c2, 1, 1))
        check_batch_values(b * h * w, (b, c2, h, w))


@autocast_aware
def spatial_attention(m: torch.Tensor, gate_weight: torch.Tensor, conv_weight: torch.Tensor,
                      conv_bias: Optional[torch.Tensor], bn_c: BatchNormParams,
                      bn_d: Optional[BatchNormParams], *, training: bool = False,
                      residual: Optional[torch.Tensor] = None,
                      statistics_of: Optional[int] = None, backend: str = "auto"):
    """PAT_sp: [BN_c(Ma * hsig(w . Ma)) | conv1x1(BN_d(Mb))], Ma = m[:, :Q], Mb = m[:, Q:].

    m: (B, C, H, W); gate_weight: (1, Q, 1, 1); conv_weight: (P, P, 1, 1) with P = C - Q;
    conv_bias: (P,) or None; bn_c over Q channels; bn_d over P channels or None (folded into the
    conv); residual: (B, C, H, W) or None, added to the output (PATNet-T1's block residual; on
    Triton in the same kernel). In training mode (``training=True``) BN_c and BN_d use batch
    statistics and update their running statistics. Returns (B, C, H, W); with ``statistics_of``
    = C1 (0 <= C1 < C) the pair (y, statistics of y[:, C1:]) in :func:`partial_block`'s
    ``statistics`` form, for the PAT_ch block that follows (conv on C1 channels): on Triton
    taken by the same kernel, so that block does not read its X2 for them.
    """
    _check_spatial_attention(m, gate_weight, conv_weight, conv_bias, bn_c, bn_d, training)
    if residual is not None:
        check_activation("residual", residual)
        check_shape("residual", residual, tuple(m.shape), "m's shape")
        check_same("m", m, residual=residual)
    check_statistics_of(statistics_of, m.shape[1])
    return choose_implementation("spatial_attention", backend, m, gate_weight, conv_weight)(
        m, gate_weight, conv_weight, conv_bias, bn_c, bn_d, training, residual, statistics_of)


def _check_spatial_attention(m: torch.Tensor, gate_weight, conv_weight, conv_bias, bn_c, bn_d,
                             training: bool, m_name: str = "m", prefix: str = "",
                             channels: Optional[int] = None) -> None:
    """The checks of PAT_sp's arguments on its input m (B, C, H, W): :func:`spatial_attention`'s,
    and those of a fused op's ``spatial`` (:func:`_check_spatial`: m the op's input, named
    ``m_name``, PAT_sp's input having ``channels`` channels; the arguments named with
    ``prefix``)."""
    check_flag("training", training)
    check_activation(m_name, m)
    channels = m.shape[1] if channels is None else channels
    p = check_conv_weight(prefix + "conv_weight", conv_weight, channels, 1, min_rest=1,
                          split="P")
    q = channels - p
    check_shape(prefix + "gate_weight", gate_weight, (1, q, 1, 1), f"Q = C - P = {q}")
    if conv_bias is not None:
        check_shape(prefix + "conv_bias", conv_bias, (p,))
    check_same(m_name, m, **{prefix + "gate_weight": gate_weight,
                             prefix + "conv_weight": conv_weight,
                             prefix + "conv_bias": conv_bias})
    check_batch_norm(prefix + "bn_c", bn_c, q, m, training)
    check_batch_norm(prefix + "bn_d", bn_d, p, m, training, optional=True)
    if training:
        b, _, h, w = m.shape
        check_batch_values(b * h * w, (b, q, h, w))


def _check_spatial(spatial, x: torch.Tensor, channels: int) -> tuple:
    """The checks of a fused op's ``spatial`` (PAT_sp in eval after its MLP, whose output has
    ``channels`` channels); returns the tensors a gradient may flow to (none without it)."""
    if spatial is None:
        return ()
    if not isinstance(spatial, SpatialAttentionParams):
        raise ValueError("spatial must be a patnet_kernels.SpatialAttentionParams (PAT_sp's "
                         f"gate_weight, conv_weight, conv_bias, bn_c, bn_d), got "
                         f"{type(spatial).__name__}")
    _check_spatial_attention(x, *spatial, False, "x", "spatial.", channels)
    return (spatial.gate_weight, spatial.conv_weight, spatial.conv_bias,
            *_affine_tensors(spatial.bn_c, spatial.bn_d))


def _affine_tensors(*bns: Optional[BatchNormParams]) -> tuple:
    """The weights and biases of the BatchNorms given (None: none): tensors a gradient may
    flow to, which an inference op's fused backends refuse."""
    return tuple(t for bn in bns if bn is not None for t in (bn.weight, bn.bias)
                 if t is not None)


@autocast_aware
def batch_norm_act(x: torch.Tensor, bn: BatchNormParams, activation: str = "relu", *,
                   training: bool = False, backend: str = "auto") -> torch.Tensor:
    """act(BatchNorm(x)): the block MLP's BatchNorm and activation (between its 1x1 convs) as
    one op, the BN's output never written (the Triton backward recomputes it from x).

    x: (B, C, H, W); bn over C channels (in training its batch statistics, the running ones
    updated as ``F.batch_norm`` does); activation: "relu" or "gelu" (exact, erf). Returns a
    new (B, C, H, W) tensor in x's memory format.
    """
    check_flag("training", training)
    check_activation("x", x)
    check_batch_norm("bn", bn, x.shape[1], x, training)
    _check_activation_name(activation)
    if training:
        b, c, h, w = x.shape
        check_batch_values(b * h * w, (b, c, h, w))
    return choose_implementation("batch_norm_act", backend, x)(x, bn, activation, training)


def _check_activation_name(activation: str) -> None:
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(MLP_ACTIVATIONS)}, got "
                         f"{activation!r}")


# (height, width, device) -> bucket ids; and, by id() of those tensors, their (min, max), known
# when they are made so that validating them later costs no device synchronisation.
_BUCKET_CACHE: Dict[tuple, torch.Tensor] = {}
_CACHED_BUCKET_RANGE: Dict[int, tuple] = {}


def rpe_buckets(height: int, width: int, device=None) -> torch.Tensor:
    """iRPE bucket ids (N, N), int64, N = height * width, for tokens in row-major order.

    Euclidean method, ratio 20, ids in [0, 81). Computed once per (height, width, device) and
    cached: the returned tensor is shared, so do not modify it in place. Under torch.compile
    the map comes from the registered op ``patnet::rpe_buckets`` (a copy of the cached map,
    made at run time), so a compiled graph needs no break for it.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return _rpe_buckets_op(height, width, torch.empty(0, device=device))
    key = (height, width, device)
    ids = _BUCKET_CACHE.get(key)
    if ids is None:
        with outside_inference_mode():  # (a later training step at this grid saves it)
            with torch.device("cpu"):  # also under a default-device context such as meta
                cpu_ids = reference.compute_rpe_buckets(height, width)
            ids = cpu_ids.to(device)
        low, high = int(cpu_ids.min()), int(cpu_ids.max())
        _BUCKET_CACHE[key] = ids
        _CACHED_BUCKET_RANGE[id(ids)] = (ids, low, high)
    return ids


@torch.library.custom_op("patnet::rpe_buckets", mutates_args=())
def _rpe_buckets_op(height: int, width: int, on_device: torch.Tensor) -> torch.Tensor:
    """The map for ``on_device``'s device (its values are not read): a tensor, not a device
    argument, which Inductor's C++ wrapper (``cpp_wrapper``, torch 2.13) cannot pass."""
    return rpe_buckets(height, width, on_device.device).clone()


@_rpe_buckets_op.register_fake
def _(height, width, on_device):
    n = height * width
    return torch.empty((n, n), dtype=torch.int64, device=on_device.device)


def _bucket_range(bucket: torch.Tensor):
    """(min, max) of the ids; free for the cached maps of :func:`rpe_buckets`."""
    cached = _CACHED_BUCKET_RANGE.get(id(bucket))
    if cached is not None and cached[0] is bucket:
        return cached[1], cached[2]
    if bucket.numel() == 0:
        return 0, 0
    low, high = torch.aminmax(bucket)
    return tuple(torch.stack([low, high]).tolist())  # one synchronisation for both


def _given_bucket_range(bucket_range) -> Tuple[int, int]:
    """The caller's ``bucket_range`` of :func:`rpe_attention`, checked to be (low, high) ints."""
    if not (isinstance(bucket_range, tuple) and len(bucket_range) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in bucket_range)
            and bucket_range[0] <= bucket_range[1]):
        raise ValueError(f"bucket_range must be a tuple (low, high) of two ints with low <= "
                         f"high, the smallest and largest id of bucket; got {bucket_range!r}")
    return bucket_range


@autocast_aware(keep=("table",))
def rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                  bucket: torch.Tensor, scale: Optional[float] = None, dropout_p: float = 0.0,
                  backend: str = "auto", *,
                  bucket_range: Optional[Tuple[int, int]] = None,
                  eval_form: bool = False) -> torch.Tensor:
    """Attention with a relative-position bias gathered from a per-head table.

    O = dropout(softmax(scale * q k^T + table[h, bucket[i, j]])) v.
    q, k, v: (B, heads, N, d); table: (heads, num_buckets), q's dtype, or float32 beside
    float16 / bfloat16 q (the bias is added in float32; under autocast the table stays
    float32); bucket: (N, N) integer ids in [0, num_buckets), for example
    ``rpe_buckets(H, W)``; scale defaults to d ** -0.5.
    Dropout is applied whenever ``dropout_p > 0``: pass 0 in eval. Returns (B, heads, N, d)
    (the fused backends lay it out as (B, N, heads, d) contiguous, so that merging the heads,
    ``out.transpose(1, 2).reshape(B, N, heads * d)``, is a view).

    The ids are checked against the table before anything runs. For the maps of
    :func:`rpe_buckets` their range is known; for any other tensor reading it costs a device
    synchronisation, unless the caller passes ``bucket_range=(low, high)``, the smallest and
    largest id of ``bucket`` as Python ints (it vouches for them: the range is checked against
    the table, the ids are not read). A module that keeps its own map as a buffer passes the
    range it computed when it made the map.

    ``eval_form=True`` (every op with a CPU eval form: the registry's ``Op.eval_form``; what
    ``patnet.optimize_for_inference``'s copy sets): where the reference would run a call in
    eval (no dropout, no batch statistics) on the CPU, float32/float64, with no gradient to
    take, the op's CPU eval form (:mod:`patnet_kernels.eval_cpu`: the same formulas in fewer
    passes, the convolutions on oneDNN) or the reference runs, whichever was faster on the
    first call of its kind on this machine (:mod:`patnet_kernels.cpu_choice`; with
    ``PATNET_CPU_MEASURE=0`` the eval form).
    """
    check_activation("q", q, "(B, heads, N, d)")
    check_shape("k", k, q.shape, "k must match q")
    check_shape("v", v, q.shape, "v must match q")
    check_same("q", q, k=k, v=v)
    check_tensor("table", table)
    check_same_or_float32("q", q, table=table)
    heads, n = q.shape[1], q.shape[2]
    if table.dim() != 2 or table.shape[0] != heads:
        raise ValueError(f"table must be (heads, num_buckets) = ({heads}, num_buckets), got "
                         f"{tuple(table.shape)}")
    if not isinstance(bucket, torch.Tensor) or bucket.dtype not in (torch.int64, torch.int32):
        got = bucket.dtype if isinstance(bucket, torch.Tensor) else type(bucket).__name__
        raise TypeError(f"bucket must be an int64 or int32 tensor of ids, for example "
                        f"patnet_kernels.rpe_buckets(H, W), got {got}; convert it with .long()")
    check_shape("bucket", bucket, (n, n), f"N x N for the N = {n} tokens of q")
    check_device("q", q, bucket=bucket)
    # Under torch.compile an unknown map's range is not read (a device sync and a graph
    # break). The maps of rpe_buckets are in range by construction; check your own in eager.
    if bucket_range is not None:
        low, high = _given_bucket_range(bucket_range)
    else:
        low, high = (0, 0) if torch.compiler.is_compiling() else _bucket_range(bucket)
    if low < 0 or high >= table.shape[1]:
        raise ValueError(f"bucket ids span [{low}, {high}] but the table has only "
                         f"{table.shape[1]} buckets per head; this map needs a table of at "
                         f"least {high + 1} (the iRPE table of PATNet has 81)")
    check_number("dropout_p", dropout_p, 0.0, 1.0)
    if scale is not None:
        check_number("scale", scale, 0.0)
    check_flag("eval_form", eval_form)
    return choose_implementation("rpe_attention", backend, q, k, v, table,
                                 eval_form=eval_form and dropout_p == 0.0)(
        q, k, v, table, bucket, scale, dropout_p)


@autocast_aware
def self_mixer_output(x: torch.Tensor, conv_weight: torch.Tensor, tokens: torch.Tensor,
                      proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor] = None,
                      dropout_p: float = 0.0, backend: str = "auto", *,
                      eval_form: bool = False, residual: bool = False) -> torch.Tensor:
    """The output of PAT_sf: [conv3x3(X1) | dropout(tokens @ proj_weight^T + proj_bias)], or
    with ``residual`` x plus it (the stage-4 block's first residual sum).

    x: (B, C, H, W), X1 = x[:, :C1], C1 = conv_weight.shape[0]; tokens: (B, N, C2), N = H * W
    in row-major order, C2 = C - C1 (the attention output with its heads merged);
    proj_weight: (C2, C2); proj_bias: (C2,) or None. Dropout with probability ``dropout_p`` is
    applied to the projection (pass 0 in eval); its mask is drawn like ``F.dropout`` on a
    (B, N, C2) tensor, so every backend sees the same mask. ``eval_form``: see
    :func:`rpe_attention`. Returns (B, C, H, W); the fused backends write both halves straight
    into it (no concatenation; Triton in one kernel, the residual sum included).
    """
    check_activation("x", x)
    c1 = check_conv_weight("conv_weight", conv_weight, x.shape[1], 3, min_rest=1)
    b, c, h, w = x.shape
    c2 = c - c1
    check_shape("tokens", tokens, (b, h * w, c2), f"(B, H * W, C2) with C2 = C - C1 = {c2}")
    check_shape("proj_weight", proj_weight, (c2, c2))
    if proj_bias is not None:
        check_shape("proj_bias", proj_bias, (c2,))
    check_same("x", x, conv_weight=conv_weight, tokens=tokens, proj_weight=proj_weight,
               proj_bias=proj_bias)
    check_number("dropout_p", dropout_p, 0.0, 1.0)
    check_flag("residual", residual)
    check_flag("eval_form", eval_form)
    implementation = choose_implementation("self_mixer_output", backend, x, conv_weight, tokens,
                                           proj_weight, eval_form=eval_form and dropout_p == 0.0)
    keep = None
    if dropout_p > 0.0:  # as F.dropout: bernoulli(1 - p) / (1 - p), same generator calls
        keep = torch.empty((b, h * w, c2), dtype=x.dtype, device=x.device)
        keep.bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
    return implementation(x, conv_weight, tokens, proj_weight, proj_bias, keep, residual)


@autocast_aware
def pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor] = None, *,
                  residual: Optional[torch.Tensor] = None, activation: str = "relu",
                  spatial: Optional[SpatialAttentionParams] = None,
                  backend: str = "auto", eval_form: bool = False) -> torch.Tensor:
    """The block's MLP in inference: W2 . act(W1 . X + b1) + b2 [+ residual]; with ``spatial``
    (PAT_sp's tensors, :class:`patnet_kernels.SpatialAttentionParams`, its BatchNorms' running
    statistics) PAT_sp(W2 . act(W1 . X + b1) + b2) [+ residual] (PATNet-T1's MLPs; on Triton
    in the same kernel, the MLP's output never written).

    x: (B, C, H, W), NCHW or channels_last; w1: (hidden, C, 1, 1) (the first 1x1 conv with its
    BatchNorm folded, ``patnet.fuse_for_inference``); b1: (hidden,) or None; w2:
    (C_out, hidden, 1, 1); b2: (C_out,) or None; residual: (B, C_out, H, W) or None (added
    last: the block's residual); activation: "relu" or "gelu" (exact, erf). Returns a new
    (B, C_out, H, W) tensor in x's memory format; the fused kernel keeps the hidden
    activation on chip (never written to memory) up to 256 output channels, and past them runs
    in two passes, the hidden activation written once (not recomputed per block of 256 output
    channels). An inference op: its fused kernels compute
    no gradient, so where one may be taken (grad mode on and an input requiring one) a fused
    backend named here raises and "auto" runs the reference, which has one. ``eval_form``:
    see :func:`rpe_attention`.
    """
    _check_mlp(x, w1, b1, w2, b2, residual, activation)
    spatial_tensors = _check_spatial(spatial, x, w2.shape[0])
    check_flag("eval_form", eval_form)
    return choose_implementation("pointwise_mlp", backend, x, w1, b1, w2, b2, residual,
                                 *spatial_tensors, eval_form=eval_form)(
        x, w1, b1, w2, b2, residual, activation, spatial)


def _shape_or_type(value: object) -> str:
    """A bad weight argument as an error message names it: its shape, or what it is instead."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _check_mlp(x, w1, b1, w2, b2, residual, activation) -> None:
    """The checks of :func:`pointwise_mlp`'s arguments."""
    check_activation("x", x)
    b, c, h, w = x.shape
    for name, weight in (("w1", w1), ("w2", w2)):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 \
                or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"{name} must be a 1x1 conv weight (out, in, 1, 1), got "
                             f"{_shape_or_type(weight)}")
    hidden, c_out = w1.shape[0], w2.shape[0]
    if hidden == 0 or c_out == 0:
        raise ValueError(f"w1 and w2 must have at least one output channel each, got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    check_shape("w1", w1, (hidden, c, 1, 1), f"hidden x C with C = {c} input channels")
    check_shape("w2", w2, (c_out, hidden, 1, 1), f"C_out x hidden with hidden = {hidden}")
    if b1 is not None:
        check_shape("b1", b1, (hidden,))
    if b2 is not None:
        check_shape("b2", b2, (c_out,))
    if residual is not None:
        check_activation("residual", residual)
        check_shape("residual", residual, (b, c_out, h, w), "the MLP's output shape")
    check_same("x", x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    _check_activation_name(activation)


@autocast_aware(keep=("cfc_weight", "cfc_bias"))
def partial_block(x: torch.Tensor, conv_weight: torch.Tensor, w1: torch.Tensor,
                  b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor] = None,
                  *, cfc_weight: Optional[torch.Tensor] = None,
                  cfc_bias: Optional[torch.Tensor] = None, bn_a: Optional[BatchNormParams] = None,
                  bn_b: Optional[BatchNormParams] = None, activation: str = "relu",
                  statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  return_statistics: bool = False, residual: bool = True,
                  spatial: Optional[SpatialAttentionParams] = None, backend: str = "auto"):
    """A FasterNet block or a PATNet PAT_ch block in inference: x + MLP(mixer(x)); with
    ``spatial``, PAT_sp's tensors (:class:`patnet_kernels.SpatialAttentionParams`, its
    BatchNorms' running statistics), x + PAT_sp(MLP(mixer(x))) (PATNet-T1's block); with
    ``residual=False`` the same without x added.

    The mixer is PConv, [conv3x3(X1) | X2] (:func:`partial_conv3x3`), or, given ``cfc_weight``
    and ``bn_b``, PAT_ch in eval (:func:`channel_attention` with its running statistics; its
    ``cfc_bias`` and ``bn_a`` as there). The MLP: see :func:`pointwise_mlp` (its output has
    x's C channels, the block adding x back). x: (B, C, H, W), NCHW or channels_last;
    conv_weight: (C1, C1, 3, 3). Returns a new (B, C, H, W) tensor in x's memory format.

    The Triton backend never writes the mixer's output: the MLP kernel computes its input,
    [conv3x3(X1) | X2 * scale + shift], as it reads X (:mod:`patnet_kernels.ops.partial_block`).
    With ``spatial`` the Triton kernel also runs PAT_sp on the MLP's output before adding x
    back (one program holding all C output channels of its pixel tile), so neither output is
    written. An inference op, as :func:`pointwise_mlp`.

    PAT_ch's statistics of X2 can come from the block before (blocks of one stage share C and
    C1): ``return_statistics=True`` returns (y, statistics) with the statistics of y[:, C1:]
    that the next PAT_ch block reads, and ``statistics=`` hands them to it, which then does
    not read X2 for them (on Triton: 2 launches instead of 3). The form: (mean, sum of squared
    deviations), each (B, T, C - C1) float32, per chunk of pixels
    (:func:`patnet_kernels._types.chunk_layout`); they must be those of this x, as the
    previous call returned them (a cache: the reference computes its own).
    """
    if cfc_weight is None:
        given = [name for name, t in (("cfc_bias", cfc_bias), ("bn_a", bn_a), ("bn_b", bn_b))
                 if t is not None]
        if given:
            raise ValueError(f"{', '.join(given)} belong to PAT_ch: pass its cfc_weight too "
                             "(or none of them for a FasterNet block)")
        check_activation("x", x)
        check_conv_weight("conv_weight", conv_weight, x.shape[1], 3)
        check_same("x", x, conv_weight=conv_weight)
    else:
        _check_channel_attention(x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, False)
    if isinstance(w2, torch.Tensor) and w2.dim() == 4 and w2.shape[0] != x.shape[1]:
        raise ValueError(f"w2 must have C = {x.shape[1]} output channels (the block adds x "
                         f"back), got {tuple(w2.shape)}")
    _check_mlp(x, w1, b1, w2, b2, None, activation)
    check_flag("residual", residual)
    check_flag("return_statistics", return_statistics)
    if return_statistics and not residual:
        raise ValueError("return_statistics gives the statistics of the block's output: with "
                         "residual=False (PAT_sp and the residual still to come) there is none")
    if statistics is not None:
        if cfc_weight is None:
            raise ValueError("statistics belong to PAT_ch (its gate reads them): pass "
                             "cfc_weight too, or no statistics for a FasterNet block")
        _check_statistics(statistics, x, conv_weight.shape[0])
    spatial_tensors = _check_spatial(spatial, x, x.shape[1])
    return choose_implementation("partial_block", backend, x, conv_weight, cfc_weight,
                                 cfc_bias, w1, b1, w2, b2, *_affine_tensors(bn_a, bn_b),
                                 *spatial_tensors)(
        x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, w1, b1, w2, b2, activation,
        statistics, bool(return_statistics), bool(residual), spatial)


@autocast_aware(keep=("x",))
def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               statistics_of: Optional[int] = None, channels_last: Optional[bool] = None,
               backend: str = "auto", eval_form: bool = False):
    """The stem or a merging layer in inference (BatchNorm folded): conv(x, weight, bias) with
    kernel size = stride = k, no padding (non-overlapping k x k patches).

    x: (B, C_IN, H, W) with H, W >= k, NCHW or channels_last, in any floating dtype (on the
    fused backends float32, float16 or bfloat16; the reference takes float64 too): it is
    read as it is and converted to the weight's dtype (under autocast the weight is cast and
    x is not: the fused kernel reads a float32 image itself, no cast pass). weight: (C_OUT,
    C_IN, k, k); bias: (C_OUT,) or None, the weight's dtype. Returns (B, C_OUT, H // k, W // k)
    in the weight's dtype, in channels_last if ``channels_last`` is True, NCHW if False, x's
    memory format if None (the stem can take an NCHW image and write channels_last, with no
    pass over either to convert it); with ``statistics_of`` = C1 (the next PAT_ch block's
    split), (y, statistics): those of y[:, C1:] in :func:`partial_block`'s form, which that
    block takes as its ``statistics`` instead of reading its X2 for them. An inference op, as
    :func:`pointwise_mlp`. ``eval_form``: see :func:`rpe_attention`.
    """
    check_activation("x", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 \
            or weight.shape[2] != weight.shape[3] or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (C_OUT, C_IN, k, k) with C_IN = {x.shape[1]} (x's "
                         f"channels), got {_shape_or_type(weight)}")
    check_activation("weight", weight, "(C_OUT, C_IN, k, k)")
    k = weight.shape[-1]
    if x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"x's H x W = {x.shape[2]} x {x.shape[3]} is smaller than the "
                         f"{k} x {k} patch")
    _check_weight_reading(x, weight, bias)
    check_statistics_of(statistics_of, weight.shape[0])
    if channels_last is None:
        channels_last = memory_format_of(x) == torch.channels_last
    elif not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True (write y channels_last), False (NCHW) or "
                         f"None (x's memory format), got {channels_last!r}")
    check_flag("eval_form", eval_form)
    return choose_implementation("patch_conv", backend, x, weight, bias, eval_form=eval_form)(
        x, weight, bias, statistics_of, channels_last)


@autocast_aware(keep=("x",))
def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      *, eps: float = 1e-5, backend: str = "auto",
                      eval_form: bool = False) -> torch.Tensor:
    """PAT_sf's LayerNorm and qkv projection in inference: Linear(LayerNorm(tokens of x)).

    x: (B, C_IN, H, W) in any layout, a channel slice too (PAT_sf's X2, ``x[:, C1:]``), in any
    floating dtype (on the fused backends float32, float16 or bfloat16): its pixels are the
    tokens (B, N = H * W, C_IN), row-major, each normalised over its C_IN values with ``eps``
    and no affine (fold the LayerNorm's weight g and bias b into the projection: weight * g,
    bias + weight @ b, as :func:`patnet.fuse_for_inference` does) in float32 (as autocast runs
    layer_norm), then converted to the weight's dtype; x is read as it is (no copy of the slice,
    no cast pass). weight: (C_OUT, C_IN) (``nn.Linear``'s), bias: (C_OUT,) or None, the weight's
    dtype (under autocast both cast, x not). Returns (B, N, C_OUT) contiguous in the weight's
    dtype. An inference op, as :func:`pointwise_mlp`. ``eval_form``: see :func:`rpe_attention`.
    """
    check_activation("x", x)
    c_in = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_OUT, C_IN) with C_IN = {c_in} (x's channels), got "
                         f"{_shape_or_type(weight)}")
    check_activation("weight", weight, "(C_OUT, C_IN)")
    _check_weight_reading(x, weight, bias)
    check_number("eps", eps, 0.0)
    check_flag("eval_form", eval_form)
    return choose_implementation("layer_norm_linear", backend, x, weight, bias,
                                 eval_form=eval_form)(
        x, weight, bias, float(eps))


def _check_weight_reading(x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> None:
    """The checks of an op whose weight (C_OUT, ...) and bias (C_OUT,) or None share a dtype and
    whose input x is read in its own dtype (``patch_conv``, ``layer_norm_linear``)."""
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
    check_same("weight", weight, bias=bias)
    check_device("weight", weight, x=x)
    if weight.dtype != x.dtype and weight.dtype not in registry.FUSED_DTYPES:
        raise TypeError(f"weight is {weight.dtype} but x is {x.dtype}: x is read in its own "
                        f"dtype only into float32, float16 or bfloat16 weights; cast x to "
                        f"{weight.dtype}")


def _check_statistics(statistics, x: torch.Tensor, c1: int) -> None:
    """The checks of :func:`partial_block`'s ``statistics``."""
    b, c, h, w = x.shape
    if not (isinstance(statistics, (tuple, list)) and len(statistics) == 2
            and all(isinstance(t, torch.Tensor) for t in statistics)):
        raise ValueError("statistics must be the (mean, m2) pair a previous partial_block "
                         "returned with return_statistics=True")
    mean, m2 = statistics
    chunks = mean.shape[1] if mean.dim() == 3 else 0
    if (mean.dim() != 3 or mean.shape[0] != b or mean.shape[2] != c - c1 or chunks < 1
            or chunk_layout(h * w, chunks) is None or m2.shape != mean.shape):
        raise ValueError(f"statistics must be two (B, T, C2) = ({b}, T, {c - c1}) tensors with "
                         f"T chunks of the {h * w} pixels a sample (as partial_block returns "
                         f"them for this x), got {tuple(mean.shape)} and {tuple(m2.shape)}")
    if mean.dtype != torch.float32 or m2.dtype != torch.float32:
        raise ValueError(f"statistics must be float32, got {mean.dtype} and {m2.dtype}")
    check_device("x", x, statistics_mean=mean, statistics_m2=m2)
