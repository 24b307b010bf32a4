"""Ahead-of-time compile of every shipped Triton kernel configuration for real GPU targets.

    python -m patnet_kernels.triton.aot [--arch 90 80] [--jobs N] [--no-generic] [--gpu-triton]
                                        [--fresh] [--record]

Compiles each kernel of each family's ``aot_kernels()`` down to machine code for sm_90 and sm_80
(no GPU needed) and checks its shared memory fits the target; prints one line per kernel and
target and exits non-zero on any failure. It must run *without* TRITON_INTERPRET (the
interpreter compiles nothing). This catches what the interpreter cannot: type errors of the real
compiler, layouts that do not lower, shared-memory overflow.

Each kernel is compiled the way a real launch specialises it (:func:`specialise`), once per kind
of launch it declares (``AotKernel.launches``: NCHW / channels_last, contiguous q, k, v, ...):
integer arguments equal to 1 (the innermost strides, some flags) become constexprs, and pointers
and the other integers get ``tt.divisibility = 16``. That is what lets the compiler vectorise the
loads and pipeline them through shared memory, so it is mostly where shared memory peaks:
compiled from the plain signature only, rpe_attention's fp16 forward at D = 256 reports 81,920 B
on sm_90 where its launches need 184,320 B. The plain signature (a launch with no unit stride and
unaligned pointers) is compiled as well, as "generic": in a few kernels it needs more (fp32
rpe_attention dK/dV and dQ at D = 128 / 256, by 4-8 KiB). A kernel passes when every variant
compiles and fits; the line shows each variant's shared memory.

Each compiled variant's machine code is read as well (:func:`machine_code`: the cubin through
the cuobjdump of Triton's wheel): registers, stack bytes and LDL/STL spill instructions,
tensor-core instructions, 16-byte and 1-2-byte global loads, printed under the kernel's line.
A launch kind fails when a tl.dot on fp16/bf16 operands has no tensor-core instruction (it fell
back to FMA) or when it spills more than :data:`KNOWN_SPILLS` allows (nothing, for a kernel not
listed).

With ``--gpu-triton`` the check runs a second time for the lent GPU machines' target (sm_90:
H100 / H200) under their Triton (:data:`GPU_MACHINE_TRITON`, put first on the path from a
folder it is installed into on first use, :func:`triton_overlay`): the GPU compiles with that
front end and its ptxas, and they lay out some kernels differently from newer Tritons (3.6
spilled where 3.9 did not), so what the check reads there is what the measured GPU runs. CI
runs both.

With ``--no-generic`` this is 1460 compiles (more with the generic variants), and 730 more
under the GPU machines' Triton; with an empty Triton cache they take tens of minutes on 2 cores
(the PConv, PAT_ch and MLP families' 492 took 419 s on the shared development machine; at
commit d8d869f, with 1140 and 570, a fresh machine's test run took 33 minutes where a warm one
took 15). So what each compile showed is committed
(``aot_record/triton-<version>.json``: Triton's compile key -> shared memory and machine-code
reading, :func:`compile_key`) and a variant whose key is listed is judged from its entry
(against today's :data:`KNOWN_SPILLS` and shared-memory limits) without compiling: a fresh clone
checks every kernel in seconds. A kernel whose source, specialisation or options changed has
another key and is compiled; ``--record`` writes the run's readings into the record (commit
it), and the test of this check fails while a variant is missing from it. ``--fresh`` compiles
every variant regardless. Triton also caches each compile (~/.triton/cache), and this module
each cubin's machine-code reading beside it (:func:`machine_code_cache`), so a rerun compiles
only what changed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .. import registry

# Kernel family modules of this package that ship kernels (each has aot_kernels()).
FAMILIES = registry.families("triton")

# The Triton and torch (its CUDA 13.0 build) of the lent GPU machines' image (env.txt of
# benchmarks/results/h200-2026-12-04/ and the device tool's KINDS.md): what the measured kernels
# are compiled with there; ``--gpu-triton`` checks under that Triton too, and
# scripts/gpu_stack_check.sh builds the CUDA extension against that torch.
GPU_MACHINE_TRITON = "3.6.0"
GPU_MACHINE_TORCH = "2.11.0"
GPU_MACHINE_ARCH = 90  # (H100 and H200)

# Shared memory a block may use (bytes): H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}

# Kernels known to spill (AOT name -> the most stack bytes per thread allowed: the worst launch
# kind when pinned, --no-generic, on sm_90 or sm_80 under Triton 3.9 (CI's) or on sm_90 under
# 3.6 (the GPU machines', GPU_MACHINE_TRITON; "3.6" below marks where it spills more): what
# the machine-code check tolerates until they are fixed (issue 13: the fp32 conv, MLP and
# weight-gradient GEMMs, the attention's dK/dV kernel at D = 256). A kernel not listed must not
# spill; one listed must not spill more. Lower an entry (or drop it) when a change cuts it.
KNOWN_SPILLS: Dict[str, int] = {
    # fp32 conv kernels in 8 warps (and the weight gradient in 64-pixel steps): a few bytes
    # left where they kept 264 B to 1.8 KB in 4 warps (sm_80); 3.6: the 32-channel ones too,
    # holding 80 registers where 3.9 takes 96-108
    "conv3x3_passthrough[fp32, CI=16, CO=16, copy=False]": 16,
    "conv3x3_passthrough[fp32, CI=32, CO=32, copy=False]": 16,  # 3.6 (3.9: none)
    "conv3x3_weight_grad[fp32, CI=32, CO=32]": 8,
    "conv3x3_affine[fp32, CI=32, CO=32, aux=False]": 24,  # 3.6 (3.9: none)
    "conv3x3_affine[fp32, CI=32, CO=32, aux=True]": 24,  # 3.6 (3.9: none)
    "conv3x3_affine[fp32, CI=32, CO=64, aux=False]": 56,
    "conv3x3_affine[fp32, CI=32, CO=64, aux=True]": 56,
    "sa_pointwise_gemm[fp32, epi_x=False]": 32,
    "sa_pointwise_weight_grad[fp32]": 24,  # (was 5.4 KB in 64-pixel steps and 4 warps)
    # 3.6 (3.9: none): PAT_sp's fp32 apply with its conv, channels_last
    "sa_apply[fp32, compute_z=False, bn_d=True, bias=False, residual=False, stats=False]": 8,
    "sa_apply[fp32, compute_z=True, bn_d=True, bias=False, residual=False, stats=False]": 8,
    # PATNet-T1's stage-3 block with PAT_sp in fp32 (two 128-channel accumulators and a conv
    # head of 48 channels; 16 pixels, 16-channel hidden chunks or 32-channel PAT_sp output
    # steps all kept 80-160 B; 176 on sm_90 in channels_last since commit 46e9446, 168
    # before); 3.6: its 256-channel form without a conv head too (3.9: none)
    "pointwise_mlp[fp32, P=16, K=16, N=128, conv<=64, gelu, residual=True, affine=True, "
    "stats, PAT_sp]": 176,
    "pointwise_mlp[fp32, P=16, K=16, N=256, gelu, residual=True, affine=False, PAT_sp]": 104,
    # The attention's kernels, one configuration per mode (dropout; for dK/dV one key block and
    # the atomic backward: rpe_attention._modes), their tiles picked from a sweep of the machine
    # code (rpe_attention._CONFIGS). fp16 / bf16 spill only in the dK/dV kernel at D = 256
    # (K, V and the dK, dV accumulators of 64 keys x 256 in one program; every tile and warp
    # count swept spills there), its atomic form most on sm_80; fp32 (no speed target: its
    # dots are FMAs) keeps at most 200 B. Before (one configuration whose dropout, key-block
    # and atomic forms were runtime branches): up to 6.7 KB (fp32 dK/dV at D = 128, general N),
    # 432 B (fp16 / bf16 dQ at D = 256 with dropout) and 280 B (fp16 dK/dV at D = 64, 3.6).
    "rpe_kv[fp16, D=256, 16x64, atomic, dropout]": 136,  # sm_80
    "rpe_kv[fp16, D=256, 16x64, atomic]": 120,  # sm_80
    "rpe_kv[fp16, D=256, 16x64, dropout]": 24,
    "rpe_kv[fp16, D=256, 16x64, one key block, atomic, dropout]": 40,
    "rpe_kv[fp16, D=256, 16x64, one key block, atomic]": 24,
    "rpe_kv[fp16, D=256, 16x64, one key block, dropout]": 40,
    "rpe_kv[fp16, D=256, 16x64, one key block]": 32,
    "rpe_kv[bf16, D=256, 16x64, atomic, dropout]": 136,  # sm_80
    "rpe_kv[bf16, D=256, 16x64, atomic]": 120,  # sm_80
    "rpe_kv[bf16, D=256, 16x64, dropout]": 24,
    "rpe_kv[bf16, D=256, 16x64, one key block, atomic, dropout]": 40,
    "rpe_kv[bf16, D=256, 16x64, one key block, atomic]": 24,
    "rpe_kv[bf16, D=256, 16x64, one key block, dropout]": 40,
    "rpe_kv[bf16, D=256, 16x64, one key block]": 32,
    "rpe_fwd[fp32, D=64, 64x32]": 16,  # 3.6
    "rpe_kv[fp32, D=64, 16x64, atomic, dropout]": 56,
    "rpe_kv[fp32, D=64, 16x64, one key block, atomic, dropout]": 40,
    "rpe_kv[fp32, D=64, 16x64, one key block, atomic]": 56,  # 3.6
    "rpe_kv[fp32, D=64, 16x64, one key block, dropout]": 48,
    "rpe_kv[fp32, D=64, 16x64, one key block]": 16,
    "rpe_kv[fp32, D=128, 16x64, atomic, dropout]": 48,
    "rpe_kv[fp32, D=128, 16x64, dropout]": 32,
    "rpe_kv[fp32, D=128, 16x64, one key block, atomic, dropout]": 64,  # 3.6
    "rpe_kv[fp32, D=128, 16x64, one key block, atomic]": 48,  # 3.6
    "rpe_kv[fp32, D=128, 16x64, one key block, dropout]": 64,  # 3.6
    "rpe_kv[fp32, D=128, 16x64, one key block]": 64,  # 3.6
    "rpe_kv[fp32, D=128, 16x64]": 8,  # 3.6
    "rpe_kv[fp32, D=256, 16x32, atomic, dropout]": 200,  # sm_80
    "rpe_kv[fp32, D=256, 16x32, atomic]": 192,  # sm_80
    "rpe_kv[fp32, D=256, 16x32, dropout]": 8,  # 3.6
    "rpe_kv[fp32, D=256, 16x32, one key block, atomic, dropout]": 176,  # sm_80
    "rpe_kv[fp32, D=256, 16x32, one key block, atomic]": 160,  # sm_80
    "rpe_kv[fp32, D=256, 16x32, one key block, dropout]": 176,  # sm_80
    "rpe_kv[fp32, D=256, 16x32, one key block]": 144,  # sm_80
    "rpe_q[fp32, D=128, 16x32, dropout]": 16,  # 3.6
    "rpe_q[fp32, D=128, 16x32]": 16,  # 3.6
    "rpe_q[fp32, D=256, 16x16, dropout]": 192,
    "rpe_q[fp32, D=256, 16x16]": 192,
    # fp32 MLP kernels: a few LDL/STL where the gate's affine and the statistics meet a small N
    # (a conv head of 64 channels or more: 16 pixels per program, one stage, no spill); 3.6:
    # the stage-4 pass with a conv head of up to 256 channels in NCHW
    "pointwise_mlp[fp32, P=32, K=16, N=64, conv<=16, gelu, residual=True, affine=True, stats]": 16,
    "pointwise_mlp[fp32, P=32, K=16, N=64, conv<=16, relu, residual=True, affine=True, stats]": 16,
    "pointwise_mlp[fp32, P=32, K=16, N=64, conv<=16, gelu, residual=False, affine=True, stats]":
        16,
    "pointwise_mlp_pass[fp32, P=16, K=16, N=64, conv<=256, relu, residual=False, "
    "affine=False]": 24,
    "pointwise_mlp_pass[fp32, P=16, K=16, N=64, conv<=256, relu, residual=False, "
    "affine=True]": 24,
    # A sample found by a division of the program id (_common.program_of_sample: the batch on
    # grid axis 0, so that a launch takes more than 65535 images) instead of read off axis 1: a
    # register more, 2-16 LDL/STL once a program in these (3.9, channels_last: sm_90's fp32
    # channel statistics and fp16 PAT_sp gate-gradient reduction, sm_80's bf16 channel
    # gradient sums and fp32-input stem with statistics; 3.6: an fp32 NCHW conv in 16 LDL/STL)
    "channel_stats[fp32, chunked=False]": 8,
    "channel_stats[fp32, chunked=True]": 8,
    "channel_grad_sums[bf16]": 8,
    "sa_gate_grad_reduce[fp16]": 16,
    "patch_conv[fp32 -> fp16, P=64, K=64, N=64, stats, stem]": 8,
    "patch_conv[fp32 -> bf16, P=64, K=64, N=64, stats, stem]": 8,
    "conv3x3_passthrough[fp32, CI=32, CO=64, copy=False]": 16,  # 3.6 (3.9: none)
    # (3 LDL/STL on sm_80 in channels_last; fp32 is no speed target, its dots are FMAs; with
    # the dropout multiplier, in NCHW, since its tiles may take the samples as rows of one)
    "self_mixer_output[fp32, keep=False, residual=False]": 8,
    "self_mixer_output[fp32, keep=False, residual=True]": 8,
    "self_mixer_output[fp32, keep=True, residual=False]": 8,
    "self_mixer_output[fp32, keep=True, residual=True]": 8,  # (training's, first compiled
                                                              # here 2026-12-07: sm_80 NCHW)
    # PAT_ch's gate in training with the BatchNorms' vectors in fp16 / bf16: a model cast to
    # that dtype and trained without autocast (no speed target), sm_90; first compiled
    # 2026-12-07
    "channel_gate[fp16, vectors fp16, bn_a=True, training=True]": 16,
    "channel_gate[bf16, vectors bf16, bn_a=True, training=True]": 8,
}

# The variant compiled from the plain signature (no launch specialisation).
GENERIC = "generic"

_DIVISIBLE = [["tt.divisibility", 16]]


def _kernels(family: str):
    return importlib.import_module(f"{__package__}.{family}").aot_kernels()


def specialise(kernel, ones: Optional[Sequence[str]]) -> Tuple[Dict[str, str], Dict, Dict]:
    """(signature, constexprs, attrs) for ``ASTSource`` as a launch of ``kernel`` gives them
    when the integer arguments ``ones`` are 1 and every pointer is 16-byte aligned and every
    other integer a multiple of 16; ``ones=None``: the plain signature, no attributes.

    This is what ``JITFunction.run`` does per launch (triton/runtime/jit.py: the binder's
    ``specialize_impl`` and ``_pack_args``): an integer equal to 1 becomes ("constexpr", 1), a
    pointer with data_ptr % 16 == 0 or an integer with value % 16 == 0 is tagged "D", which
    ``backend.parse_attr`` turns into ``[["tt.divisibility", 16]]`` in ``attrs[(index,)]``.
    Marking every other integer divisible is the most specialised launch (the upper end of
    what the compiler can vectorise and pipeline); real shapes lie between it and the plain
    signature.
    """
    signature, constexprs = dict(kernel.signature), dict(kernel.constexprs)
    if ones is None:
        return signature, constexprs, {}
    unknown = [n for n in ones if not signature.get(n, "").startswith(("i", "u"))]
    if unknown:
        raise ValueError(f"{kernel.name}: {unknown} are not integer arguments of the kernel")
    attrs = {}
    for index, name in enumerate(kernel.fn.arg_names):
        kind = signature[name]
        if name in ones:
            signature[name], constexprs[name] = "constexpr", 1
        elif kind.startswith("*") or kind.startswith(("i", "u")) and kind != "i1":
            attrs[(index,)] = _DIVISIBLE
    return signature, constexprs, attrs


def variants(kernel, generic: bool = True) -> List[Tuple[str, Optional[Tuple[str, ...]]]]:
    """(name, ones) of each way ``kernel`` is compiled: with ``generic`` the plain signature,
    then each kind of launch it declares (or one with every pointer and integer aligned if it
    declares none)."""
    launches = list(kernel.launches.items()) or [("aligned", ())]
    return ([(GENERIC, None)] if generic else []) + [(n, tuple(o)) for n, o in launches]


class MachineCode(NamedTuple):
    """What the cubin of one compiled variant shows (``cuobjdump -res-usage -sass``)."""
    registers: int  # per thread
    stack: int  # bytes of local memory per thread (register spills, local arrays)
    spills: int  # LDL + STL instructions: loads and stores of spilled values
    mma: int  # tensor-core instructions (HGMMA on sm_90, HMMA)
    half_dot: bool  # the kernel has a tl.dot on fp16 / bf16 operands (it must run as mma)
    wide_loads: int  # LDG.E.128: 16-byte global loads
    narrow_loads: int  # LDG.E.U16 / .U8 / .S16: global loads of one 1- or 2-byte element


_SASS = re.compile(r"\b(LDL|STL|HGMMA|HMMA|LDG\.E\.128|LDG\.E\.(?:U16|S16|U8|S8))\b")


# Bump when what :func:`machine_code` reads off the disassembly changes (old readings ignored).
_READING_VERSION = 1


def machine_code_cache() -> Path:
    """Where the readings of :func:`machine_code` are kept, one file per cubin, beside Triton's
    compile cache (``cuobjdump -sass`` takes about 0.4 s per cubin on a 2-core machine: with
    Triton's cache warm, the disassembly was most of a rerun's time)."""
    import triton
    base = getattr(getattr(getattr(triton, "knobs", None), "cache", None), "dir", None)
    base = base or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"
    return Path(base) / "patnet_machine_code"


def _disassembly_counts(cubin: bytes) -> Dict[str, int]:
    """Registers, stack and the instruction counts of one cubin (``cuobjdump -res-usage
    -sass`` of Triton's wheel; no GPU needed), read once per distinct cubin
    (:func:`machine_code_cache`)."""
    key = hashlib.sha256(f"v{_READING_VERSION}:".encode() + cubin).hexdigest()
    cached = machine_code_cache() / f"{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([str(tool), "-res-usage", "-sass", file.name], check=True,
                             capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    counts = {"registers": int(usage.group(1)), "stack": int(usage.group(2))}
    for op in _SASS.findall(out):
        key_op = "narrow" if op.startswith("LDG.E.") and not op.endswith("128") else op
        counts[key_op] = counts.get(key_op, 0) + 1
    try:  # (written whole, then renamed: a parallel run never reads half a file)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(counts))
        os.replace(partial, cached)
    except OSError:  # (a read-only cache: the reading is only not kept)
        pass
    return counts


def machine_code(cubin: bytes, ttir: str) -> MachineCode:
    """Read registers, stack, spill and tensor-core instructions and load widths off a cubin
    with the cuobjdump of Triton's wheel (no GPU needed); ``ttir``: the kernel's Triton IR,
    for whether it multiplies fp16 / bf16 matrices."""
    counts = _disassembly_counts(cubin)
    half_dot = any("tt.dot" in line and ("xf16>" in line or "xbf16>" in line)
                   for line in ttir.splitlines())
    return MachineCode(counts["registers"], counts["stack"],
                       counts.get("LDL", 0) + counts.get("STL", 0),
                       counts.get("HGMMA", 0) + counts.get("HMMA", 0), half_dot,
                       counts.get("LDG.E.128", 0), counts.get("narrow", 0))


def machine_code_problems(name: str, code: MachineCode) -> List[str]:
    """What CI refuses in the machine code of kernel ``name``: a dot on fp16 / bf16 operands
    without a tensor-core instruction (it fell back to FMA), and spills beyond its entry in
    KNOWN_SPILLS (none if it is not listed)."""
    problems = []
    if code.half_dot and code.mma == 0:
        problems.append("a tl.dot on fp16/bf16 runs without tensor-core instructions (FMA)")
    allowed = KNOWN_SPILLS.get(name, 0)
    if code.stack > allowed:
        problems.append(f"spills: {code.stack} B of stack per thread ({code.spills} LDL/STL)"
                        + (f", more than the {allowed} B known" if allowed else ""))
    return problems


def compile_key(source, arch: int, options: Dict) -> str:
    """The key under which ``triton.compile(source, target=sm_<arch>, options=options)`` keeps
    its result in Triton's cache, computed as it computes it (the installed Triton's own
    functions, before compiling): the hash of its version and files, the kernel's source and
    specialisation, the target, the options and the environment variables that change a
    compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import (get_cache_invalidating_env_vars, get_cache_key,
                                          make_backend)

    backend = make_backend(GPUTarget("cuda", arch, 32))
    parsed = backend.parse_options(dict(options, **source.parse_options()))
    key = get_cache_key(source, backend, parsed, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# What the check read off earlier compiles, committed (one file per Triton version): Triton's
# compile key -> [kernel, arch, launch kind, shared bytes, *MachineCode], under the fingerprint
# of the Triton build that compiled them (:func:`triton_fingerprint`). A variant whose key is
# listed is judged from its entry, not compiled again, so a machine whose Triton cache is
# empty (CI's, a fresh clone's) checks every kernel in seconds where compiling them all takes
# tens of minutes on 2 cores; a changed kernel (another key) is compiled, and ``--record``
# lists it.
RECORD_DIR = Path(__file__).resolve().parent / "aot_record"


def triton_fingerprint() -> str:
    """The installed Triton build as its compile keys see it: the hash of its version and files
    (``triton_key``). Another build of the same version has other keys for every kernel."""
    from triton.runtime.cache import triton_key
    return hashlib.sha256(triton_key().encode("utf-8")).hexdigest()


def record_path(version: str) -> Path:
    return RECORD_DIR / f"triton-{version}.json"


def load_record(version: str) -> Tuple[str, Dict[str, list]]:
    """(fingerprint, entries) of Triton ``version``'s record (("", {}) if it has none)."""
    try:
        record = json.loads(record_path(version).read_text())
    except FileNotFoundError:
        return "", {}
    return record["triton"], record["variants"]


def write_record(version: str, fingerprint: str, entries: Dict[str, list]) -> None:
    """Write the record, a variant per line, in kernel, arch and launch order (stable diffs)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}"
             for k, v in sorted(entries.items(), key=lambda kv: (kv[1][:3], kv[0]))]
    RECORD_DIR.mkdir(exist_ok=True)
    record_path(version).write_text(f'{{"triton": "{fingerprint}", "variants": {{\n'
                                    + ",\n".join(lines) + "\n}}\n")


_RECORD: Dict[str, list] = {}  # (a worker's copy of the record it judges from; empty: --fresh)


def _use_record(entries: Dict[str, list]) -> None:
    _RECORD.clear()
    _RECORD.update(entries)


class Compiled(NamedTuple):
    """One variant's outcome (:func:`_compile`)."""
    kernel: str
    arch: int
    variant: str
    error: str
    shared: int  # bytes (-1: did not compile)
    code: Optional[MachineCode]
    seconds: float
    key: str  # Triton's compile key ("" if it could not be computed)
    recorded: bool  # judged from the record, not compiled


def _compile(job: Tuple[str, int, int, int, bool]) -> Compiled:
    """Compile variant ``variant`` of kernel ``index`` of ``family`` for sm_``arch`` (or read
    its result off the record) and judge it."""
    family, index, arch, variant, generic = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels(family)[index]
    name, ones = variants(kernel, generic)[variant]
    start = time.perf_counter()
    shared, code, key, recorded = -1, None, "", False
    try:
        signature, constexprs, attrs = specialise(kernel, ones)
        source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages, **kernel.options)
        key = compile_key(source, arch, options)
        entry = _RECORD.get(key)
        if entry is not None:
            shared, code, recorded = entry[3], MachineCode(*entry[4:]), True
        else:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=options)
            if compiled.hash != key:
                raise RuntimeError(f"compile_key gave {key}, Triton keyed the compile "
                                   f"{compiled.hash}: update compile_key for this Triton")
            shared = int(compiled.metadata.shared)
            code = machine_code(compiled.asm["cubin"], compiled.asm["ttir"])
        # (the plain signature is no real launch: its machine code is reported, not judged)
        problems = machine_code_problems(kernel.name, code) if ones is not None else []
        if shared > SHARED_LIMIT[arch]:
            problems.insert(0, f"needs {shared} B of shared memory, sm_{arch} has "
                               f"{SHARED_LIMIT[arch]}")
        error = "; ".join(problems)
    except Exception as exc:  # reported per kernel, then the run fails
        shared, error = -1, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return Compiled(kernel.name, arch, name, error, shared, code, time.perf_counter() - start,
                    key, recorded)


