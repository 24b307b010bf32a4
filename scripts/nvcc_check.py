"""Compile the CUDA backend's sources in their real (non-emulated) form on any machine, no GPU
needed: every kernel file of csrc/kernels with nvcc for sm_80 and sm_90, and csrc/bindings.cpp
with the host compiler against torch's headers.

    python scripts/nvcc_check.py [--arch 80 90] [--jobs N] [--only kernels|bindings]

The CI step that makes a syntax or type error in CUDA code fail on a machine without a GPU:

- kernels: each .cu is compiled with ``nvcc -c`` exactly as the extension builds it (plus -Werror
  for cross-execution-space calls), and ptxas's resource report gives one line per kernel and
  target: registers, spilled bytes, static shared memory. launchers.h is also compiled by the
  host C++ compiler alone, as bindings.cpp includes it in the CUDA build. A successful compile is
  remembered (~/.cache/patnet_kernels/nvcc_check, keyed by nvcc's version, the flags, the
  targets and the contents of csrc/kernels): a rerun with nothing of that changed reports it
  again ("as compiled before, unchanged") instead of spending a minute in nvcc.
- bindings: ``bindings.cpp`` as the CUDA build compiles it (``-fsyntax-only``: torch's include
  paths and defines, CUDA's runtime headers, PATNET_EMULATE *not* defined), which the test
  suite's CPU emulation build never does. A CPU wheel of torch ships ATen/cuda but not the CUDA
  library headers it includes (cuBLAS, cuSPARSE, cuSOLVER) nor c10's generated CUDA macros: the
  stand-ins of tests/data/cuda_stub_headers fill those gaps, searched last, so real headers win
  wherever they exist (a CUDA build of torch, a full toolkit).

Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
KERNELS = CSRC / "kernels"
STUB_HEADERS = REPO / "tests" / "data" / "cuda_stub_headers"

# patnet_kernels/_build.py (the build's flags and toolkit lookup) by path: importing the package
# would need torch, which only the bindings check does.
_BUILD = SimpleNamespace(**runpy.run_path(str(REPO / "patnet_kernels" / "_build.py")))
# nvcc's flags as the extension builds the kernels (patnet_kernels/_build.py), plus the checks'.
FLAGS = [*_BUILD.CUDA_FLAGS, "-Werror", "cross-execution-space-call", "-Xptxas", "-v"]
# The C++ standard torch.utils.cpp_extension compiles an extension's .cpp files with (torch's
# 2.14 headers require it).
CXX_STANDARD = "-std=c++20"

_FUNCTION = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def _cache_dir() -> Path:
    """Where successful kernel compiles are remembered (see :func:`compile_file`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "patnet_kernels" / "nvcc_check"


def _compile_key(nvcc_version: str, command: List[str], source: Path) -> str:
    """What decides a compile's outcome: nvcc's version, the command's flags and targets, the
    source and every file of csrc/kernels it may include."""
    digest = hashlib.sha256("\0".join([nvcc_version, *command]).encode())
    for path in [source, *sorted(p for p in KERNELS.iterdir() if p.is_file())]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def compile_file(nvcc: str, source: Path, archs, nvcc_version: str = "") -> tuple:
    """(source, ok, seconds, compiler output, [(kernel, arch, registers, spill, smem)]).

    With ``nvcc_version`` (``nvcc --version``'s output) a successful compile is remembered
    (:func:`_cache_dir`) and, while the toolkit, flags, targets, source and csrc/kernels' files
    are the same, its outcome is reported again without compiling (seconds: -1); a failure is
    never remembered."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cached = None
    if nvcc_version:
        key = _compile_key(nvcc_version, [nvcc, *FLAGS, *gencode], source)
        cached = _cache_dir() / f"{key}.json"
        try:
            text, rows = json.loads(cached.read_text())
            return source, True, -1.0, text, [tuple(r) for r in rows]
        except (OSError, ValueError):
            pass
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([nvcc, "-c", *FLAGS, *gencode, f"-I{KERNELS}", str(source), "-o",
                               os.path.join(out, source.stem + ".o")],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    rows, current, spill = [], None, 0
    for line in text.splitlines():
        found = _FUNCTION.search(line)
        if found:
            current, spill = found.groups(), 0
            continue
        found = _SPILL.search(line)
        if found and current:
            spill = int(found.group(1)) + int(found.group(2))
        found = _USAGE.search(line)
        if found and current:
            rows.append((current[0], current[1], int(found.group(1)), spill,
                         int(found.group(2) or 0)))
            current = None
    names = _demangle([r[0] for r in rows])
    rows = [(n,) + r[1:] for n, r in zip(names, rows)]
    if cached is not None and proc.returncode == 0:
        try:  # (written whole, then renamed: a parallel run never reads half a file)
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps([text, rows]))
            os.replace(partial, cached)
        except OSError:  # (nowhere to keep it: the next run compiles again)
            pass
    return source, proc.returncode == 0, seconds, text, rows


def find_nvcc() -> Optional[str]:
    """nvcc of the CUDA toolkit the extension builds with (patnet_kernels/_build.py
    find_cuda_home: CUDA_HOME / CUDA_PATH, else nvcc on PATH), None if there is none."""
    home = _BUILD.find_cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return nvcc if nvcc and os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def host_compiler() -> Optional[str]:
    return shutil.which("c++") or shutil.which("g++")


def cuda_include_dirs(nvcc: str) -> List[str]:
    """The CUDA include directories, as nvcc itself passes them to the host compiler (nvcc may be
    a wrapper script elsewhere than its toolkit); only those that exist."""
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    found = re.findall(r'-I"?([^"\s]+)"?', dry.stderr + dry.stdout)
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def host_check(nvcc: str) -> tuple:
    """(ok, output) of the host C++ compiler on launchers.h as bindings.cpp includes it in the
    CUDA build (CUDA headers, no nvcc): nothing there may need nvcc (no <<< >>>)."""
    compiler = host_compiler()
    if compiler is None:
        return False, "no host C++ compiler (c++ / g++) on PATH"
    includes = [f"-I{d}" for d in cuda_include_dirs(nvcc)]
    proc = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-x", "c++", *includes,
                           f"-I{KERNELS}", "-"],
                          input='#include "launchers.h"\n', capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def bindings_command(source: Path = CSRC / "bindings.cpp") -> Tuple[Optional[List[str]], str]:
    """(the host compiler's -fsyntax-only command for ``source`` in its real CUDA form, "") or
    (None, why it cannot be checked here): no host compiler, no CUDA toolkit, or no CUDA runtime
    headers. Imports torch (for its include paths and ABI)."""
    compiler = host_compiler()
    if compiler is None:
        return None, "no host C++ compiler (c++ / g++) on PATH"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, ("no CUDA toolkit (set CUDA_HOME, or put nvcc on PATH): its cuda_runtime.h "
                      "is needed")
    cuda_dirs = [d for d in cuda_include_dirs(nvcc)
                 if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))]
    if not cuda_dirs:
        return None, f"the CUDA toolkit of {nvcc} has no cuda_runtime_api.h"
    import torch
    from torch.utils import cpp_extension

    system = [*cpp_extension.include_paths(), *cuda_dirs, str(STUB_HEADERS)]
    return [compiler, CXX_STANDARD, "-fsyntax-only", "-x", "c++",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *_BUILD.CXX_FLAGS, f"-I{CSRC}",
            *(arg for d in system for arg in ("-isystem", d)), str(source)], ""


def bindings_check(source: Path = CSRC / "bindings.cpp") -> Tuple[Optional[bool], str]:
    """Compile ``source`` (bindings.cpp) as the CUDA build does, without a GPU or a CUDA build of
    torch: (True, output) if it compiles, (False, the compiler's output) if not, (None, why not)
    where it cannot be checked here."""
    command, why = bindings_command(source)
    if command is None:
        return None, why
    proc = subprocess.run(command, capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def check_kernels(archs, jobs: int) -> int:
    """launchers.h with the host compiler and every .cu with nvcc; prints a report, returns the
    number of failures."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found: put the CUDA toolkit's bin on PATH or set CUDA_HOME",
              file=sys.stderr)
        return 1
    sources = sorted(KERNELS.glob("*.cu"))
    if not sources:
        print(f"no .cu files under {KERNELS}", file=sys.stderr)
        return 1
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print(f"nvcc: {version.strip().splitlines()[-1]}; compiling {len(sources)} files for "
          f"{', '.join(f'sm_{a}' for a in archs)}", flush=True)
    failures = 0
    ok, text = host_check(nvcc)
    print(f"launchers.h with the host compiler (as bindings.cpp sees it): "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        failures += 1
        print(text[-4000:])
    with ThreadPoolExecutor(jobs) as pool:
        for source, ok, seconds, text, rows in pool.map(
                lambda s: compile_file(nvcc, s, archs, version), sources):
            took = "as compiled before, unchanged" if seconds < 0 else f"{seconds:.1f} s"
            print(f"{source.name}: {'ok' if ok else 'FAILED'} ({took})", flush=True)
            if not ok:
                failures += 1
                print(text[-8000:])
                continue
            for name, arch, registers, spill, smem in sorted(rows, key=lambda r: (r[1], r[0])):
                short = name if len(name) <= 90 else name[:87] + "..."
                print(f"  {arch} regs {registers:3d} spill {spill:5d} B static smem {smem:6d} B"
                      f"  {short}")
    print(f"{len(sources) + 1 - failures} compiled, {failures} failed")
    return failures


def check_bindings() -> int:
    """bindings.cpp in its real CUDA form with the host compiler; prints the outcome, returns the
    number of failures (a check that cannot run here is one)."""
    start = time.perf_counter()
    ok, text = bindings_check()
    seconds = time.perf_counter() - start
    if ok is None:
        print(f"bindings.cpp (CUDA form) with the host compiler: not checked: {text}")
        return 1
    print(f"bindings.cpp (CUDA form) with the host compiler: {'ok' if ok else 'FAILED'} "
          f"({seconds:.1f} s)", flush=True)
    if not ok:
        print(text[-8000:])
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=("kernels", "bindings"),
                        help="run one of the two checks (default: both)")
    args = parser.parse_args(argv)
    failures = 0
    if args.only in (None, "kernels"):
        failures += check_kernels(args.arch, args.jobs)
    if args.only in (None, "bindings"):
        failures += check_bindings()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
