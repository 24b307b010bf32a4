"""When the CUDA extension is built, and with what: the one decision setup.py and info() share.

No torch import here: setup.py loads this file by path, before the package is installed.

The extension ``patnet_kernels._C`` (csrc/bindings.cpp + csrc/kernels/*.cu) is built by
``pip install`` when CUDA is really there to build with: a CUDA toolkit (CUDA_HOME, or nvcc on
PATH) and a PyTorch built with CUDA. ``FORCE_CUDA=1`` or a ``TORCH_CUDA_ARCH_LIST`` asks for the
build outright, and then a missing toolkit or a CPU-only torch is an error, not a silent skip.
``PATNET_SKIP_CUDA_BUILD=1`` skips it whatever else is set. Whether a GPU is visible plays no part
(a build machine often has none). ``MAX_JOBS`` caps the parallel compile jobs (ninja).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# The GPU architectures compiled when TORCH_CUDA_ARCH_LIST is not set: A100 and H100 (+ PTX for
# newer GPUs to JIT from).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# The extension's own compiler flags, added to torch.utils.cpp_extension's: nvcc's for the .cu
# files, the host compiler's for bindings.cpp. setup.py, the JIT build (_cuda_ext.py) and
# scripts/nvcc_check.py all take them from here.
CUDA_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
# bindings.cpp refuses bad input by throwing (TORCH_CHECK) from its failure paths, which GCC at
# -O2 and above moves into separate ".cold" parts of each function, with unwind entries of their
# own (zero-length ones for empty parts, which some linkers put in the lookup table where they
# hide a real entry: rui314/mold#1648). An exception the unwinder cannot follow terminates the
# process: the likely cause of the first GPU run's crashes on bad input (csrc/README.md, "Bad
# input"). One piece per function leaves nothing of the kind; this glue code is not hot.
CXX_FLAGS = ("-O3", "-fno-reorder-blocks-and-partition")


class CudaBuildError(RuntimeError):
    """The environment asked for the CUDA build, but it cannot be done here."""


@dataclass(frozen=True)
class BuildDecision:
    build: bool
    reason: str
    arch_list: Optional[str] = None  # TORCH_CUDA_ARCH_LIST to build with
    max_jobs: Optional[int] = None  # parallel compile jobs, None: ninja's default


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _max_jobs(env: Mapping[str, str]) -> Optional[int]:
    value = env.get("MAX_JOBS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CudaBuildError(f"MAX_JOBS must be a positive integer, got {value!r}")
    return int(value)


def decide_cuda_build(env: Mapping[str, str], torch_cuda_version: Optional[str],
                      cuda_home: Optional[str]) -> BuildDecision:
    """Whether to build the CUDA extension, and why.

    env: the environment (os.environ); torch_cuda_version: ``torch.version.cuda`` of the torch
    to build against (None for a CPU build, or no torch); cuda_home: the CUDA toolkit's root
    (torch.utils.cpp_extension.CUDA_HOME), None if none was found (one without CUDA's headers
    builds nothing: :func:`toolkit_problem`). Raises CudaBuildError when the environment forces
    a build that cannot happen.
    """
    if _flag(env, "PATNET_SKIP_CUDA_BUILD"):
        return BuildDecision(False, "PATNET_SKIP_CUDA_BUILD=1 is set")
    arch_list = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    forced_by = ("FORCE_CUDA=1" if _flag(env, "FORCE_CUDA")
                 else f"TORCH_CUDA_ARCH_LIST={arch_list}" if arch_list else None)
    max_jobs = _max_jobs(env)
    missing = None
    if torch_cuda_version is None:
        missing = ("the installed PyTorch is a CPU build (torch.version.cuda is None); install a "
                   "CUDA build of torch to build the CUDA kernels")
    elif cuda_home is None:
        missing = ("no CUDA toolkit was found (set CUDA_HOME to it, or put its nvcc on PATH)")
    else:
        missing = toolkit_problem(cuda_home)
    if missing:
        if forced_by:
            raise CudaBuildError(f"{forced_by} asks for the CUDA extension, but {missing}")
        return BuildDecision(False, missing)
    why = (f"{forced_by} is set" if forced_by
           else f"CUDA toolkit at {cuda_home} and PyTorch built with CUDA {torch_cuda_version}")
    return BuildDecision(True, why, arch_list or DEFAULT_ARCH_LIST, max_jobs)


def find_cuda_home(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The CUDA toolkit root as torch finds it: CUDA_HOME / CUDA_PATH, else nvcc on PATH."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return env[name]
    for directory in env.get("PATH", "").split(os.pathsep):
        nvcc = os.path.join(directory, "nvcc")
        if directory and os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def toolkit_problem(cuda_home: str) -> Optional[str]:
    """Why the CUDA toolkit root ``cuda_home`` cannot build the extension, or None. torch's
    builds compile with ``-isystem <root>/include``: without CUDA's headers there, every file
    fails on its first CUDA include. Seen with an nvcc on PATH that is a wrapper script in
    /usr/local/bin (the root taken as /usr/local)."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return None
    return (f"the CUDA toolkit root {cuda_home} has no include/cuda_runtime.h (torch takes the "
            f"root from CUDA_HOME, else as the folder above the folder of the nvcc on PATH, "
            f"which a wrapper script there misleads); set CUDA_HOME to the toolkit's root, the "
            f"folder holding bin/nvcc and include/cuda_runtime.h (often /usr/local/cuda)")
