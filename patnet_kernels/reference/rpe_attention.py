"""iRPE bucket ids and attention with a gathered relative-position bias (reference).

SPEC.md section 4: Euclidean method, ratio 20 (alpha 20, beta 40, gamma 160), 81 buckets,
"bias" mode on keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

ALPHA, BETA, GAMMA = 20.0, 40.0, 160.0
NUM_BUCKETS = 2 * int(BETA) + 1  # ids in [0, 81)


def compute_rpe_buckets(height: int, width: int) -> torch.Tensor:
    """Bucket ids (N, N), int64 on the CPU, N = height * width, tokens in row-major order.

    d = round(sqrt(dr^2 + dc^2)); pi(d) = d if d <= alpha, else
    min(beta, round(alpha + ln(d / alpha) / ln(gamma / alpha) * (beta - alpha))); id = pi(d) + 40.
    Computed in float32 with the same operations, in the same order, as the authors' iRPE code,
    so that every id agrees with theirs bit for bit (rounding near .5 depends on it).
    """
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    pos = torch.stack([rows, cols], dim=-1).reshape(-1, 2)
    diff = pos[:, None, :] - pos[None, :, :]
    dist = diff.square().sum(-1).float().sqrt().round()
    far = (ALPHA + torch.log(dist / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA))
    far = far.round().clip(max=BETA)
    ids = torch.where(dist <= ALPHA, dist, far).long()
    return ids + int(BETA)


def rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                  bucket: torch.Tensor, scale: Optional[float] = None,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q k^T + table[h, bucket[i, j]]), dropout, times v.

    q, k, v: (B, heads, N, d); table: (heads, num_buckets), q's dtype or float32 (cast to q's
    dtype, as autocast casts a weight); bucket: (N, N) integer ids.
    scale defaults to d ** -0.5. Dropout with probability ``dropout_p`` is applied to the
    attention weights whenever ``dropout_p > 0`` (pass 0 in eval). Returns (B, heads, N, d).
    The (heads, N, N) bias and the (B, heads, N, N) scores are materialised, as in the authors' code.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bias = table.to(q.dtype)[:, bucket]  # (heads, N, N), in q's dtype (a float32 table cast)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn += bias  # in place, as the authors' code (the scores are not needed by autograd)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p, training=True)
    return attn @ v
