"""Which backends can run here, and the choice behind ``backend="auto"``.

Backends: ``"torch"`` (the pure-PyTorch reference, always usable), ``"triton"`` (fused Triton
kernels) and ``"cuda"`` (the CUDA C++ kernels of csrc/, see :mod:`patnet_kernels._cuda_ext`). A backend asked for by
name that cannot run raises :class:`BackendUnavailableError` saying why; nothing falls back
silently. ``"auto"`` takes the fastest backend usable for the tensors' device, and
:func:`info` reports every backend with the reason it was refused.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Preference of "auto", fastest first.
_AUTO_ORDER = ("cuda", "triton", "torch")
# Every op of the functional API.
OPS = ("partial_conv3x3", "channel_attention", "spatial_attention", "rpe_attention",
       "self_mixer_output")
# The ops the CUDA backend has kernels for (PAT_sp's spatial_attention is Triton only).
CUDA_OPS = ("partial_conv3x3", "channel_attention", "rpe_attention", "self_mixer_output")
# The most tokens the CUDA attention kernel takes (kMaxTokens of csrc/kernels/launchers.h).
CUDA_MAX_TOKENS = 1024


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine or these tensors."""


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


def _torch_status(device: Optional[torch.device]) -> Tuple[bool, str]:
    return True, "pure-PyTorch reference: runs wherever PyTorch runs"


_STATUS = {"torch": _torch_status, "triton": _triton_status, "cuda": _cuda_status}


def check_backend_name(backend: str) -> None:
    """Raise a ValueError listing the valid names unless ``backend`` is one of them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: Optional[torch.device] = None,
                    op: Optional[str] = None, cuda_refusal: Optional[str] = None) -> str:
    """The concrete backend ("torch", "triton" or "cuda") that runs ``op`` (or any op) on
    ``device``.

    "auto" skips the CUDA backend for an op it has no kernel for (see CUDA_OPS) and when
    ``cuda_refusal`` says why its kernel cannot take these inputs. Raises ValueError for an
    unknown name and BackendUnavailableError, with the reason, when a backend named explicitly
    cannot run here.
    """
    check_backend_name(backend)
    if backend == "cuda" and cuda_refusal:
        raise BackendUnavailableError(f"backend='cuda' cannot run {op} on these inputs: "
                                      f"{cuda_refusal}; use backend='triton' or 'auto'")
    if backend == "auto":
        if device is None or torch.device(device).type != "cuda":
            return "torch"  # (the Triton interpreter is for testing, never the fast choice)
        for name in _AUTO_ORDER:
            if name == "cuda" and (cuda_refusal or op is not None and op not in CUDA_OPS):
                continue
            if _STATUS[name](device)[0]:
                if name == "torch":
                    _warn_reference_on_gpu(device)
                return name
        raise AssertionError("the torch backend is always available")
    ok, why = _STATUS[backend](device)
    if not ok:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {why}")
    return backend


def backend_plan(backend: str, device: Optional[torch.device] = None,
                 ops=OPS) -> Dict[str, str]:
    """For each op of ``ops``, the concrete backend that ``backend`` runs it with on ``device``
    (``"auto"``: the fastest usable one for that op, see :func:`resolve_backend`)."""
    return {op: resolve_backend(backend, device, op) for op in ops}


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


def _warn_reference_on_gpu(device) -> None:
    """Say once per device that "auto" found no fused backend for a GPU tensor."""
    key = str(device)
    if key in _WARNED_DEVICES:
        return
    _WARNED_DEVICES.add(key)
    reasons = "; ".join(f"{name}: {_STATUS[name](device)[1]}" for name in ("cuda", "triton"))
    warnings.warn(f"backend='auto' runs the pure-PyTorch reference on {key}, because no fused "
                  f"backend is usable ({reasons}). patnet_kernels.info() says more.",
                  RuntimeWarning, stacklevel=3)


def info() -> Dict[str, object]:
    """What can run here: versions, devices, and for each backend whether it is usable and why.

    Returns a dict: ``{"torch": version, "triton": version or None, "cuda_device": name or None,
    "backends": {name: {"available": bool, "reason": str}}, "auto": {device: backend}}``.
    """
    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    backends = {}
    for name in _AUTO_ORDER[::-1]:
        ok, why = _STATUS[name](devices[-1])
        backends[name] = {"available": ok, "reason": why}
    return {
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "backends": backends,
        "auto": {str(d): resolve_backend("auto", d) for d in devices},
    }
