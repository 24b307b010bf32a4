"""The CUDA backend: the ``patnet_cuda`` ops of csrc/ with the same fakes, autograd Functions
and entry points as the Triton backend.

Importing this module loads the extension (building it on first use if need be, see
:mod:`patnet_kernels._cuda_ext`), registers each op's fake (so torch.compile traces the ops
without a graph break) and builds the backend functions over ``torch.ops.patnet_cuda``.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from . import channel_attention, partial_conv, rpe_attention, self_mixer

LOADED_FROM = _cuda_ext.load()

_NAMESPACE = "patnet_cuda"
for _module in (partial_conv, channel_attention, rpe_attention, self_mixer):
    for _name, _fake in _module.FAKES.items():
        torch.library.register_fake(f"{_NAMESPACE}::{_name}")(_fake)

ops = torch.ops.patnet_cuda

IMPLEMENTATIONS = {
    "partial_conv3x3": partial_conv.make_partial_conv3x3(ops),
    "channel_attention": channel_attention.make_channel_attention(ops),
    "rpe_attention": rpe_attention.make_rpe_attention(ops, "cuda"),
    "self_mixer_output": self_mixer.make_self_mixer_output(ops),
}
