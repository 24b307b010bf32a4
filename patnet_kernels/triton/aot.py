"""Ahead-of-time compile of every shipped Triton kernel configuration for real GPU targets.

    python -m patnet_kernels.triton.aot [--arch 90 80] [--jobs N]

Compiles each kernel of each family's ``aot_kernels()`` down to machine code for sm_90 and sm_80
(no GPU needed) and checks its shared memory fits the target; prints one line per kernel and
exits non-zero on any failure. It must run *without* TRITON_INTERPRET (the interpreter compiles
nothing). This catches what the interpreter cannot: type errors of the real compiler, layouts
that do not lower, shared-memory overflow.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Tuple

# Kernel family modules of this package that ship kernels (each has aot_kernels()).
FAMILIES = (
    "partial_conv",
    "channel_attention",
    "rpe_attention",
    "spatial_attention",
)

# Shared memory a block may use (bytes): H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}


def _kernels(family: str):
    return importlib.import_module(f"{__package__}.{family}").aot_kernels()


def _compile(job: Tuple[str, int, int]) -> Tuple[str, int, str, int, float]:
    """Compile kernel ``index`` of ``family`` for sm_``arch``: (name, arch, error, shared, s)."""
    family, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels(family)[index]
    start = time.perf_counter()
    try:
        source = ASTSource(fn=kernel.fn, signature=kernel.signature, constexprs=kernel.constexprs)
        options = dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages, **kernel.options)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        shared, error = int(compiled.metadata.shared), ""
        if shared > SHARED_LIMIT[arch]:
            error = f"needs {shared} B of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}"
    except Exception as exc:  # reported per kernel, then the run fails
        shared, error = -1, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return kernel.name, arch, error, shared, time.perf_counter() - start


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip())
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    jobs = [(family, i, arch) for family in args.families
            for i in range(len(_kernels(family))) for arch in args.arch]
    print(f"compiling {len(jobs)} kernel configurations for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} with {args.jobs} processes", flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for done, (name, arch, error, shared, seconds) in enumerate(pool.map(_compile, jobs), 1):
            status = f"FAILED: {error}" if error else f"ok, shared {shared:6d} B"
            print(f"[{done:3d}/{len(jobs)}] sm_{arch} {name:60s} {status} ({seconds:.1f} s)",
                  flush=True)
            failures += bool(error)
    print(f"{len(jobs) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
