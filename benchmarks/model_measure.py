"""The whole-model benchmark's measurement: one model in one mode (precision, layout), every
provider checked against eager, then timed (timer.time_cuda on a GPU, timer.time_cpu on the
CPU). bench_models.py runs it over its grid; main_job.py over its GPU modes."""
from __future__ import annotations

import argparse
import contextlib
import time
import traceback
from typing import Dict, Optional, Sequence

import torch

import patnet
import patnet_kernels as pk
from patnet.cuda_graph import GraphedModel
from patnet.wrappers import FrozenCompiledModel
from benchmarks import env
from benchmarks.providers import Unavailable, compile_settings
from benchmarks.report import pretty
from benchmarks.timer import time_cpu, time_cuda
from benchmarks.tolerance import MISMATCH, rel_max_error

PROVIDERS = ("eager", "compile", "compile-frozen", "compile-max", "ours", "ours-compiled",
             "ours-graph")
# What runs when no provider is named: compile-max (torch.compile mode="max-autotune", what a
# user tries first for speed) tunes its GEMMs for minutes, so it runs when asked for; so do
# the compiles under Inductor's ``freezing`` (the weights folded in as constants, the CPU's
# convolutions on oneDNN with their weights laid out once), each another compilation:
# compile-frozen (the reference) and ours-compiled (optimize_for_inference(compile=True)).
DEFAULT_PROVIDERS = ("eager", "compile", "ours")
# The providers every other's speed-up is given against (speedup_vs_<base>).
BASES = ("eager", "compile", "compile-frozen", "compile-max")
# The providers that compile (their first call's time is reported as compile_s).
COMPILING = ("compile", "compile-frozen", "compile-max", "ours-compiled")
PRECISIONS = ("fp32", "amp")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.autocast on ``device`` in ``amp_dtype``, or nothing where that is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(name: str, reference: torch.nn.Module, x: torch.Tensor, precision: str,
             amp_dtype: Optional[torch.dtype], layout: str, providers: Sequence[str],
             args: argparse.Namespace) -> dict:
    """Check and time every provider in one mode (precision, layout); returns the JSON row."""
    device = x.device
    row = {"model": name, "model_name": pretty(name), "precision": precision, "layout": layout,
           "batch": x.shape[0], "image_size": x.shape[-1], "warmup": args.warmup,
           "runs": args.runs, "threads": None if device.type == "cuda" else torch.get_num_threads(),
           "git_commit": env.git_commit(), "date": env.now(), "providers": {}}
    tolerance = MISMATCH[amp_dtype or torch.float32]
    expected = None
    timer = time_cuda if device.type == "cuda" else time_cpu
    for provider in providers:
        entry: dict = {}
        row["providers"][provider] = entry
        try:
            if provider != "eager" and expected is None:
                raise Unavailable("skipped", "the eager reference failed in this mode")
            if provider == "compile":
                compile_settings().reset()   # compile once for this mode, from a clean cache
                net = torch.compile(reference, backend=args.compile_backend,
                                    **({"mode": args.compile_mode}
                                       if args.compile_backend == "inductor" else {}))
            elif provider == "compile-frozen":  # (the wrapper of compile=True, on the reference)
                compile_settings().reset()
                net = FrozenCompiledModel(reference)
            elif provider == "compile-max":
                if device.type != "cuda":
                    raise Unavailable("skipped", "max-autotune tunes GPU kernels (on the CPU "
                                                 "it only costs minutes)")
                compile_settings().reset()
                net = torch.compile(reference, mode="max-autotune")
            elif provider in ("ours", "ours-graph", "ours-compiled"):
                if provider == "ours-compiled":
                    compile_settings().reset()
                net = patnet.optimize_for_inference(
                    reference, backend=args.ours_backend, compile=provider == "ours-compiled"
                ).to(memory_format=LAYOUTS[layout])
                entry["backends"] = net.backend_plan()
                if provider == "ours-graph":  # (its forward captured once as a CUDA graph)
                    if device.type != "cuda":
                        raise Unavailable("skipped", "CUDA graphs need a CUDA device")
                    with torch.no_grad(), autocast(device, amp_dtype):
                        net = GraphedModel(net, x)
            else:
                net = reference

            def call(net=net):
                with torch.no_grad(), autocast(device, amp_dtype):
                    return net(x)

            start = time.perf_counter()
            out = call()   # the check (and, for compile, the compilation): not timed
            _sync(device)
            first_s = time.perf_counter() - start
            out = out.float()
            if provider == "eager":
                expected = out
            err = rel_max_error(out, expected)
            del out
            label = f"{name} {precision} {layout} {provider}"
            t = timer(call, args.warmup, args.runs, label)
            entry.update(status="ok", mean_ms=t["mean_ms"], median_ms=t["median_ms"],
                         min_ms=t["min_ms"], images_per_s=x.shape[0] / (t["mean_ms"] * 1e-3),
                         max_rel_error=err, first_call_s=first_s)
            if provider in COMPILING:
                entry["compile_s"] = first_s
            if not err <= tolerance:
                entry.update(status="mismatch", reason=f"max rel error {err:.2g} vs eager "
                                                       f"exceeds {tolerance:g}")
        except Unavailable as e:
            entry.update(status=e.status, reason=e.reason)
        except pk.BackendUnavailableError as e:
            entry.update(status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            entry.update(status="error", reason=f"{type(e).__name__}: {e}".strip(),
                         traceback=traceback.format_exc(limit=6))
        finally:
            net = call = None   # the compiled or fused model goes before the next provider
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"    {provider:<8} {_entry_text(entry, device.type == 'cuda')}", flush=True)
    for entry in row["providers"].values():
        for base in BASES:
            base_ms = row["providers"].get(base, {}).get("mean_ms")
            if entry.get("mean_ms") is not None:
                entry[f"speedup_vs_{base}"] = base_ms / entry["mean_ms"] if base_ms else None
    return row


def plan_text(plan: Dict[str, str]) -> str:
    return "backends " + ", ".join(f"{op} {backend}" for op, backend in plan.items())


def _entry_text(entry: dict, gpu: bool) -> str:
    if entry.get("mean_ms") is None:
        return f"{entry['status']}: {entry['reason'].splitlines()[0]}"
    text = (f"{entry['images_per_s']:,.0f} img/s, " if gpu else "") + \
        (f"mean {entry['mean_ms']:.2f} ms, median {entry['median_ms']:.2f} ms, "
         f"max rel error {entry['max_rel_error']:.1e}")
    if "compile_s" in entry:
        text += f", compiled in {entry['compile_s']:.1f} s"
    if "backends" in entry:
        text += f"; {plan_text(entry['backends'])}"
    if entry["status"] != "ok":
        text += f"; {entry['status']}: {entry['reason']}"
    return text


