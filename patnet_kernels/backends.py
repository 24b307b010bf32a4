"""Which backends can run here, and the choice behind ``backend="auto"``.

Backends: ``"torch"`` (the pure-PyTorch reference, always usable), ``"triton"`` (fused Triton
kernels) and ``"cuda"`` (the CUDA C++ kernels of csrc/, see :mod:`patnet_kernels._cuda_ext`).
A backend asked for by name that cannot run raises :class:`BackendUnavailableError` saying
why; nothing falls back silently. ``"auto"`` runs the reference on the CPU and, on a GPU, a
fused backend only where committed measurements show it faster than the reference for that
call (:mod:`patnet_kernels.auto_rule`). :func:`choose_implementation` turns a call (op, inputs,
backend asked for) into the function that runs it, from the limits the registry declares
(:mod:`patnet_kernels.registry`) and :func:`choose_backend`, the one place that decides;
:func:`info` reports every backend with the reason it was refused.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import auto_rule, cpu_choice, cpu_conv, registry
from .registry import BackendUnavailableError, Refusal

BACKENDS = ("auto", "torch") + registry.FUSED_BACKENDS
# What backend_plan says of "auto" on a GPU, where the choice is made per call.
AUTO_PER_CALL = "auto: per call (measured)"
NO_FUSED_BACKEND = "no fused backend is usable here"
# The backends that run the reference on the CPU whatever the call ("auto" runs no fused kernel
# there; choose_backend decides so, and choose_implementation takes it as read).
REFERENCE_ON_CPU = ("auto", "torch")
# Every op of the functional API, and those the CUDA backend has kernels for.
OPS = tuple(registry.OPS)
CUDA_OPS = registry.ops_of("cuda")


def triton_interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set: Triton kernels then run on CPU tensors (for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status(device: Optional[torch.device]) -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton)"
    on_cpu = device is None or torch.device(device).type == "cpu"
    if triton_interpreter_enabled():
        if on_cpu:
            return True, "Triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly"
        return False, ("TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors; "
                       "unset it (before triton is imported) to run them on the GPU")
    if on_cpu:
        return False, ("Triton kernels run on CUDA tensors; to test them on the CPU set "
                       "TRITON_INTERPRET=1 before triton is imported")
    if not torch.cuda.is_available():
        return False, "no CUDA device is available to this PyTorch"
    return True, "Triton kernels compiled for this GPU"


def _cuda_status(device: Optional[torch.device]) -> Tuple[bool, str]:
    from . import _cuda_ext

    on_cpu = device is None or torch.device(device).type == "cpu"
    if _cuda_ext.emulation_enabled():
        if on_cpu and not _cuda_ext.ninja_available():
            return False, ("PATNET_CUDA_EMULATE=1, but its build needs ninja (pip install "
                           "ninja) and a C++ compiler")
        if on_cpu:
            return True, ("CPU emulation of the CUDA kernels (PATNET_CUDA_EMULATE=1): runs on "
                          "CPU tensors, slowly, for testing")
        return False, ("PATNET_CUDA_EMULATE=1 is set, so the CUDA backend runs only on CPU "
                       "tensors; unset it to run the CUDA kernels on the GPU")
    if on_cpu:
        return False, ("the CUDA kernels run on CUDA tensors; to test them on the CPU set "
                       "PATNET_CUDA_EMULATE=1")
    if torch.version.cuda is None:
        return False, "this PyTorch is a CPU build; " + _cuda_ext.HOW_TO_BUILD
    if not torch.cuda.is_available():
        return False, "no CUDA device is available to this PyTorch"
    if _cuda_ext.loaded():
        return True, f"CUDA kernels: {_cuda_ext.loaded()}"
    if _cuda_ext.prebuilt_available():
        return True, "CUDA kernels: prebuilt extension patnet_kernels._C"
    ok, why = _cuda_ext.jit_possible()
    if ok:
        return True, f"CUDA kernels: {why}"
    return False, f"the extension patnet_kernels._C is not built ({why}); {_cuda_ext.HOW_TO_BUILD}"


def gpu_name(device: torch.device) -> str:
    """The kind of GPU ``device`` is, as the measurements name it (e.g. "NVIDIA H200")."""
    return torch.cuda.get_device_name(device)


def _torch_status(device: Optional[torch.device]) -> Tuple[bool, str]:
    return True, "pure-PyTorch reference: runs wherever PyTorch runs"


_STATUS = {"torch": _torch_status, "triton": _triton_status, "cuda": _cuda_status}


def check_backend_name(backend: str) -> None:
    """Raise a ValueError listing the valid names unless ``backend`` is one of them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def check_op_name(op: object) -> None:
    """Raise a ValueError listing the ops unless ``op`` is the name of one."""
    if not isinstance(op, str) or op not in registry.OPS:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(registry.OPS)}")


