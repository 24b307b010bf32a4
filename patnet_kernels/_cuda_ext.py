"""Loading the CUDA backend's ops (``torch.ops.patnet_cuda``, registered by csrc/bindings.cpp).

In order:

1. ``PATNET_CUDA_EMULATE=1``: a CPU build of the same kernels through the emulation of
   csrc/kernels/emulate.h, registered for CPU tensors (how the test suite runs the CUDA
   kernels on a machine without a GPU; slow, for testing only).
2. The extension ``patnet_kernels._C`` built by ``pip install`` (see patnet_kernels/_build.py).
3. A JIT build of csrc/ with ninja and nvcc on first use (``torch.utils.cpp_extension.load``),
   cached under ``PATNET_CUDA_BUILD_DIR`` (default ``~/.cache/patnet_kernels``) and keyed by a
   hash of the sources and flags. torch's build lock makes two processes that start at once
   build it once: the second waits and loads the first one's library. A build killed midway
   leaves the lock behind, which torch would wait on for ever: a load waits for a lock it did
   not take at most :data:`BUILD_LOCK_TIMEOUT_S`, with a warning naming it, then refuses.

A failed build raises :class:`CudaBuildFailed` with the compiler's output and how to build by
hand; nothing falls back to another backend.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from . import registry
from ._build import CUDA_FLAGS, CXX_FLAGS, find_cuda_home, toolkit_problem

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# csrc/kernels/<family>.cu of every op the CUDA backend has kernels for.
KERNEL_FAMILIES = registry.families("cuda")
EMULATION_FLAGS = ("-O2", "-DPATNET_EMULATE")

HOW_TO_BUILD = ("build it with `FORCE_CUDA=1 pip install --no-build-isolation -e .` on a machine "
                "with the CUDA toolkit (nvcc) and a CUDA build of PyTorch, or let it JIT-build on "
                "first use (needs nvcc and ninja: pip install ninja)")


class CudaBuildFailed(RuntimeError):
    """The CUDA extension could not be built or loaded."""


def emulation_enabled() -> bool:
    """Whether PATNET_CUDA_EMULATE is set: the CUDA backend then runs on CPU tensors (tests)."""
    return os.environ.get("PATNET_CUDA_EMULATE", "0") not in ("", "0")


def sources() -> List[Path]:
    """csrc/bindings.cpp and the kernel files, in build order."""
    return [CSRC / "bindings.cpp"] + [CSRC / "kernels" / f"{f}.cu" for f in KERNEL_FAMILIES]


def _source_hash(flags: Sequence[str]) -> str:
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def build_dir(name: str) -> Path:
    root = Path(os.environ.get("PATNET_CUDA_BUILD_DIR",
                               Path.home() / ".cache" / "patnet_kernels"))
    return root / name


# How long a load waits for another process's build lock (a build takes one or two minutes).
BUILD_LOCK_TIMEOUT_S = 900.0


def wait_for_build_lock(directory: Path, timeout: float = BUILD_LOCK_TIMEOUT_S) -> None:
    """Return once ``directory`` holds no build lock (torch's ``lock`` file), warning once if
    it waits; raise :class:`CudaBuildFailed` naming the lock after ``timeout`` seconds."""
    lock = directory / "lock"
    start = time.monotonic()
    warned = False
    while lock.exists():
        if time.monotonic() - start >= timeout:
            raise CudaBuildFailed(
                f"the build lock {lock} is still held after {timeout:.0f} s: another process is "
                "building there, or a build killed midway left the lock behind; if no build "
                "is running, delete it and retry")
        if not warned:
            warnings.warn(f"waiting for another process's build in {directory} (lock {lock}; a "
                          "build killed midway leaves it: delete it if no build is running)",
                          stacklevel=3)
            warned = True
        time.sleep(0.2)


def jit_load(name: str, source_files: Sequence[Path], *, cuda: bool, extra_cflags=(),
             extra_cuda_cflags=(), verbose: bool = False) -> str:
    """Build (or reuse) and load a library of torch ops from ``source_files``; returns its
    build directory. Safe when several processes call it at once (torch's build lock)."""
    from torch.utils import cpp_extension

    if not ninja_available():
        raise CudaBuildFailed("building the CUDA extension needs ninja (pip install ninja); "
                              + HOW_TO_BUILD)
    directory = build_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    wait_for_build_lock(directory)
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in source_files],
                           extra_cflags=list(extra_cflags),
                           extra_cuda_cflags=list(extra_cuda_cflags),
                           extra_include_paths=[str(CSRC)], build_directory=str(directory),
                           with_cuda=cuda, is_python_module=False, verbose=verbose)
    except Exception as exc:  # the compiler's output is in the message
        raise CudaBuildFailed(f"building {name} in {directory} failed: {exc}\n{HOW_TO_BUILD}"
                              ) from exc
    return str(directory)


