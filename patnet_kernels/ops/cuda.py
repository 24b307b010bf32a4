"""The CUDA backend: the ``patnet_cuda`` ops of csrc/ with the fakes of :mod:`patnet_kernels.ops`.

Importing this module loads the extension (building it on first use if need be, see
:mod:`patnet_kernels._cuda_ext`) and registers the fake of every op it defines, so that
torch.compile traces them without a graph break; the autograd Functions are the op modules'
own, made over ``torch.ops.patnet_cuda`` by :func:`patnet_kernels.registry.implementation`.
"""
from __future__ import annotations

import importlib

from .. import _cuda_ext, registry
from . import register_fakes

LOADED_FROM = _cuda_ext.load()

for _module in registry.op_modules("cuda"):
    register_fakes("patnet_cuda", importlib.import_module(f"{__package__}.{_module}").FAKES)
