"""Attention with a gathered relative-position bias as registered ops (Triton backend).

Ops in the ``patnet_triton`` namespace, each with a fake so torch.compile traces through them:

* ``rpe_attention_fwd(q, k, v, table, bucket, scale, dropout_p, seed) -> (out, lse)``: out
  (B, heads, N, d) contiguous in q's dtype, lse (B, heads, N) fp32 (for the backward).
* ``rpe_attention_bwd(grad_out, q, k, v, out, lse, table, bucket, scale, dropout_p, seed,
  deterministic) -> (grad_q, grad_k, grad_v, grad_table)``.

The dropout seed is an input (an int64 CPU tensor of shape (), or None without dropout), drawn
from torch's generator by :func:`rpe_attention` (so ``torch.manual_seed`` reproduces a run); the
ops themselves are deterministic functions of their inputs. The backward is deterministic (no
float atomics, the same bits on every run) unless atomics were allowed with
:func:`allow_atomic_backward` and ``torch.are_deterministic_algorithms_enabled()`` is False.

The autograd Function is made by :func:`make_functions` over a ``torch.ops`` namespace, so that
another backend registering the same schemas reuses it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..triton import rpe_attention as kernels
from ..triton._common import FLOAT_DTYPES, on_tensor_device

Tensor = torch.Tensor

# Whether the backward may use fp32 atomics (faster at large N, not bit-reproducible) when the
# user has not asked for determinism. Off by default: the gradients are deterministic.
_ALLOW_ATOMICS = False


def allow_atomic_backward(enabled: bool = True) -> None:
    """Let the backward accumulate dQ and the table gradient with fp32 atomics (faster when
    N > 64, but the gradients' last bits may change run to run). Ignored while
    ``torch.use_deterministic_algorithms(True)`` is in effect."""
    global _ALLOW_ATOMICS
    _ALLOW_ATOMICS = bool(enabled)


def use_atomics() -> bool:
    """Whether the next backward uses the atomic path."""
    return _ALLOW_ATOMICS and not torch.are_deterministic_algorithms_enabled()


# Bucket maps are fixed per (H, W): their int32 copy and the per-bucket sort that the table
# gradient sums over are computed once per map. Keyed by the map's storage, version and layout;
# the entry holds the map, so its storage cannot be freed and reused while cached.
_SEGMENTS_CACHE: dict = {}
_SEGMENTS_CACHE_SIZE = 16


def _segments(bucket: Tensor, num_buckets: int):
    try:
        key = (bucket.data_ptr(), bucket._version, tuple(bucket.shape), tuple(bucket.stride()),
               bucket.dtype, bucket.device, num_buckets)
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return kernels.bucket_segments(bucket, num_buckets)
    hit = _SEGMENTS_CACHE.get(key)
    if hit is not None and hit[0] is bucket:
        return hit[1]
    segments = kernels.bucket_segments(bucket, num_buckets)
    if len(_SEGMENTS_CACHE) >= _SEGMENTS_CACHE_SIZE:
        _SEGMENTS_CACHE.pop(next(iter(_SEGMENTS_CACHE)))
    _SEGMENTS_CACHE[key] = (bucket, segments)
    return segments


def _seed_value(seed: Optional[Tensor], dropout_p: float) -> int:
    if dropout_p <= 0.0:
        return kernels.SEED_LOW
    if seed is None:
        raise ValueError("rpe_attention with dropout_p > 0 needs a seed tensor")
    return int(seed.item())  # a CPU tensor: no device synchronisation


@torch.library.custom_op("patnet_triton::rpe_attention_fwd", mutates_args=())
@on_tensor_device
def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, bucket: Tensor, scale: float,
             dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    ids32 = _segments(bucket, table.shape[1])[0]
    return kernels.rpe_attention_forward(q, k, v, table.float().contiguous(), ids32, scale,
                                         dropout_p, _seed_value(seed, dropout_p))


@_forward.register_fake
def _forward_fake(q, k, v, table, bucket, scale, dropout_p, seed):
    b, heads, n, d = q.shape
    return q.new_empty((b, heads, n, d)), q.new_empty((b, heads, n), dtype=torch.float32)


@torch.library.custom_op("patnet_triton::rpe_attention_bwd", mutates_args=())
@on_tensor_device
def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              table: Tensor, bucket: Tensor, scale: float, dropout_p: float,
              seed: Optional[Tensor], deterministic: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    ids32, order, seg, low, _ = _segments(bucket, table.shape[1])
    dq, dk, dv, dtable = kernels.rpe_attention_backward(
        grad_out, q, k, v, out.contiguous(), lse.contiguous(), table.float().contiguous(),
        ids32, order, seg, low, scale, dropout_p, _seed_value(seed, dropout_p), deterministic)
    return dq, dk, dv, dtable.to(table.dtype)


@_backward.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, table, bucket, scale, dropout_p, seed, deterministic):
    shape = tuple(q.shape)
    return (q.new_empty(shape), q.new_empty(shape), q.new_empty(shape),
            table.new_empty(tuple(table.shape)))



# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "rpe_attention_fwd": _forward_fake,
    "rpe_attention_bwd": _backward_fake,
}


def make_functions(ops):
    """The autograd Function of rpe_attention over the ops of one backend namespace.

    ``ops`` is a ``torch.ops`` namespace with ``rpe_attention_fwd`` and ``rpe_attention_bwd``
    (the schemas above); returns RpeAttention.
    """

    class RpeAttention(torch.autograd.Function):
        """dropout(softmax(scale q k^T + table[h, bucket])) v; q, k, v (B, heads, N, d)."""

        @staticmethod
        def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table: Tensor, bucket: Tensor,
                    scale: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
            out, lse = ops.rpe_attention_fwd(q, k, v, table, bucket, scale, dropout_p, seed)
            ctx.save_for_backward(q, k, v, table, bucket, out, lse, seed)
            ctx.scale, ctx.dropout_p = scale, dropout_p
            return out

        @staticmethod
        def backward(ctx, grad_out: Tensor):
            q, k, v, table, bucket, out, lse, seed = ctx.saved_tensors
            dq, dk, dv, dtable = ops.rpe_attention_bwd(
                grad_out, q, k, v, out, lse, table, bucket, ctx.scale, ctx.dropout_p, seed,
                not use_atomics())
            needs = ctx.needs_input_grad
            return (dq if needs[0] else None, dk if needs[1] else None,
                    dv if needs[2] else None, dtable if needs[3] else None,
                    None, None, None, None)

    return RpeAttention


def make_rpe_attention(ops, backend: str):
    """The backend function of :func:`patnet_kernels.rpe_attention` over ``ops`` (named
    ``backend`` in its errors)."""
    RpeAttention = make_functions(ops)

    def rpe_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, bucket: Tensor,
                      scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
        """rpe_attention with this backend's kernels (inputs already checked by the functional
        API). fp32, fp16 and bf16. With dropout the seed is drawn here from torch's CPU
        generator (so torch.manual_seed reproduces a run)."""
        if q.dtype not in FLOAT_DTYPES:
            raise TypeError(f"backend={backend!r} runs float32, float16 and bfloat16, got "
                            f"{q.dtype}; use backend='torch' for other dtypes")
        if q.shape[-1] > kernels.MAX_HEAD_DIM:
            raise ValueError(f"backend={backend!r} runs rpe_attention for head dims up to "
                             f"{kernels.MAX_HEAD_DIM} (PATNet's are 48 to 240), got "
                             f"{q.shape[-1]}; use backend='torch'")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        seed = kernels.draw_seed() if dropout_p > 0.0 else None
        return RpeAttention.apply(q, k, v, table, bucket, float(scale), float(dropout_p), seed)

    return rpe_attention


rpe_attention = make_rpe_attention(torch.ops.patnet_triton, "triton")
