"""The block's ops in the Triton backend: no op of its own (see :mod:`..partial_block`); importing
this module registers the ``patnet_triton`` ops it composes."""
from __future__ import annotations

from . import channel_attention, partial_conv, pointwise_mlp  # noqa: F401 - registers them
