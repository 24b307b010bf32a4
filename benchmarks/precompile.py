"""Compile ahead, in parallel, the Triton kernels that model runs will launch: minutes of a GPU
lease otherwise spent compiling one kernel at a time on a benchmark's first call.

    python -m benchmarks.precompile [--models patnet_t2,fasternet_t2] [--batch 256]
                                    [--size 224] [--kinds inference,training]
                                    [--precisions fp16,bf16] [--layouts channels_last,nchw]
                                    [--families pointwise_mlp] [--arch 90] [--jobs N]

Each mode (model, batch, kind, precision, layout) runs once on CPU tensors with the launchers
choosing as on a GPU (:mod:`benchmarks.gpu_launches`; no kernel runs, convolutions and matrix
products give shapes only). Triton's binder specialises every launch as a CUDA launch of those
tensors would be (its ``jit_cache_hook`` takes the specialisation and skips the compile), and
``--jobs`` processes compile the distinct ones (``JITFunction.preload``), a mode's while the
next is specialised, into Triton's cache (``TRITON_CACHE_DIR``, else ~/.triton/cache), where
the GPU run's own launches then find them (tests/test_precompile.py replays a run through
Triton's JIT to check it).

Kinds: ``inference`` is ``patnet.optimize_for_inference(model, backend="triton")``
(bench_models' ``ours`` with ``--ours-backend triton``), ``training`` a step of
``create_model(name, backend="triton")`` in train mode, released dropouts (bench_train's
``ours``); every inference mode runs before the training ones. Precisions: ``fp16`` and
``bf16`` are autocast, ``fp32`` none. The target is this machine's GPU, or sm_``--arch``
without one; ``--families`` keeps only those kernel families' kernels (the files of
``patnet_kernels/triton``: ``partial_conv``, ``pointwise_mlp``, ...). A launch the modes do not
make (another shape or batch) is compiled when it first runs, as before. Prints each mode's
launches and new kernels, each compile as it ends and a summary; exits 1 if a compile failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, List, Tuple

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import patnet  # noqa: E402
from benchmarks.gpu_launches import (CompileOnlyDriver, launch_as_on_a_gpu,  # noqa: E402
                                     run_model)
from benchmarks.report import split_list  # noqa: E402
from patnet_kernels import registry  # noqa: E402
from patnet_kernels.triton._common import INTERPRET  # noqa: E402

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}  # autocast dtype
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
KINDS = ("inference", "training")


def gpu_target(arch: int) -> GPUTarget:
    """This machine's GPU's target (as Triton's CUDA driver gives it, without creating a CUDA
    context: the compile processes are forked), or sm_``arch``'s without one."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    return GPUTarget("cuda", arch, 32)


# One kernel to compile: (module, function name, specialisation data as Triton serialises it).
Launch = Tuple[str, str, str]


def family_of(module: str) -> str:
    """"partial_conv" of "patnet_kernels.triton.partial_conv"."""
    return module.rsplit(".", 1)[-1]


