"""Compile every CUDA kernel file of csrc/kernels with nvcc for sm_80 and sm_90 (no GPU needed).

    python scripts/nvcc_check.py [--arch 80 90] [--jobs N]

The CI step that makes a syntax or type error in CUDA code fail on a machine without a GPU: each
.cu is compiled with ``nvcc -c`` exactly as the extension builds it (plus -Werror for
cross-execution-space calls), and ptxas's resource report gives one line per kernel and
target: registers, spilled bytes, static shared memory. launchers.h is also compiled by the
host C++ compiler alone, as bindings.cpp includes it in the CUDA build. Exits non-zero if any
check fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "csrc" / "kernels"
# As the extension builds them (patnet_kernels/_cuda_ext.py CUDA_FLAGS, setup.py).
FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
         "-Werror", "cross-execution-space-call", "-Xptxas", "-v"]

_FUNCTION = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def compile_file(nvcc: str, source: Path, archs) -> tuple:
    """(source, ok, seconds, compiler output, [(kernel, arch, registers, spill, smem)])."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
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
    return source, proc.returncode == 0, seconds, text, rows


def host_check(nvcc: str) -> tuple:
    """(ok, output) of the host C++ compiler on launchers.h as bindings.cpp includes it in the
    CUDA build (CUDA headers, no nvcc): nothing there may need nvcc (no <<< >>>)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False, "no host C++ compiler (c++ / g++) on PATH"
    # The CUDA include directories, as nvcc itself passes them (nvcc may be a wrapper script).
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    includes = dict.fromkeys(f"-I{d}" for d in re.findall(r'-I"?([^"\s]+)"?', dry.stderr + dry.stdout))
    proc = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-x", "c++", *includes,
                           f"-I{KERNELS}", "-"],
                          input='#include "launchers.h"\n', capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if not nvcc or not os.path.exists(nvcc):
        print("nvcc not found: put the CUDA toolkit's bin on PATH or set CUDA_HOME",
              file=sys.stderr)
        return 2
    sources = sorted(KERNELS.glob("*.cu"))
    if not sources:
        print(f"no .cu files under {KERNELS}", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print(f"nvcc: {version.strip().splitlines()[-1]}; compiling {len(sources)} files for "
          f"{', '.join(f'sm_{a}' for a in args.arch)}", flush=True)
    failures = 0
    ok, text = host_check(nvcc)
    print(f"launchers.h with the host compiler (as bindings.cpp sees it): "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        failures += 1
        print(text[-4000:])
    with ThreadPoolExecutor(args.jobs) as pool:
        for source, ok, seconds, text, rows in pool.map(
                lambda s: compile_file(nvcc, s, args.arch), sources):
            print(f"{source.name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)", flush=True)
            if not ok:
                failures += 1
                print(text[-8000:])
                continue
            for name, arch, registers, spill, smem in sorted(rows, key=lambda r: (r[1], r[0])):
                short = name if len(name) <= 90 else name[:87] + "..."
                print(f"  {arch} regs {registers:3d} spill {spill:5d} B static smem {smem:6d} B"
                      f"  {short}")
    print(f"{len(sources) + 1 - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
