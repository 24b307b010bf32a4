"""The fused backends' ops: one module per op (see :mod:`patnet_kernels.registry`).

``ops/<op>.py`` is backend-neutral: the fakes of the op's ``torch.library`` ops (their output
shapes, dtypes and strides, so that torch.compile traces through them), the autograd Function
over a backend's ``torch.ops`` namespace and ``backend_function(ops)``, the op with the
reference's signature. ``ops/triton/<op>.py`` registers the ``patnet_triton`` ops (bodies that
launch the kernels of :mod:`patnet_kernels.triton`); :mod:`.cuda` loads the CUDA extension,
whose ``patnet_cuda`` ops have the same schemas, and registers the same fakes for them.
Modules are imported on first use, so importing patnet_kernels imports neither Triton nor
the extension, and the CUDA backend does not import Triton.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch


def register_fakes(namespace: str, fakes: Dict[str, Callable]) -> None:
    """Register each fake of ``fakes`` (op name -> fake) for ``namespace::name``."""
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)