def triton_overlay(version: str) -> Path:
    """A folder holding Triton ``version`` alone, to put first on PYTHONPATH (so that it shadows
    the installed Triton and nothing else): ~/.cache/patnet_kernels/triton-<version>, installed
    from the package index on first use (``pip install --target``; no other package)."""
    root = Path(os.environ.get("PATNET_TRITON_OVERLAY_DIR",
                               Path.home() / ".cache" / "patnet_kernels"))
    target = root / f"triton-{version}"
    done = target / ".installed"  # (written last: a half-finished install is redone)
    if not (done.is_file() and done.read_text() == version):
        shutil.rmtree(target, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--target", str(target), f"triton=={version}"]
        print(f"installing triton=={version} into {target} (once)", flush=True)
        if subprocess.run(pip).returncode != 0:
            raise RuntimeError(f"could not install triton=={version} into {target} (is the "
                               f"package index reachable?); run: {' '.join(pip)}")
        done.write_text(version)
    return target


def _run_under_gpu_triton(argv: List[str]) -> int:
    """This check again for sm_:data:`GPU_MACHINE_ARCH`, in a process that imports Triton
    :data:`GPU_MACHINE_TRITON`; ``argv``: its other arguments."""
    env = dict(os.environ)
    repo = Path(__file__).resolve().parents[2]
    try:
        overlay = triton_overlay(GPU_MACHINE_TRITON)
    except RuntimeError as exc:
        print(f"FAILED: no check under Triton {GPU_MACHINE_TRITON}: {exc}", flush=True)
        return 1
    env["PYTHONPATH"] = os.pathsep.join(
        [str(overlay), str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", f"{__package__}.aot", *argv],
                          env=env).returncode


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip())
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--no-generic", dest="generic", action="store_false",
                        help="compile only the specialised launch kinds, not also the plain "
                             "signature of every kernel (faster, misses what only it needs)")
    parser.add_argument("--gpu-triton", action="store_true",
                        help=f"then check sm_{GPU_MACHINE_ARCH} again under Triton "
                             f"{GPU_MACHINE_TRITON}, the GPU machines' (installed into a folder "
                             f"of its own on first use)")
    parser.add_argument("--fresh", action="store_true",
                        help="compile every variant, also those the committed record lists")
    parser.add_argument("--record", action="store_true",
                        help="write what this run read into the committed record "
                             "(patnet_kernels/triton/aot_record/), replacing the entries of "
                             "the families and architectures checked")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    # One group of jobs (one per variant) per kernel and target, kept together in this order.
    groups = [[(family, i, arch, v, args.generic) for v in range(len(variants(k, args.generic)))]
              for family in args.families for i, k in enumerate(_kernels(family))
              for arch in args.arch]
    jobs = [job for group in groups for job in group]
    import triton
    fingerprint = triton_fingerprint()
    recorded_by, record = load_record(triton.__version__)
    where = record_path(triton.__version__).relative_to(RECORD_DIR.parents[2])
    if record and recorded_by != fingerprint:  # (none of its keys can be this build's)
        print(f"{where} is of another build of Triton {triton.__version__}: every variant is "
              "compiled", flush=True)
        record = {}
    print(f"compiling {len(groups)} kernel configurations ({len(jobs)} launch variants) for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} with {args.jobs} processes, Triton "
          f"{triton.__version__} ({Path(triton.__file__).parent}); "
          + ("every variant compiled (--fresh)" if args.fresh else
             f"those in {where} ({len(record)} entries) judged from it"), flush=True)
    failures, peaks, start, readings, outcomes = 0, [], time.perf_counter(), {}, []
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_use_record,
                             initargs=({} if args.fresh else record,)) as pool:
        results = pool.map(_compile, jobs)
        for done, group in enumerate(groups, 1):
            got = [next(results) for _ in group]
            name, arch = got[0].kernel, got[0].arch
            errors = [f"[{r.variant}] {r.error}" for r in got if r.error]
            shared = {r.variant: r.shared for r in got}
            peak = max(shared.values())
            detail = ", ".join(f"{v} {s}" for v, s in shared.items())
            status = (f"FAILED: {'; '.join(errors)}" if errors
                      else f"ok, shared {peak:6d} B of {SHARED_LIMIT[arch]}")
            how = ("recorded" if all(r.recorded for r in got)
                   else f"{sum(r.seconds for r in got):.1f} s")
            print(f"[{done:3d}/{len(groups)}] sm_{arch} {name:48s} {status} ({detail}; {how})",
                  flush=True)
            codes = [(r.variant, r.code) for r in got if r.code]
            if codes:
                print("          " + "; ".join(
                    f"{variant}: {code.registers} regs, stack {code.stack} B"
                    f"{f' ({code.spills} LDL/STL)' if code.spills else ''}, "
                    f"mma {code.mma}{' (fp16/bf16 dot)' if code.half_dot else ''}, "
                    f"LDG.128 {code.wide_loads}, 1-2 B LDG {code.narrow_loads}"
                    for variant, code in codes), flush=True)
            failures += bool(errors)
            peaks.append((peak, arch, name))
            readings.update({r.key: [r.kernel, r.arch, r.variant, r.shared, *r.code]
                             for r in got if r.code})
            outcomes += got
    for arch in args.arch:
        top = sorted((p for p in peaks if p[1] == arch), reverse=True)[:5]
        print(f"largest on sm_{arch} (limit {SHARED_LIMIT[arch]} B): "
              + "; ".join(f"{n} {s} B" for s, _, n in top))
    unrecorded = [key for key in readings if key not in record]
    from_record = sum(r.recorded for r in outcomes)
    print(f"{len(groups) - failures} passed, {failures} failed ({len(jobs)} variants in "
          f"{time.perf_counter() - start:.0f} s, Triton {triton.__version__}: "
          f"{len(jobs) - from_record} compiled, {from_record} from the record; "
          + (f"{len(unrecorded)} not in the record)" if recorded_by in ("", fingerprint) else
             "the record is of another build)"), flush=True)
    if args.record:
        # (dropped: this run's variants, read again, and those of kernels no longer shipped)
        checked = {_kernels(f)[i].name for f, i, *_ in jobs}
        shipped = {kernel.name for family in FAMILIES for kernel in _kernels(family)}
        kept = {k: v for k, v in record.items()
                if v[0] in shipped and not (v[0] in checked and v[1] in args.arch
                                            and (args.generic or v[2] != GENERIC))}
        write_record(triton.__version__, fingerprint, {**kept, **readings})
        print(f"recorded {len(readings)} variants ({len(unrecorded)} new, "
              f"{len(record) - len(kept)} replaced or dropped) in "
              f"{record_path(triton.__version__)}", flush=True)
    elif unrecorded:
        print(f"{len(unrecorded)} variants are not in the record (a kernel changed): run "
              f"python -m {__package__}.aot {' '.join(argv or sys.argv[1:])} --record, and "
              "commit the record", flush=True)
    code = 1 if failures else 0
    if args.gpu_triton and triton.__version__ != GPU_MACHINE_TRITON:
        code = max(code, _run_under_gpu_triton(
            ["--arch", str(GPU_MACHINE_ARCH), "--jobs", str(args.jobs), "--families",
             *args.families] + ([] if args.generic else ["--no-generic"])
            + (["--fresh"] if args.fresh else []) + (["--record"] if args.record else [])))
    return code


if __name__ == "__main__":
    sys.exit(main())