def specialise(modes, target: GPUTarget, families=None) -> Iterator[List[Launch]]:
    """Run each mode (label, model, training, x, amp) and yield the specialisations its
    launches add (those of ``families`` if given), distinct by kernel and Triton's in-memory
    key; prints one line per mode."""
    seen, new, count = set(), [], [0]

    def hook(*, key, fn, compile, **_):  # (Triton's jit_cache_hook: True skips the compile)
        if families is not None and family_of(fn.module) not in families:
            return True
        count[0] += 1
        if (fn.module, fn.name, str(key)) not in seen:
            seen.add((fn.module, fn.name, str(key)))
            new.append((fn.module, fn.name, compile["specialization_data"]))
        return True

    launch_as_on_a_gpu()  # (for this process, as the driver: it only specialises and compiles)
    driver.set_active(CompileOnlyDriver(target))
    knobs.runtime.jit_cache_hook = hook
    try:
        for label, model, training, x, amp in modes:
            count[0], start = 0, time.perf_counter()
            run_model(model, x, training, amp)
            print(f"  {label:56s} {count[0]:5d} launches, {len(new):3d} new kernels "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            yield list(new)
            new.clear()
    finally:
        knobs.runtime.jit_cache_hook = None


def modes(models: List[str], batches: List[int], size: int, kinds: List[str],
          precisions: List[str], layouts: List[str]):
    """(label, model, training, input, autocast dtype) of each mode, every model's inference
    modes before any training one (the quicker, and the model benchmark's); each model built
    once per kind and laid out in place per layout."""
    for kind in kinds:
        for name in models:
            torch.manual_seed(0)
            model = patnet.create_model(name, backend="triton")
            model = (model.train() if kind == "training" else
                     patnet.optimize_for_inference(model.eval(), backend="triton"))
            for layout in layouts:
                model = model.to(memory_format=LAYOUTS[layout])
                for batch in batches:
                    x = torch.randn(batch, 3, size, size).contiguous(
                        memory_format=LAYOUTS[layout])
                    for precision in precisions:
                        yield (f"{name} {kind} batch {batch} {precision} {layout}", model,
                               kind == "training", x, PRECISIONS[precision])


def _start_worker(target: GPUTarget) -> None:
    driver.set_active(CompileOnlyDriver(target))
    knobs.runtime.jit_cache_hook = None  # (forked from the recording process: compile)


def _compile(launch: Launch) -> Tuple[str, float, bool, str]:
    """(kernel, seconds, whether Triton's cache had it, error) of one preload."""
    module, name, data = launch
    hits = []
    knobs.compilation.listener = lambda **kwargs: hits.append(kwargs["cache_hit"])
    start = time.perf_counter()
    try:
        getattr(importlib.import_module(module), name).preload(data)
        error = "" if hits else "Triton neither compiled it nor found it in its cache"
    except Exception as exc:  # reported, then the run fails
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return name, time.perf_counter() - start, bool(hits and hits[-1]), error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=split_list, default=["patnet_t2", "fasternet_t2"])
    parser.add_argument("--batch", type=lambda s: [int(b) for b in split_list(s)],
                        default=[256], help="batch sizes, comma-separated (default 256)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--kinds", type=split_list, default=list(KINDS))
    parser.add_argument("--precisions", type=split_list, default=["fp16", "bf16"])
    parser.add_argument("--layouts", type=split_list, default=["channels_last"])
    parser.add_argument("--families", type=split_list, default=None,
                        help="only these kernel families (default: all)")
    parser.add_argument("--arch", type=int, default=90,
                        help="the target without a GPU (sm_90: H100 / H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    for values, allowed, what in ((args.kinds, KINDS, "kind"),
                                  (args.precisions, PRECISIONS, "precision"),
                                  (args.layouts, LAYOUTS, "layout"),
                                  (args.models, patnet.list_models(), "model"),
                                  (args.families or [], registry.families("triton"), "family")):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if INTERPRET:
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    target = gpu_target(args.arch)
    print(f"precompile for {target.backend} sm_{target.arch} (Triton {triton.__version__}, "
          f"cache {knobs.cache.dir}): specialising the launches of each mode", flush=True)
    start, futures, results = time.perf_counter(), [], []

    def report(done: int) -> None:  # print the compiles finished so far, in order
        while len(results) < done:
            name, seconds, hit, error = futures[len(results)].result()
            results.append((hit, bool(error)))
            status = f"FAILED: {error}" if error else ("cached" if hit else f"{seconds:.1f} s")
            print(f"  [{len(results):3d}] {name:40s} {status}", flush=True)

    # (each mode's new kernels are compiled while the next mode is specialised)
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_start_worker,
                             initargs=(target,)) as pool:
        for launches in specialise(modes(args.models, args.batch, args.size, args.kinds,
                                         args.precisions, args.layouts), target, args.families):
            futures += [pool.submit(_compile, launch) for launch in launches]
            report(next((i for i, f in enumerate(futures) if not f.done()), len(futures)))
        print(f"every mode specialised: {len(futures)} kernels, compiled by {args.jobs} "
              f"processes", flush=True)
        report(len(futures))
    cached, failed = sum(hit for hit, _ in results), sum(bad for _, bad in results)
    print(f"precompiled {len(results)} kernels: {len(results) - cached - failed} compiled, "
          f"{cached} already in the cache, {failed} failed "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