def choose_implementation(op: str, backend: str, x: torch.Tensor,
                          *others: Optional[torch.Tensor], eval_form: bool = False,
                          writes_input: bool = False) -> Callable:
    """The function that runs a call of ``op`` whose main input is ``x`` (``others``: the other
    tensors a gradient may flow to; the inputs already validated), as ``backend`` asks: the
    one place the functional API learns what to run. The fused backends' limits come from the
    registry (:func:`patnet_kernels.registry.refusals`), the decision from
    :func:`choose_backend`; where that is the reference and ``eval_form`` is asked for (the
    call is in eval) and the op's CPU eval form takes the call
    (:func:`patnet_kernels.registry.eval_form_refusal`), the faster of the reference and the
    eval form for the call's shapes on this machine runs
    (:data:`patnet_kernels.cpu_choice.EVAL_FORMS`, timed on the first call of each kind; the
    eval form where timing is off). ``writes_input``: the call writes into ``x`` (an in-place
    op), which the timing then restores before each of its runs."""
    if backend in REFERENCE_ON_CPU and x.device.type == "cpu" and _RECORDED_CALLS is None:
        name = "torch"  # (choose_backend's decision, whatever the call: ~6 us a call saved)
    else:
        # ("auto" needs the call's description on a GPU, and on the meta device for
        # backend_calls; on the CPU it runs the reference whatever the call)
        call = (describe_call(op, x, *others) if backend == "auto" and x.device.type != "cpu"
                else None)
        name, _ = choose_backend(backend, x.device, op, _refusals_of_call(op, x, others), call,
                                 load=True)
    if name == "torch" and eval_form and _RECORDED_CALLS is None \
            and registry.eval_form_refusal(op, x, _needs_grad(x, *others)) is None:
        kind = (op, x.shape, x.stride(), x.dtype,
                tuple(None if t is None else t.shape for t in others), writes_input)
        return cpu_choice.EVAL_FORMS.choose(
            kind, (registry.implementation(op, "torch"),
                   registry.implementation(op, registry.EVAL_FORM)), writes_input)
    return registry.implementation(op, name)


