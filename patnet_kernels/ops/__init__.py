"""The fused backends' ops: one module per op (see :mod:`patnet_kernels.registry`).

``ops/<op>.py`` is backend-neutral: the fakes of the op's ``torch.library`` ops (their output
shapes, dtypes and strides, so that torch.compile traces through them), the autograd Function
over a backend's ``torch.ops`` namespace and ``backend_function(ops)``, the op with the
reference's signature. ``ops/triton/<op>.py`` registers the ``patnet_triton`` ops (bodies that
launch the kernels of :mod:`patnet_kernels.triton`) with :func:`custom_op`, which also keeps
each body for :class:`DirectOps` (the body called without PyTorch's dispatcher where that
would add nothing but host time); :mod:`.cuda` loads the CUDA extension,
whose ``patnet_cuda`` ops have the same schemas, and registers the same fakes for them.
Modules are imported on first use, so importing patnet_kernels imports neither Triton nor
the extension, and the CUDA backend does not import Triton.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .._types import AUTOCAST_DEVICE_TYPES


def register_fakes(namespace: str, fakes: Dict[str, Callable]) -> None:
    """Register each fake of ``fakes`` (op name -> fake) for ``namespace::name``."""
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)


def tensor_dtypes(inputs: Sequence) -> tuple:
    """The dtype of each of an autograd Function's ``inputs`` that is a tensor (None for the
    others and for absent tensors): what its forward keeps for :func:`in_input_dtypes`."""
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in inputs)


def in_input_dtypes(grads: Sequence[Optional[torch.Tensor]], dtypes: Sequence,
                    needs: Sequence[bool]) -> tuple:
    """An autograd Function's gradients, one per input (``needs``: its needs_input_grad; the
    trailing non-tensor inputs may have no entry in ``grads``), each one needed in its input's
    dtype (:func:`tensor_dtypes`), the others None. The ops return parameter gradients in float32
    (their sums are float32), so a float32 parameter beside half activations (a BatchNorm's
    under autocast) gets its gradient unrounded, without a cast kernel either way (rounded to
    float16 a BatchNorm's bias gradient, a sum over every pixel of the batch, overflows at
    GradScaler's loss scales)."""
    return tuple(grads[i].to(dtypes[i]) if need and grads[i] is not None else None
                 for i, need in enumerate(needs))


def backward_without_autocast(backward: Callable) -> Callable:
    """Decorate an autograd Function's backward: run it with autocast off wherever it is on, as
    its forward runs (under the functional API's ``autocast_aware``). A caller may run backward
    inside an autocast region (``loss.backward()`` within ``torch.autocast``); the backward's
    own torch arithmetic (float32 sums, the CUDA backend's PAT_ch gate) then stays in the
    dtypes the forward chose, not cast to the autocast dtype: no rounded gradients, and no
    float32 argument of a kernel turned half."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with contextlib.ExitStack() as autocast_off:
            for device_type in AUTOCAST_DEVICE_TYPES:
                if torch.is_autocast_enabled(device_type):
                    autocast_off.enter_context(torch.autocast(device_type, enabled=False))
            return backward(ctx, *grads)
    return run


# Registered ops whose body is Python (the Triton backend's), "namespace::name" -> the body,
# or None for an op that mutates an argument (always dispatched: the dispatcher bumps the
# argument's version counter, which autograd's saved-tensor checks read).
PYTHON_BODIES: Dict[str, Optional[Callable]] = {}


def custom_op(qualname: str, mutates_args: Sequence[str] = ()) -> Callable:
    """``torch.library.custom_op(qualname, mutates_args=...)`` that also records the body for
    :class:`DirectOps`."""
    def register(body: Callable):
        PYTHON_BODIES[qualname] = None if mutates_args else body
        return torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(body)
    return register


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_PLAIN_VALUES = (int, float, bool, str, type(None), torch.dtype)


def _plain(values, grad_enabled: bool) -> bool:
    for value in values:
        kind = type(value)
        if kind in _PLAIN_TENSORS:
            if grad_enabled and value.requires_grad:
                return False
        elif kind in (list, tuple):
            if not _plain(value, grad_enabled):
                return False
        elif kind not in _PLAIN_VALUES:
            return False
    return True


def calls_body_directly(args) -> bool:
    """Whether a registered op with a Python body may run that body itself on ``args``: the
    dispatcher would add nothing. Not while torch.compile or torch.jit traces, not under a
    dispatch mode (FakeTensorMode, the traffic model's recorder, export's modes), a functorch
    transform (vmap, grad) or the profiler (it names the op), and only for plain tensors (no
    subclass, none needing a gradient) and plain Python values."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.maybe_current_level() is None
            and not torch._C._autograd._profiler_enabled()
            and torch._C._get_tracing_state() is None
            and _plain(args, torch.is_grad_enabled()))


def _direct_or_dispatched(op: Callable, body: Callable) -> Callable:
    def call(*args):
        if calls_body_directly(args):
            return body(*args)
        return op(*args)
    call.__name__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    return call


class DirectOps:
    """A backend's ``torch.ops`` namespace whose Python-bodied ops run their bodies where the
    dispatcher would add nothing (:func:`calls_body_directly`): PyTorch's dispatch of a
    ``torch.library.custom_op`` through its autograd, fake-tensor and dynamo layers costs
    about 12 us per call on a 2-core CPU (our launchers themselves about 18 us), and an
    inference forward makes dozens. The mutating ops are the registered ops. What
    :func:`patnet_kernels.registry.load` hands to the Triton ops' ``backend_function`` (the
    CUDA extension's ops are C++: their dispatch has no Python layers)."""

    def __init__(self, namespace: str):
        self._ops = getattr(torch.ops, namespace)
        prefix = f"{namespace}::"
        for qualname, body in PYTHON_BODIES.items():
            if qualname.startswith(prefix):
                name = qualname[len(prefix):]
                op = getattr(self._ops, name)
                setattr(self, name, op if body is None else _direct_or_dispatched(op, body))

    def __getattr__(self, name: str):  # (an op registered after this was made)
        return getattr(self._ops, name)
