"""patnet-kernels: fused kernels for PATNet's partial operations, behind one functional API.

Public API::

    partial_conv3x3(x, weight, *, inplace=False, backend="auto")
    channel_attention(x, conv_weight, cfc_weight, cfc_bias, bn_a, bn_b, *, training=False,
                      backend="auto", eval_form=False)
    spatial_attention(m, gate_weight, conv_weight, conv_bias, bn_c, bn_d, *, training=False,
                      residual=None, statistics_of=None, backend="auto")
    rpe_buckets(height, width, device=None)
    rpe_attention(q, k, v, table, bucket, scale=None, dropout_p=0.0, backend="auto", *,
                  bucket_range=None, eval_form=False)
    self_mixer_output(x, conv_weight, tokens, proj_weight, proj_bias=None, dropout_p=0.0,
                      backend="auto", *, eval_form=False, residual=False)
    pointwise_mlp(x, w1, b1, w2, b2=None, *, residual=None, activation="relu", spatial=None,
                  backend="auto")
    partial_block(x, conv_weight, w1, b1, w2, b2=None, *, cfc_weight=None, cfc_bias=None,
                  bn_a=None, bn_b=None, activation="relu", statistics=None,
                  return_statistics=False, residual=True, spatial=None, backend="auto")
    batch_norm_act(x, bn, activation="relu", *, training=False, backend="auto")
    patch_conv(x, weight, bias=None, *, statistics_of=None, channels_last=None, backend="auto")
    layer_norm_linear(x, weight, bias=None, *, eps=1e-5, backend="auto")
    info()

``patnet_kernels.reference`` holds the pure-PyTorch ground truth of every op;
``patnet_kernels.registry`` declares every op once (its backends and their limits).
"""
from . import registry
from ._types import BatchNormParams, SpatialAttentionParams
from .backends import (BACKENDS, OPS, BackendUnavailableError, backend_plan, check_backend_name,
                       check_backend_usable, choose_backend, info, recording_calls,
                       resolve_backend)
from .functional import (batch_norm_act, channel_attention, layer_norm_linear, partial_block,
                         partial_conv3x3, patch_conv, pointwise_mlp, rpe_attention, rpe_buckets,
                         self_mixer_output, spatial_attention)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "OPS", "BackendUnavailableError", "BatchNormParams", "SpatialAttentionParams",
    "backend_plan", "batch_norm_act", "channel_attention", "check_backend_name", "check_backend_usable", "choose_backend", "info",
    "layer_norm_linear", "partial_block", "partial_conv3x3", "patch_conv", "pointwise_mlp",
    "recording_calls", "registry", "resolve_backend", "rpe_attention", "rpe_buckets",
    "self_mixer_output", "spatial_attention",
]
