"""Every op of the package, declared once.

An :class:`Op` says what an op is and who implements it: its name (that of the functional API
and of the reference function), the layout of its main input, the module of
:mod:`patnet_kernels.ops` that defines its registered ops, fakes and autograd Function, the
kernel family (``patnet_kernels/triton/<family>.py`` and ``csrc/kernels/<family>.cu``), the
fused backends that have kernels for it, and the limits under which they take a call
(:func:`refusals`). Everything that lists ops is derived from :data:`OPS`: the functional API's
dispatch (:func:`implementation`), the ``torch.library`` registrations of each fused backend,
``info()``, ``backend_plan()``, the ahead-of-time compile list, the CUDA build's sources and the
tests' parametrisation. Adding an op means its reference, its kernels, its two ``ops``
modules, its functional entry point and one entry here (README.md, "Ops").

No torch.library or Triton import happens here: the backends' modules are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import eval_cpu, reference as reference_ops
from .ops import DirectOps

# The fused backends, in the order "auto" prefers them when both are measured equal.
FUSED_BACKENDS = ("triton", "cuda")
# Activation dtypes the fused kernels take (they accumulate in float32).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The name of an op's CPU eval form where an implementation is named (registry.implementation).
EVAL_FORM = "torch (CPU eval form)"
# The dtypes the CPU eval forms serve (they compute in the input dtype).
EVAL_FORM_DTYPES = (torch.float32, torch.float64)
# The torch.library namespace of each fused backend's ops.
NAMESPACES = {"triton": "patnet_triton", "cuda": "patnet_cuda"}
# The most tokens the CUDA attention kernel takes (kMaxTokens of csrc/kernels/launchers.h).
CUDA_MAX_TOKENS = 1024
# The largest head dim of the fused attention kernels (both backends; PATNet's are 48 to 240).
MAX_HEAD_DIM = 256


class Op(NamedTuple):
    """One op of the functional API.

    name: the functional API's, the reference's and the eval form's function name. title: what
    the paper calls it (for messages). layout: of the main input, "map" (B, C, H, W) or "heads"
    (B, heads, N, d). module: the stem of its files: ``ops/<module>.py`` (fakes, autograd
    Function, ``backend_function(ops)``), ``ops/triton/<module>.py`` (its Triton ops),
    ``reference/<module>.py``, ``tests/test_fused_<module>.py``,
    ``benchmarks/bench_<module>.py``. family: its kernel files, ``triton/<family>.py`` and
    ``csrc/kernels/<family>.cu``. backends: the fused backends with kernels for it. eval_form:
    whether :mod:`patnet_kernels.eval_cpu` has a CPU eval form of it. inference: its fused
    kernels compute no gradient (an inference op): they refuse a call through which one may
    be taken, which the reference then runs under "auto".
    """
    name: str
    title: str
    layout: str
    module: str
    family: str
    backends: Tuple[str, ...]
    eval_form: bool = False
    inference: bool = False


OPS: Dict[str, Op] = {op.name: op for op in (
    Op("partial_conv3x3", "PConv", "map", "partial_conv", "partial_conv", ("triton", "cuda"),
       eval_form=True),
    Op("channel_attention", "PAT_ch", "map", "channel_attention", "channel_attention",
       ("triton", "cuda"), eval_form=True),
    Op("spatial_attention", "PAT_sp", "map", "spatial_attention", "spatial_attention",
       ("triton",)),
    Op("batch_norm_act", "the block MLP's BatchNorm and activation", "map", "batch_norm_act",
       "batch_norm_act", ("triton",)),
    Op("rpe_attention", "PAT_sf's attention", "heads", "rpe_attention", "rpe_attention",
       ("triton", "cuda"), eval_form=True),
    # (its kernels: the conv of partial_conv and a batched GEMM)
    Op("self_mixer_output", "PAT_sf's output", "map", "self_mixer", "partial_conv",
       ("triton", "cuda"), eval_form=True),
    Op("pointwise_mlp", "the block's MLP (BatchNorm folded)", "map", "pointwise_mlp",
       "pointwise_mlp", ("triton",), eval_form=True, inference=True),
    Op("patch_conv", "the stem or a merging layer (BatchNorm folded; inference)", "map",
       "patch_conv", "patch_conv", ("triton",), eval_form=True, inference=True),
    # (its kernel: the patch conv's, k = 1, with a LayerNorm prologue)
    Op("layer_norm_linear", "PAT_sf's LayerNorm and qkv projection (inference)", "map",
       "layer_norm_linear", "patch_conv", ("triton",), eval_form=True, inference=True),
    # (its kernels: PConv's conv, PAT_ch's statistics and gate, and the MLP's)
    Op("partial_block", "a FasterNet or PAT_ch block, with PAT_sp or not (inference)", "map", "partial_block",
       "pointwise_mlp", ("triton",), inference=True),
)}


def ops_of(backend: str) -> Tuple[str, ...]:
    """The ops ``backend`` has kernels for ("torch": every op)."""
    return tuple(name for name, op in OPS.items() if backend == "torch" or backend in op.backends)


def families(backend: str) -> Tuple[str, ...]:
    """The kernel families ``backend`` ("triton" or "cuda") builds, in declaration order."""
    return tuple(dict.fromkeys(op.family for op in OPS.values() if backend in op.backends))


def op_modules(backend: str) -> Tuple[str, ...]:
    """The modules of :mod:`patnet_kernels.ops` that register ``backend``'s ops."""
    return tuple(dict.fromkeys(op.module for op in OPS.values() if backend in op.backends))


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine or these tensors."""


class Refusal(NamedTuple):
    """Why a fused backend cannot take a call: the name of the error a named request raises
    (a key of :data:`ERRORS`) and its message after ``backend='name' `` (e.g. "runs float32,
    float16 and bfloat16, got ..."). Plain strings: a constant that torch.compile keeps."""
    backend: str
    error: str
    reason: str


# The errors a refusal raises, by name.
ERRORS = {error.__name__: error for error in (BackendUnavailableError, TypeError, ValueError)}
# (op, dtype, head dim over the limit or 0, tokens over the CUDA limit or 0, a gradient of an
# inference op asked for) -> the refusals.
_REFUSALS: Dict[tuple, Tuple[Refusal, ...]] = {}


def refusals(op: str, x: Optional[torch.Tensor] = None, needs_grad: bool = False
             ) -> Tuple[Refusal, ...]:
    """Every fused backend that cannot take a call of ``op`` whose main input is ``x`` (its
    inputs already validated; None: whatever the inputs), with the reason: the limits of each
    backend, stated once. ``needs_grad``: a gradient may be taken through the call. Kept per
    kind of call, so that a call costs a look-up."""
    spec = OPS[op]
    grad = needs_grad and spec.inference
    if x is None:
        key = (op, None, 0, 0, False)
    elif spec.layout == "heads":
        head_dim, tokens = x.shape[-1], x.shape[2]
        key = (op, x.dtype, head_dim if head_dim > MAX_HEAD_DIM else 0,
               tokens if tokens > CUDA_MAX_TOKENS else 0, grad)
    else:
        key = (op, x.dtype, 0, 0, grad)
    found = _REFUSALS.get(key)
    if found is None:
        found = _REFUSALS[key] = _refusals(*key)
    return found


def _refusals(op: str, dtype: Optional[torch.dtype], head_dim: int, tokens: int, grad: bool
              ) -> Tuple[Refusal, ...]:
    found = []
    for backend in FUSED_BACKENDS:
        if backend not in OPS[op].backends:
            found.append(Refusal(backend, "BackendUnavailableError", f"has no kernel for {op}"))
        elif dtype is None:
            continue
        elif grad:
            found.append(Refusal(backend, "ValueError",
                                 f"runs {op} for inference only (it computes no gradient), "
                                 "and a gradient may be taken here (grad mode on, an input "
                                 "requiring one); call it under torch.no_grad()"))
        elif dtype not in FUSED_DTYPES:
            found.append(Refusal(backend, "TypeError",
                                 f"runs float32, float16 and bfloat16, got {dtype}"))
        elif head_dim:
            found.append(Refusal(backend, "ValueError",
                                 f"runs {op} for head dims up to {MAX_HEAD_DIM} (PATNet's are "
                                 f"48 to 240), got {head_dim}"))
        elif backend == "cuda" and tokens:
            found.append(Refusal(backend, "BackendUnavailableError",
                                 f"runs {op} for N <= {CUDA_MAX_TOKENS} tokens, got {tokens}"))
    return tuple(found)


def eval_form_refusal(op: str, x: torch.Tensor, needs_grad: bool) -> Optional[str]:
    """Why the CPU eval form of ``op`` cannot take a call whose main input is ``x`` (None if it
    can): it has none, or the call is not on the CPU, not float32/float64, or a gradient will
    be taken (``needs_grad``). Whether the call is in eval (no dropout, no batch statistics)
    the functional API knows and checks."""
    if not OPS[op].eval_form:
        return f"{op} has no CPU eval form"
    if x.device.type != "cpu":
        return "the eval forms run on the CPU"
    if x.dtype not in EVAL_FORM_DTYPES:
        return "the eval forms run float32 and float64"
    if needs_grad:
        return "the eval forms compute no gradient"
    return None


def refusal_error(refusal: Refusal, refused: Tuple[Refusal, ...]) -> Exception:
    """The error for a request of ``refusal.backend`` by name, pointing to what can run."""
    taken = [b for b in FUSED_BACKENDS if b != refusal.backend
             and all(r.backend != b for r in refused)]
    way_out = f"backend={taken[0]!r} or 'auto'" if taken else "backend='torch'"
    return ERRORS[refusal.error](f"backend={refusal.backend!r} {refusal.reason}; use {way_out}")


class _Loaded:
    """Where :func:`load` keeps a fused backend's function for one op (None until loaded). One
    holder per (op, backend), made with the registry, so that the dictionary holding them never
    changes: torch.compile reads a dictionary once per trace, and one filled during the trace
    (the backend decision loads an op's backend the first time the op is met) would be read
    stale; a holder's attribute is read as it is when the call is traced."""
    __slots__ = ("function",)

    def __init__(self):
        self.function: Optional[Callable] = None


# (op, fused backend) -> the holder of the function that runs it: filled by load(), read by
# implementation().
_IMPLEMENTATIONS: Dict[Tuple[str, str], _Loaded] = {
    (name, backend): _Loaded() for name, op in OPS.items() for backend in op.backends}


def load(op: str, backend: str) -> None:
    """Import what the fused ``backend`` needs to run ``op`` and keep its function: the module
    registering the op's Triton ops, or the CUDA extension (loaded, or built on first use).
    Called where the backend is chosen, outside any traced code; the caller has checked that
    the backend has kernels for ``op`` (:func:`refusals`)."""
    loaded = _IMPLEMENTATIONS.get((op, backend))
    if loaded is not None and loaded.function is None:
        registering = f"ops.triton.{OPS[op].module}" if backend == "triton" else "ops.cuda"
        importlib.import_module(f"{__package__}.{registering}")
        module = importlib.import_module(f"{__package__}.ops.{OPS[op].module}")
        namespace = NAMESPACES[backend]
        loaded.function = module.backend_function(
            DirectOps(namespace) if backend == "triton" else getattr(torch.ops, namespace))


def implementation(op: str, backend: str) -> Callable:
    """The function that runs ``op`` as ``backend`` ("torch", "triton", "cuda" or EVAL_FORM)
    does, with the reference's signature; a fused backend's once :func:`load` has run (a
    dictionary look-up that torch.compile traces)."""
    if backend == "torch":
        return getattr(reference_ops, op)
    if backend == EVAL_FORM:
        return getattr(eval_cpu, op)
    return _IMPLEMENTATIONS[(op, backend)].function