def auto_runs_fused(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether ``"auto"`` would run a fused backend for a call of ``op`` whose main input is
    ``x`` (as :func:`choose_implementation` decides it, without running or recording it): how
    a layer that can run either one fused op or a composition of other ops decides under
    "auto" (``patnet.inference``'s blocks). Never on the CPU or the meta device."""
    if x.device.type != "cuda":
        return False
    refused = tuple(tuple(r) for r in _refusals_of_call(op, x, others))
    name, _, _ = _decide("auto", x.device.type, x.device.index, op, refused,
                         tuple(describe_call(op, x, *others)), False)
    return name != "torch"


def _refusals_of_call(op: str, x: torch.Tensor, others: tuple) -> Tuple[Refusal, ...]:
    """The registry's refusals of a call of ``op`` on ``x`` and ``others`` (an inference op's
    fused backends refuse a call through which a gradient may be taken)."""
    needs_grad = registry.OPS[op].inference and _needs_grad(x, *others)
    return registry.refusals(op, x, needs_grad)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a gradient may be taken through a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def describe_call(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> auto_rule.Call:
    """What the auto rule needs of a call of ``op`` whose main input is ``x``: dtype, mode
    ("fwd+bwd" when a gradient may be taken through it: grad mode on and ``x`` or one of
    ``others`` requires one), layout and shape class (:mod:`patnet_kernels.auto_rule`)."""
    grad = _needs_grad(x, *others)
    from .ops._layout import memory_format_of  # (the kernels' own layout rule)

    if registry.OPS[op].layout == "heads":
        layout = "any"
    else:
        layout = "channels_last" if memory_format_of(x) == torch.channels_last else "nchw"
    return auto_rule.Call(op, str(x.dtype).replace("torch.", ""), "fwd+bwd" if grad else "fwd",
                          layout, auto_rule.shape_key(op, tuple(int(s) for s in x.shape)))


def choose_backend(backend: str, device: Optional[torch.device] = None, op: Optional[str] = None,
                   refused: Tuple[Refusal, ...] = (),
                   call: Optional[auto_rule.Call] = None, load: bool = False) -> Tuple[str, str]:
    """The one backend decision: which concrete backend ("torch", "triton" or "cuda") runs
    ``op`` (or any op) on ``device``, and why.

    ``refused``: the fused backends that cannot take these inputs, with the reason
    (:func:`patnet_kernels.registry.refusals`). A backend named explicitly runs if it can, else
    its refusal's error (BackendUnavailableError where it cannot run here) says why and what
    to use instead. ``"auto"`` runs the reference on the CPU, and on a GPU a fused backend
    only where the committed measurements show it faster than the reference for this ``call``
    (dtype, mode, layout, shape class) on this kind of GPU (:mod:`patnet_kernels.auto_rule`);
    without a ``call`` (no shapes) the reference. Unknown names raise ValueError. With
    ``load``, the chosen backend's function for ``op`` is made ready
    (:func:`patnet_kernels.registry.load`). Under torch.compile the decision is made once at
    trace time (a constant of the graph).
    """
    check_backend_name(backend)
    if op is not None:
        check_op_name(op)
    if _RECORDED_CALLS is not None and op is not None and not torch.compiler.is_compiling():
        _RECORDED_CALLS.append((op, backend, refused, call))
        return "torch", "recorded (recording_calls): the reference runs"
    device = None if device is None else torch.device(device)
    plain_refusals = tuple(tuple(refusal) for refusal in refused)  # (strings: constants)
    name, reason, error = _decide(backend, None if device is None else device.type,
                                  None if device is None else device.index, op, plain_refusals,
                                  None if call is None else tuple(call), load)
    if error:
        kind, message = error.split(":", 1)
        raise registry.ERRORS[kind](message)
    if reason.startswith(NO_FUSED_BACKEND):
        _warn_reference_on_gpu(device, reason)
    return name, reason


# While recording_calls() is active: each op call decided, as (op, backend, refused, call).
_RECORDED_CALLS: Optional[List[tuple]] = None


@contextlib.contextmanager
def recording_calls():
    """Collect every op call decided inside the block, as a list of ``(op, backend asked for,
    refused, Call or None)``: how ``model.backend_calls`` learns a model's calls from a forward
    on the meta device. Inside the block every call runs the reference (on meta tensors: no
    memory, no kernel), whatever its backend."""
    global _RECORDED_CALLS
    saved, _RECORDED_CALLS = _RECORDED_CALLS, []
    try:
        yield _RECORDED_CALLS
    finally:
        _RECORDED_CALLS = saved


def resolve_backend(backend: str, device: Optional[torch.device] = None,
                    op: Optional[str] = None, refused: Tuple[Refusal, ...] = (),
                    call: Optional[auto_rule.Call] = None) -> str:
    """The concrete backend of :func:`choose_backend`, without the reason."""
    return choose_backend(backend, device, op, refused, call)[0]


@torch.compiler.assume_constant_result
def _decide(backend: str, device_type: Optional[str], device_index: Optional[int],
            op: Optional[str], refused: tuple, call: Optional[tuple],
            load: bool) -> Tuple[str, str, str]:
    """(backend, reason, "ErrorName:message" or ""), from plain values only: torch.compile runs
    this at trace time and keeps the result, so none of its probes (file system, imports,
    device queries, loading a backend) is traced. Decisions are cached
    (:func:`forget_decisions`): a call costs a dictionary look-up, not the probes; keyed also
    by the environment variables that change what can run (the Triton interpreter, the CUDA
    emulation)."""
    from ._cuda_ext import emulation_enabled

    environment = (triton_interpreter_enabled(), emulation_enabled())
    return _decide_cached(backend, device_type, device_index, op, refused, call, load,
                          environment)


def forget_decisions() -> None:
    """Drop the cached decisions (after something that changes what can run, e.g. in tests)."""
    _decide_cached.cache_clear()


@functools.lru_cache(maxsize=4096)
def _decide_cached(backend: str, device_type: Optional[str], device_index: Optional[int],
                   op: Optional[str], refused: tuple, call: Optional[tuple], load: bool,
                   environment: tuple) -> Tuple[str, str, str]:
    device = None if device_type is None else torch.device(device_type, device_index)
    refusals = {name: Refusal(name, kind, why) for name, kind, why in refused}
    for refusal in registry.refusals(op) if op is not None else ():  # (no kernel for op)
        refusals.setdefault(refusal.backend, refusal)
    if backend != "auto":
        ok, why = _STATUS[backend](device)
        if not ok:
            return "", "", f"BackendUnavailableError:backend={backend!r} is unavailable: {why}"
        if backend in refusals:
            error = registry.refusal_error(refusals[backend], tuple(refusals.values()))
            return "", "", f"{type(error).__name__}:{error}"
        name, reason = backend, f"asked for by name ({why})"
    elif device is None or device.type != "cuda":
        # (the Triton interpreter and the CUDA emulation are for testing, never the choice)
        name, reason = "torch", "auto on the CPU runs the reference"
    else:
        name, reason = _auto_on_gpu(device, refusals, call)
    if load and op is not None:
        registry.load(op, name)  # (a fused backend's ops: imported or built here, not traced)
    return name, reason, ""


def _auto_on_gpu(device: torch.device, refusals: dict, call: Optional[tuple]) -> Tuple[str, str]:
    usable = [name for name in auto_rule.FUSED
              if _STATUS[name](device)[0] and name not in refusals]
    if not usable:
        reasons = "; ".join(f"{name}: " + (f"backend={name!r} {refusals[name].reason}"
                                            if name in refusals else _STATUS[name](device)[1])
                            for name in auto_rule.FUSED)
        return "torch", f"{NO_FUSED_BACKEND} ({reasons})"
    if call is None:
        return "torch", ("auto decides per call from the input's shape, dtype and mode; "
                         "without them the reference")
    return auto_rule.choose(gpu_name(device), auto_rule.Call(*call[:4], tuple(call[4])), usable)


def backend_plan(backend: str, device: Optional[torch.device] = None,
                 ops=OPS) -> Dict[str, str]:
    """For each op of ``ops`` (names, default all), the concrete backend that ``backend`` runs
    it with on ``device`` when the choice does not depend on the call: a backend named
    explicitly, or ``"auto"`` on the CPU; for an op that the named backend has no kernel for,
    ``"none: "`` and the reason (a call of it there raises BackendUnavailableError).
    ``"auto"`` on a GPU decides per call (see :func:`choose_backend`); there the value reads
    ``"auto: per call (measured)"`` and ``model.backend_plan(device, input_shape)`` gives the
    choice for a model's calls. A backend that cannot run here at all raises
    BackendUnavailableError with the reason."""
    check_backend_name(backend)
    if isinstance(ops, str):
        raise TypeError(f"ops must be a sequence of op names, got the string {ops!r}; "
                        f"pass ({ops!r},)")
    for op in ops:
        check_op_name(op)
    plan = {}
    for op in ops:
        lacking = [r for r in registry.refusals(op) if r.backend == backend]
        if backend == "auto" and device is not None and torch.device(device).type == "cuda":
            plan[op] = AUTO_PER_CALL
        elif lacking:
            plan[op] = f"none: backend={backend!r} {lacking[0].reason}"
        else:
            plan[op] = resolve_backend(backend, device, op)
    return plan


def check_backend_usable(backend: str) -> None:
    """Raise unless ``backend`` is a known name that can run on some device of this machine
    (a CUDA device if there is one, else the CPU): what a model checks when it is built,
    before its tensors have a device. BackendUnavailableError gives the reasons."""
    check_backend_name(backend)
    if backend == "auto":
        return
    devices = ([torch.device("cuda")] if torch.cuda.is_available() else []) + [torch.device("cpu")]
    reasons = []
    for device in devices:
        ok, why = _STATUS[backend](device)
        if ok:
            return
        reasons.append(f"on {device.type}: {why}")
    raise BackendUnavailableError(f"backend={backend!r} is unavailable: {'; '.join(reasons)}")


def _installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` without importing it (None if absent)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_WARNED_DEVICES = set()


def _warn_reference_on_gpu(device, reason: str) -> None:
    """Say once per device that "auto" found no fused backend usable for a GPU tensor."""
    key = str(device)
    if key in _WARNED_DEVICES or torch.compiler.is_compiling():
        return
    _WARNED_DEVICES.add(key)
    warnings.warn(f"backend='auto' runs the pure-PyTorch reference on {key}: {reason}. "
                  "patnet_kernels.info() says more.", RuntimeWarning, stacklevel=4)


def info() -> Dict[str, object]:
    """What can run here: versions, devices, each backend (usable or why not) and auto's rule.

    Returns a dict: ``{"torch": version, "triton": version or None, "cuda_device": name or None,
    "backends": {name: {"available": bool, "reason": str}}, "auto": {device: the backend auto
    runs there, or AUTO_PER_CALL on a GPU}, "auto_rule": [one line per measured case on this
    GPU: op, dtype, mode, layout, shape class and the backend auto runs there],
    "cpu_convolutions": what the CPU eval forms' float32 convolutions run on, and why not
    oneDNN where they cannot (:func:`patnet_kernels.cpu_conv.library`), "cpu_choices":
    {"measuring": whether the CPU path times its choices (``PATNET_CPU_MEASURE``), "eval forms"
    and "convolutions": how many kinds of call kept each way so far
    (:mod:`patnet_kernels.cpu_choice`)}}``.
    """
    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    backends = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = _STATUS[name](devices[-1])
        backends[name] = {"available": ok, "reason": why}
    auto = {str(device): AUTO_PER_CALL if device.type == "cuda"
            else resolve_backend("auto", device) for device in devices}
    gpu = gpu_name(torch.device("cuda")) if cuda else None
    return {
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "cuda_device": gpu,
        "backends": backends,
        "auto": auto,
        "auto_rule": auto_rule.summary(gpu) if gpu else [],
        "cpu_convolutions": cpu_conv.library(),
        "cpu_choices": {"measuring": cpu_choice.measuring(),
                        "eval forms": cpu_choice.EVAL_FORMS.summary(),
                        "convolutions": cpu_choice.CONVOLUTIONS.summary()},
    }
