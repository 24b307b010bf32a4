"""Pure-PyTorch reference of every op: the ground truth of every parity test and benchmark.

These functions follow the authors' code (haiduo/PartialNet) operation by operation, so that a
float64 run reproduces the authors' float64 vectors to rounding. They do not validate their
inputs: the functional API in :mod:`patnet_kernels` does that once for every backend.
"""
from .batch_norm import batch_norm
from .batch_norm_act import batch_norm_act
from .channel_attention import channel_attention, channel_statistics
from .layer_norm_linear import layer_norm_linear
from .partial_block import partial_block
from .partial_conv import partial_conv3x3
from .patch_conv import patch_conv
from .pointwise_mlp import pointwise_mlp
from .rpe_attention import ALPHA, BETA, GAMMA, NUM_BUCKETS, compute_rpe_buckets, rpe_attention
from .self_mixer import self_mixer_output
from .spatial_attention import spatial_attention

__all__ = [
    "ALPHA", "BETA", "GAMMA", "NUM_BUCKETS", "batch_norm", "batch_norm_act", "channel_attention",
    "channel_statistics", "compute_rpe_buckets", "layer_norm_linear", "partial_block", "partial_conv3x3",
    "patch_conv", "pointwise_mlp", "rpe_attention", "self_mixer_output", "spatial_attention",
]
