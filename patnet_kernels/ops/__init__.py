"""The fused backends as registered ops (``torch.library``) and autograd Functions.

One module per op family; :mod:`.cuda` binds the same Functions to the CUDA extension's ops. Each defines its ops with fakes (so ``torch.compile`` traces through
them without a graph break), the autograd Functions that call them, and a function with the
signature of the reference op, which :mod:`patnet_kernels.functional` dispatches to. Modules are
imported on first use, so importing patnet_kernels does not import triton.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..backends import CUDA_OPS, BackendUnavailableError


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


def _cuda_ops() -> Dict[str, Callable]:
    from . import cuda  # loads (or builds) the extension on first use
    return cuda.IMPLEMENTATIONS


def implementation(backend: str, op: str) -> Callable:
    """The ``backend`` ("triton" or "cuda") implementation of ``op``; BackendUnavailableError
    if that backend has no kernel for it."""
    if backend == "cuda" and op not in CUDA_OPS:  # (say so without building the extension)
        found = None
    else:
        found = (_triton_ops() if backend == "triton" else _cuda_ops()).get(op)
    if found is None:
        others = "backend='triton' or 'auto'" if backend == "cuda" else "backend='torch'"
        raise BackendUnavailableError(f"backend={backend!r} has no kernel for {op}; use "
                                      f"{others}")
    return found
