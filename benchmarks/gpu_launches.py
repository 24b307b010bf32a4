"""The package's Triton launches as a GPU would make them, on a machine without one.

Without TRITON_INTERPRET, and with :func:`launch_as_on_a_gpu`, the Triton backend takes CPU
tensors and its launchers choose their tiles, splits and grids as on an H100 (132
multiprocessors, device 0); Triton's binder then specialises each launch from the CPU tensors as
it would from CUDA ones (dtypes, 16-byte alignment, integers equal to 1 or multiples of 16). What
is done with the launches is the caller's: ``tests/released_launches.py`` records their
arguments (against the AOT check's lists), :mod:`benchmarks.precompile` their specialisations
(to compile them ahead), :mod:`benchmarks.host_time` its host time (:func:`stand_in_kernels`:
Triton's launcher run to the launch). Nothing may be computed from a launch's outputs: no
kernel runs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from patnet_kernels import backends
from patnet_kernels.triton import _common


def launch_as_on_a_gpu(multiprocessors: int = 132) -> None:
    """Let the Triton backend take CPU tensors, its GPU-only queries answered as a GPU's with
    ``multiprocessors`` (an H100's by default); for this process, for good."""
    backends.triton_interpreter_enabled = lambda: True  # (the backend is usable on the CPU)
    _common.check_kernel_device = lambda tensor: None
    _common._multiprocessors = lambda device: multiprocessors
    torch.cuda.current_device = lambda: 0


class CompileOnlyDriver:
    """What Triton's JIT asks the active driver for before it compiles (device, stream, target),
    answered for ``target`` (a ``triton.backends.compiler.GPUTarget``): no GPU is touched, so
    the CPU can specialise and compile for it."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        return self.target


class _StandInKernel:
    """In place of a compiled kernel in Triton's cache: a launch of it records its kernel's name
    and does nothing (what Triton's launcher calls on a compiled kernel, as of Triton 3.9)."""
    function = None
    packed_metadata = None

    def __init__(self, name: str, launched: List[str]):
        self.name, self.launched = name, launched

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.launched.append(self.name)


@contextlib.contextmanager
def stand_in_kernels(arch: int = 90) -> Iterator[List[str]]:
    """Triton's launcher (``JITFunction.run``) runs inside as on an sm_``arch`` GPU up to the
    launch itself: its binder specialises every launch from the CPU tensors, computes the
    cache key and looks it up; the kernel it finds is a stand-in whose launch does nothing
    (the first launch of each specialisation puts one there in place of a compile, and launches
    nothing). Yields the names of the kernels launched. Needs Triton outside its interpreter
    (``TRITON_INTERPRET`` unset or 0 when the kernels are defined); sets
    :func:`launch_as_on_a_gpu` and a driver that answers as that GPU's, both for good (as
    :mod:`benchmarks.precompile`). The host work it leaves out is the C launcher's and the
    driver's."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    launched: List[str] = []

    def skip_compile(*, key, fn, **_):  # (Triton's jit_cache_hook: True skips the compile)
        kernel_cache = fn.jit_function.device_caches[0][0]
        kernel_cache[key] = _StandInKernel(fn.name, launched)
        return True

    launch_as_on_a_gpu()
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, skip_compile
    try:
        yield launched
    finally:
        knobs.runtime.jit_cache_hook = previous


class GemmsShapesOnly(TorchDispatchMode):
    """aten convolutions and matrix products (the training path's stem, merging layers, 1x1
    convs and PAT_sf's projections, forward and backward: most of a step's CPU time at
    224 x 224, in fp16 slower still) give outputs of the right shape without computing them,
    laid out as cuDNN and cuBLAS lay them out (a convolution's channels_last where its input or
    weight is, else contiguous; the CPU's kernels choose otherwise, and the layouts decide the
    launches of the kernels that take their gradients); every other op runs."""

    CONVOLUTIONS = (torch.ops.aten.convolution.default,
                    torch.ops.aten.convolution_backward.default)
    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.bmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.CONVOLUTIONS + self.PRODUCTS:
            return func(*args, **kwargs)
        layout = torch.contiguous_format
        if func in self.CONVOLUTIONS:
            # convolution(input, weight, ...); convolution_backward(grad_out, input, weight, ...)
            x, w = args[:2] if func is self.CONVOLUTIONS[0] else args[1:3]
            if any(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                    memory_format=torch.channels_last) for t in (x, w)):
                layout = torch.channels_last

        def meta(t):
            return (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                    if isinstance(t, torch.Tensor) else t)

        def empty(t):
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty(t.shape, dtype=t.dtype,
                               memory_format=layout if t.dim() == 4 else torch.contiguous_format)
        return tree_map(empty, func(*tree_map(meta, args), **tree_map(meta, kwargs)))


def run_model(model: torch.nn.Module, x: torch.Tensor, training: bool,
              amp: Optional[torch.dtype]) -> None:
    """One forward (and, ``training``, backward) of ``model`` on CPU input ``x`` (B, 3, H, W),
    under autocast to ``amp`` if given (the CPU's autocast: the ops cast as under CUDA's), the
    convolutions and matrix products shapes only; the gradients are dropped."""
    with GemmsShapesOnly():
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            with torch.set_grad_enabled(training):
                out = model(x)
        if training:
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)
