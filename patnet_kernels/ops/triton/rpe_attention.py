"""rpe_attention's ops in the Triton backend (``patnet_triton``): bodies that launch the
kernels of :mod:`patnet_kernels.triton.rpe_attention`, with the per-map bucket sort they need
cached; fakes and autograd in :mod:`..rpe_attention`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..._types import outside_inference_mode
from ...triton import rpe_attention as kernels
from ...triton._common import on_tensor_device
from .. import custom_op, register_fakes, rpe_attention as spec

Tensor = torch.Tensor


# Each bucket map's int32 copy and the per-bucket sort that the table gradient sums over,
# computed once per map and kept while the map lives (weakly keyed, never evicted: a CUDA graph
# that read them stays valid while its model holds the map), made again when the map changes
# (version, storage, layout).
_SEGMENTS = WeakIdKeyDictionary()


def _segments(bucket: Tensor, num_buckets: int):
    if bucket.is_inference():  # (no version counter to check a kept entry against)
        return kernels.bucket_segments(bucket, num_buckets)
    key = (bucket._version, bucket.data_ptr(), tuple(bucket.shape), tuple(bucket.stride()),
           num_buckets)
    kept = _SEGMENTS.get(bucket)
    if kept is None or kept[0] != key:
        with outside_inference_mode():  # (kept for later calls)
            kept = _SEGMENTS[bucket] = (key, kernels.bucket_segments(bucket, num_buckets))
    return kept[1]


def _seed_value(seed: Optional[Tensor], dropout_p: float) -> int:
    if dropout_p <= 0.0:
        return kernels.SEED_LOW
    if seed is None:
        raise ValueError("rpe_attention with dropout_p > 0 needs a seed tensor")
    return int(seed.item())  # a CPU tensor: no device synchronisation


@custom_op("patnet_triton::rpe_attention_fwd", mutates_args=())
@on_tensor_device
def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, bucket: Tensor, scale: float,
             dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    ids32 = _segments(bucket, table.shape[1])[0]
    return kernels.rpe_attention_forward(q, k, v, table.float().contiguous(), ids32, scale,
                                         dropout_p, _seed_value(seed, dropout_p))


@custom_op("patnet_triton::rpe_attention_bwd", mutates_args=())
@on_tensor_device
def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              table: Tensor, bucket: Tensor, scale: float, dropout_p: float,
              seed: Optional[Tensor], deterministic: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    ids32, order, seg, low, _ = _segments(bucket, table.shape[1])
    dq, dk, dv, dtable = kernels.rpe_attention_backward(
        grad_out, q, k, v, out, lse.contiguous(), table.float().contiguous(),
        ids32, order, seg, low, scale, dropout_p, _seed_value(seed, dropout_p), deterministic)
    return dq, dk, dv, dtable.to(table.dtype)


register_fakes("patnet_triton", spec.FAKES)
