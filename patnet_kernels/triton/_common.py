"""What every Triton kernel family shares: interpreter detection, block sizes, AOT specs."""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is defined (at import of the kernel modules).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor) -> None:
    """Refuse a tensor the kernels in this mode cannot reach, saying what to do."""
    if INTERPRET and t.device.type != "cpu":
        raise RuntimeError(f"Triton was imported with TRITON_INTERPRET=1, so its kernels run on "
                           f"CPU tensors only, got a {t.device} tensor; unset TRITON_INTERPRET "
                           "before the first import of triton to run on the GPU")
    if not INTERPRET and t.device.type != "cuda":
        raise RuntimeError(f"Triton kernels need CUDA tensors, got a {t.device} tensor; use "
                           "backend='torch' on the CPU (or set TRITON_INTERPRET=1 before the "
                           "first import of triton to test the kernels on the CPU)")


def on_tensor_device(op_body: Callable) -> Callable:
    """Decorate a registered op's body: check its first argument (a tensor) with
    :func:`check_device` and run the body with that tensor's CUDA device current, since Triton
    launches on the current device (tensors on cuda:1 while cuda:0 is current would otherwise
    run on the wrong GPU)."""

    @functools.wraps(op_body)
    def run(tensor, *args, **kwargs):
        check_device(tensor)
        if tensor.device.type == "cuda":
            with torch.cuda.device(tensor.device):
                return op_body(tensor, *args, **kwargs)
        return op_body(tensor, *args, **kwargs)

    # torch.library reads the schema off the signature: give it the body's, with the
    # annotations evaluated in the body's module (they may be strings there).
    run.__signature__ = inspect.signature(op_body, eval_str=True)
    return run


def upcast_dot(dtype: torch.dtype, interpret: bool = INTERPRET) -> bool:
    """Whether a kernel should convert its tl.dot operands to fp32 (with IEEE precision).

    fp32 inputs always (no TF32: the budget is the reference's own fp32 error). Under the
    interpreter also fp16/bf16, whose arithmetic it emulates wrongly (Triton issue #11584).
    """
    return interpret or dtype == torch.float32


def block(n: int, low: int = 16, high: int = 1 << 30) -> int:
    """The power of two >= n, clamped to [low, high] (tl.dot needs every dimension >= 16)."""
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


@triton.jit
def to_compute(x, UPCAST: tl.constexpr):
    """A loaded tile in the dtype a tl.dot takes it: fp32 when UPCAST, else as loaded."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def hardsigmoid(z):
    """clamp(z + 3, 0, 6) / 6, as torch.nn.functional.hardsigmoid."""
    return tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def hardsigmoid_grad(z):
    """d hardsigmoid / dz: 1/6 strictly inside (-3, 3), else 0 (as PyTorch's backward)."""
    return tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)


@dataclass
class AotKernel:
    """One kernel as shipped: argument types and constexprs for an ahead-of-time compile.

    ``signature`` maps every argument name to a Triton type string ("*fp16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives each constexpr's value for this configuration.
    """
    name: str
    fn: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    options: Dict[str, object] = field(default_factory=dict)


TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = tuple(TRITON_DTYPE)


def aot_signature(fn: Callable, pointers: Dict[str, str], scalars: Dict[str, str] = None
                  ) -> Dict[str, str]:
    """A full signature for ``fn``: the given pointer and scalar types, "i32" for every other
    non-constexpr argument and "constexpr" for the constexprs."""
    scalars = scalars or {}
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name) or scalars.get(name) or "i32"
    return sig
