"""The fused backends as registered ops (``torch.library``) and autograd Functions.

One module per op family. Each defines its ops with fakes (so ``torch.compile`` traces through
them without a graph break), the autograd Functions that call them, and a function with the
signature of the reference op, which :mod:`patnet_kernels.functional` dispatches to. Modules are
imported on first use, so importing patnet_kernels does not import triton.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..backends import BackendUnavailableError


def _triton_ops() -> Dict[str, Callable]:
    # A plain import statement (which torch.compile can trace), run on first use.
    from . import partial_conv
    from . import self_mixer
    from . import channel_attention
    from . import rpe_attention
    from . import spatial_attention
    return {
        "partial_conv3x3": partial_conv.partial_conv3x3,
        "channel_attention": channel_attention.channel_attention,
        "self_mixer_output": self_mixer.self_mixer_output,
        "rpe_attention": rpe_attention.rpe_attention,
        "spatial_attention": spatial_attention.spatial_attention,
    }


def triton_implementation(op: str) -> Callable:
    """The Triton backend of ``op``; BackendUnavailableError if this version has none."""
    implementation = _triton_ops().get(op)
    if implementation is None:
        raise BackendUnavailableError(f"backend='triton' has no kernel for {op} in this version; "
                                      "use backend='torch'")
    return implementation
