"""Running one op benchmark case: every provider checked (op_parity), then timed (timer.Timer).

A case is (stage shape, batch, dtype, mode). Its inputs are drawn once, from a seeded generator
of the device; the byte (and FLOP) count is the family's, the same for every provider. In
forward+backward mode every timed call runs the forward and ``backward`` of a fixed output
gradient into every input that requires a gradient (x and all weights); gradients are reset to
None before each call, untimed. One broken provider does not end the run: it reads
``unavailable``, ``n/a``, ``skipped``, ``error`` or ``mismatch`` with the reason.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

import patnet_kernels as pk
from benchmarks import op_parity
from benchmarks.op_family import BEST_OF, Family
from benchmarks.op_inputs import Problem, channels_last, random_activation
from benchmarks.op_shapes import StageShape
from benchmarks.providers import Unavailable, compile_settings
from benchmarks.timer import Timer
from benchmarks.tolerance import DTYPE_NAMES, max_rel_error

Tensor = torch.Tensor


def timed_call(mode: str, impl: Callable[[], Tensor], grad_out: Optional[Tensor]):
    """The call the timer repeats: the forward under no_grad, or forward and backward."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                impl()
    else:
        def fn():
            impl().backward(grad_out)
    return fn


def make_impl(family: Family, provider: str, problem: Problem, mode: str,
              compile_mode: str) -> Callable[[], Tensor]:
    """A zero-argument call of ``provider`` on the case's inputs (compiling providers: after
    ``torch._dynamo.reset()``, compiled on the first call)."""
    if provider in family.compiled_providers:
        dynamo = compile_settings()
        dynamo.reset()  # compile once for this case, from a clean cache
    if provider == "torch":
        return lambda: family.functional(problem.args, "torch")
    if provider in ("triton", "cuda"):
        return lambda: family.functional(problem.args, provider)
    if provider == "torch.compile":
        compiled = torch.compile(family.reference, dynamic=False, mode=compile_mode)
        return lambda: compiled(*problem.args)
    modes, make = family.extra_providers[provider]
    if provider in family.compiled_providers:
        return make(problem, compile_mode)
    return make(problem)


def run_case(family: Family, shape: StageShape, batch: int, dtype: torch.dtype, mode: str,
             providers: List[str], timer: Timer, copy_gbps: float, skipped: Dict[str, str],
             compile_mode: str, seed: int, layout: str = "nchw") -> dict:
    """Time every provider on one case; returns the JSON row. ``layout="channels_last"`` lays
    the case's activations (its first argument and any of that shape, a residual) and, in
    fwd+bwd, the output's gradient out channels_last, as a channels_last network has them."""
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = family.bytes_moved(shape, batch, elem, mode)
    flops = family.flops(shape, batch, mode) if family.flops is not None else None
    row = {"shape": shape.name, "model": shape.model, "stage": shape.stage,
           "blocks": shape.blocks, "batch": batch, "channels": shape.channels,
           "height": shape.height, "width": shape.width, "split": shape.split,
           **(family.row_info(shape) if family.row_info is not None else {}),
           "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "mode": mode, "bytes": nbytes,
           "providers": {}}
    if flops is not None:
        row["flops"] = flops
    results = row["providers"]
    case_skip = family.skip(shape, batch, mode)
    problem = grad_out = expected = None
    if case_skip is None:
        gen = torch.Generator(device=timer.device).manual_seed(seed)
        problem = family.build(shape, batch, dtype, timer.device, mode, gen)
        if layout == "channels_last":
            problem = channels_last(problem)
        if mode == "fwd+bwd":  # every op returns a tensor shaped like its first input, in
            # its layout (a channels_last network's gradients are channels_last too)
            grad_out = random_activation(problem.args[0].shape, dtype, timer.device, gen)
            if layout == "channels_last":
                grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        row["reference"] = f"eager ({DTYPE_NAMES.get(dtype, str(dtype))})"
        if family.fp32_reference and dtype != torch.float32:
            try:
                expected = op_parity.fp32_expected(family, problem, mode, grad_out)
                row["reference"] = "reference in fp32 (inputs upcast)"
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: check against eager
                row["reference_error"] = f"{type(e).__name__}: {e}".strip()
                expected = None
                if timer.device.type == "cuda":
                    torch.cuda.empty_cache()
    for provider in providers:
        entry: dict = {}
        results[provider] = entry
        try:
            if case_skip is not None:
                raise Unavailable("n/a", case_skip)
            if provider in family.extra_providers and mode not in family.extra_providers[provider][0]:
                raise Unavailable("n/a", f"runs only in mode {', '.join(family.extra_providers[provider][0])}")
            if provider in skipped:
                raise Unavailable("skipped", skipped[provider])
            impl = make_impl(family, provider, problem, mode, compile_mode)
            start = time.perf_counter()
            try:  # the check (and the compilation)
                out = op_parity.outputs(mode, impl, problem.leaves, grad_out)
            except pk.BackendUnavailableError as e:
                raise Unavailable("unavailable", str(e)) from None
            if timer.device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            if provider == "torch" and expected is None:
                expected = out
            if expected is None:  # (neither the fp32 reference nor eager gave one)
                raise Unavailable("skipped", "no reference output to check it against (the "
                                  "eager reference failed)")
            err = max_rel_error(out, expected)
            del out
            t = timer(timed_call(mode, impl, grad_out), problem.leaves if mode != "fwd" else ())
            entry.update(status="ok", ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"],
                         gbps=nbytes / (t["ms"] * 1e-3) / 1e9, max_rel_error=err)
            entry["pct_copy"] = 100.0 * entry["gbps"] / copy_gbps if copy_gbps else None
            if flops is not None:
                entry["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
            if provider in family.compiled_providers:
                entry["compile_s"] = first_s
            against = ("the fp32 reference" if row["reference"].startswith("reference")
                       else "eager")
            reason = op_parity.mismatch(err, dtype, against)
            if reason is not None:
                entry.update(status="mismatch", reason=reason)
        except Unavailable as e:
            entry.update(status=e.status, reason=e.reason)
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            entry.update(status="error", reason=f"{type(e).__name__}: {e}".strip(),
                         traceback=traceback.format_exc(limit=6))
            if timer.device.type == "cuda":
                torch.cuda.synchronize()
    baselines = {label: results.get(p, {}).get("ms") for label, p in family.speedups.items()}
    best = [results.get(p, {}).get("ms") for p in BEST_OF]
    best = min((t for t in best if t is not None), default=None)
    for entry in results.values():
        if entry.get("ms") is not None:
            for label, base in baselines.items():
                entry[f"speedup_vs_{label}"] = base / entry["ms"] if base else None
            entry["speedup_vs_best"] = best / entry["ms"] if best else None
    del problem, grad_out, expected
    if timer.device.type == "cuda":
        torch.cuda.empty_cache()
    return row
