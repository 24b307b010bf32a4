"""Attention with a gathered relative-position bias: ops and autograd Function for every fused
backend (the ops: ``patnet_triton::*`` from :mod:`patnet_kernels.ops.triton.rpe_attention`,
``patnet_cuda::*`` from csrc/), each with a fake so torch.compile traces through them:

* ``rpe_attention_fwd(q, k, v, table, bucket, scale, dropout_p, seed) -> (out, lse)``: out
  (B, heads, N, d) in q's dtype, laid out as (B, N, heads, d) contiguous, so that merging the
  heads into (B, N, heads * d) tokens (what PAT_sf's projection takes) is a view, not a copy;
  lse (B, heads, N) fp32 (for the backward).
* ``rpe_attention_bwd(grad_out, q, k, v, out, lse, table, bucket, scale, dropout_p, seed,
  deterministic) -> (grad_q, grad_k, grad_v, grad_table)``.

The dropout seed is an input (an int64 CPU tensor of shape (), or None without dropout), drawn
from torch's generator by :func:`rpe_attention` (so ``torch.manual_seed`` reproduces a run); the
ops themselves are deterministic functions of their inputs. The backward is deterministic (no
float atomics, the same bits on every run) unless atomics were allowed with
:func:`allow_atomic_backward` and ``torch.are_deterministic_algorithms_enabled()`` is False.

The autograd Function is made by :func:`make_functions` over a backend's ``torch.ops``
namespace; :func:`backend_function` is the op with the reference's signature.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import DROPOUT_SEED_RANGE
from . import backward_without_autocast

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


def _forward_fake(q, k, v, table, bucket, scale, dropout_p, seed):
    b, heads, n, d = q.shape
    return (q.new_empty((b, n, heads, d)).transpose(1, 2),
            q.new_empty((b, heads, n), dtype=torch.float32))


def _backward_fake(grad_out, q, k, v, out, lse, table, bucket, scale, dropout_p, seed,
                   deterministic):
    shape = tuple(q.shape)
    return (q.new_empty(shape), q.new_empty(shape), q.new_empty(shape),
            table.new_empty(tuple(table.shape)))


def draw_seed() -> Tensor:
    """A dropout seed from torch's CPU generator (reproducible with torch.manual_seed): an int64
    CPU tensor of shape (), in the range both backends' kernels take."""
    return torch.randint(*DROPOUT_SEED_RANGE, (), dtype=torch.int64)


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
        @backward_without_autocast
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


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.rpe_attention` over ``ops``."""
    RpeAttention = make_functions(ops)

    def rpe_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, bucket: Tensor,
                      scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
        """rpe_attention with this backend's kernels (inputs checked, within the backend's
        limits: patnet_kernels.registry). With dropout the seed is drawn here from torch's
        CPU generator (so torch.manual_seed reproduces a run)."""
        if scale is None:
            scale = q.shape[-1] ** -0.5
        seed = draw_seed() if dropout_p > 0.0 else None
        return RpeAttention.apply(q, k, v, table, bucket, float(scale), float(dropout_p), seed)

    return rpe_attention