def _emulation_sources(directory: Path) -> List[Path]:
    """bindings.cpp and, for each .cu, a .cpp that includes it (so g++ compiles it as C++)."""
    directory.mkdir(parents=True, exist_ok=True)
    wrappers = [CSRC / "bindings.cpp"]
    for family in KERNEL_FAMILIES:
        wrapper = directory / f"emulated_{family}.cpp"
        text = f'#include "{CSRC / "kernels" / (family + ".cu")}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(wrapper)
    return wrappers


_LOCK = threading.Lock()
_LOADED: Optional[str] = None  # how the ops were loaded, once they are


def _load_prebuilt() -> Optional[str]:
    spec = importlib.util.find_spec("patnet_kernels._C")
    if spec is None or spec.origin is None:
        return None
    torch.ops.load_library(spec.origin)
    return f"prebuilt extension {spec.origin}"


def load() -> str:
    """Make ``torch.ops.patnet_cuda`` usable (building it if need be); returns how it was
    loaded. Raises CudaBuildFailed, saying how to build, if it cannot be."""
    global _LOADED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        if emulation_enabled():
            name = f"patnet_cuda_emulated_{_source_hash(EMULATION_FLAGS)}"
            directory = build_dir(name)
            jit_load(name, _emulation_sources(directory), cuda=False,
                     extra_cflags=EMULATION_FLAGS)
            _LOADED = f"CPU emulation built in {directory}"
        else:
            how = _load_prebuilt()
            if how is None:
                ok, why = jit_possible()
                if not ok:
                    raise CudaBuildFailed(f"the CUDA extension is not built and cannot be "
                                          f"JIT-built here: {why}; {HOW_TO_BUILD}")
                name = f"patnet_cuda_{_source_hash(CUDA_FLAGS + CXX_FLAGS)}"
                how = "JIT-built in " + jit_load(name, sources(), cuda=True,
                                                 extra_cflags=CXX_FLAGS,
                                                 extra_cuda_cflags=CUDA_FLAGS)
            _LOADED = how
        return _LOADED


def loaded() -> Optional[str]:
    """How the ops were loaded, or None if they have not been yet."""
    return _LOADED


# The probes below read the file system. Under torch.compile they run once at trace time and
# their result is a constant of the graph (dynamo cannot trace os.stat), so backend resolution
# inside a compiled model costs no graph break.
@torch.compiler.assume_constant_result
def ninja_available() -> bool:
    return shutil.which("ninja") is not None


@torch.compiler.assume_constant_result
def jit_possible() -> Tuple[bool, str]:
    """Whether a JIT build of csrc/ can be attempted here (it may still fail to compile)."""
    if torch.version.cuda is None:
        return False, "this PyTorch is a CPU build"
    if not (CSRC / "bindings.cpp").is_file():
        return False, f"the CUDA sources are not at {CSRC} (not a source install)"
    home = find_cuda_home()
    problem = ("no CUDA toolkit (set CUDA_HOME, or put nvcc on PATH)" if home is None
               else toolkit_problem(home))
    if problem:
        return False, problem
    if not ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    return True, f"JIT build of {CSRC} with nvcc on first use"


@torch.compiler.assume_constant_result
def prebuilt_available() -> bool:
    return importlib.util.find_spec("patnet_kernels._C") is not None
