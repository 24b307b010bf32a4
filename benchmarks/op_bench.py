"""The harness behind the per-op-family benchmarks (bench_partial_conv.py, ...).

Each family script describes its op (stage shapes, inputs, the functional call, the reference
function and the bytes it must move at least); this module times every provider on the same
inputs and reports time, achieved GB/s, the share of the measured device copy bandwidth and the
speed-ups against eager PyTorch and against ``torch.compile`` of the reference.

Providers (same inputs, same byte count, for every one):

* ``torch``: the functional API with ``backend="torch"`` (the eager reference);
* ``torch.compile``: ``torch.compile`` of the reference function itself, compiled once per
  (shape, batch, dtype, mode) after ``torch._dynamo.reset()``; the compiling call is excluded;
* ``triton``: the functional API with ``backend="triton"``;
* ``cuda``: the functional API with ``backend="cuda"`` (the CUDA C++ kernels; on the CPU their
  emulation, PATNET_CUDA_EMULATE=1, which times nothing useful);
* family extras (PConv: ``triton inplace``, inference only; the RPE attention: ``sdpa`` and
  compiled ``flex``).

A family picks which of the base providers it runs (``Family.base_providers``; the RPE
attention drops ``torch.compile`` of the reference), which providers compile
(``compiled_providers``: compiled once per case, skipped by --quick on the CPU), which speed-up
columns to show (``speedups``: label -> provider, JSON ``speedup_vs_<label>``), its batches per
shape, and optionally a FLOP count per case, shown as TFLOP/s (``flops``).

Timing. On a GPU: ``triton.testing.do_bench`` (median, with the 20th and 80th percentiles),
which runs the op once, estimates its time, warms up, and before **every** timed call zeroes a
256 MB buffer, so the inputs are read from device memory, not from L2 (cold-L2 timing: no
input rotation is needed). ``cudnn.benchmark`` is on, so the eager convolution gets its best
algorithm; its choice happens in the warm-up. On the CPU (smoke runs): a plain loop, warm-up
calls excluded, median of the timed calls, no cache flush. In forward+backward mode every call
runs the forward and ``backward`` of a fixed output gradient into every input that requires a
gradient (x and all weights); gradients are reset to None before each call, untimed.

Every provider's output (and, with backward, every gradient) is compared with the eager
reference's on the same inputs before it is timed (with ``Family.fp32_reference``, fp16 and
bf16 cases are compared with the reference run in fp32 on the inputs upcast, eager included);
the largest max|diff| / max|reference| is reported as ``max err``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks.main_job import cpu_name, git_commit  # noqa: E402
from patnet.layers import BasicStage  # noqa: E402

Tensor = torch.Tensor

MODES = ("fwd", "fwd+bwd")
# speedup_vs_best (JSON) = the faster of these providers' times / a provider's own time.
BEST_OF = ("triton", "torch.compile")
BASE_PROVIDERS = ("torch", "torch.compile", "triton", "cuda")
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# A provider whose result differs from the eager reference's by more than this (max |diff| /
# max |reference|, outputs and gradients) is flagged as a mismatch. Loose on purpose: eager
# fp32 convolutions may use TF32 (cudnn's default); this catches wrong kernels, not rounding.
MISMATCH = {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}

# The stage shapes of the real networks at 224 x 224; --quick uses the same networks shrunk
# (embed_dim 8, one block per stage, 32 x 32 input: stage maps 8, 4, 2, 1).
FULL_CONFIG: Dict[str, object] = {"input_size": 224}
QUICK_CONFIG: Dict[str, object] = {"input_size": 32, "embed_dim": 8, "depths": (1, 1, 1, 1)}


# --------------------------------------------------------------------------------------------
# Stage shapes, read off the model code
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageShape:
    """The input of one op in one stage of a network: (C, H, W) at batch 1 and the split."""

    model: str        # e.g. "patnet_t2"
    stage: int        # 1..4
    channels: int     # C
    height: int
    width: int
    split: int        # C1 (conv channels) for PConv / PAT_ch, P (conv channels) for PAT_sp,
                      # heads for the attention of PAT_sf
    blocks: int       # how many blocks of the network run the op at this shape
    tag: str = ""     # tells apart shapes of one stage read at different input sizes

    @property
    def name(self) -> str:
        return f"{self.model}.s{self.stage}" + (f".{self.tag}" if self.tag else "")


def stage_shapes(model_name: str, module_types: tuple, split_of: Callable[[object], int],
                 quick: bool = False, input_hw: Optional[Tuple[int, int]] = None,
                 tag: str = "", stages: Optional[Sequence[int]] = None,
                 **overrides) -> List[StageShape]:
    """The shapes at which ``model_name`` calls the modules of ``module_types``.

    Builds the network on the "meta" device (no memory, no compute) and records, with forward
    pre-hooks, the input of each such module during a forward of one 224 x 224 image (with
    ``quick``, the shrunk network of QUICK_CONFIG; ``input_hw`` = (height, width) sets another
    input size, e.g. a detection image). ``split_of(module)`` gives the channel split (or what
    the family keeps in ``split``). Returns one StageShape per distinct (stage, shape, split),
    in stage order, named with ``tag`` if given; ``stages`` keeps only those stages.
    """
    config = dict(QUICK_CONFIG if quick else FULL_CONFIG)
    size = config.pop("input_size")
    height, width = input_hw if input_hw is not None else (size, size)
    config.update(overrides)
    with torch.device("meta"):
        model = patnet.create_model(model_name, backend="torch", **config).eval()
    found: Dict[tuple, int] = {}
    handles = []
    stage = 0
    for child in model.stages:
        if not isinstance(child, BasicStage):  # the merging layers between stages
            continue
        stage += 1
        for module in child.modules():
            if isinstance(module, module_types):
                def hook(mod, inputs, stage=stage):
                    _, c, h, w = inputs[0].shape
                    key = (stage, int(c), int(h), int(w), int(split_of(mod)))
                    found[key] = found.get(key, 0) + 1
                handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.empty(1, model.in_chans, height, width, device="meta"))
    for handle in handles:
        handle.remove()
    return [StageShape(model_name, s, c, h, w, split, n, tag)
            for (s, c, h, w, split), n in sorted(found.items())
            if stages is None or s in stages]


# --------------------------------------------------------------------------------------------
# What a family script provides
# --------------------------------------------------------------------------------------------

@dataclass
class Problem:
    """The inputs of one case. ``args`` are the positional arguments of the reference function
    (and, through ``Family.functional``, of the functional API); ``leaves`` the tensors that
    require a gradient in fwd+bwd mode (x and every weight)."""

    args: tuple
    leaves: List[Tensor] = field(default_factory=list)


def _channels_last(problem: Problem) -> Problem:
    """The problem with its first argument (the activation) laid out channels_last, still a
    leaf that requires a gradient where it did."""
    x = problem.args[0]
    moved = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(
        x.requires_grad)
    leaves = [moved if leaf is x else leaf for leaf in problem.leaves]
    return Problem((moved,) + tuple(problem.args[1:]), leaves)


@dataclass
class Target:
    """A performance target of the issue, checked on the measured rows (printed, not enforced)."""

    provider: str
    mode: str
    batch: int
    metric: str       # "pct_copy", "speedup_vs_<label>" (see Family.speedups) or
                      # "speedup_vs_best" (see BEST_OF)
    threshold: float
    text: str
    where: Optional[Callable[[dict], bool]] = None   # row (JSON) -> whether the target covers it


@dataclass
class Family:
    name: str                                    # "partial_conv": file names, JSON
    title: str                                   # one line for the report
    shapes: Callable[[bool], List[StageShape]]   # quick -> the stage shapes
    build: Callable[..., Problem]   # (shape, batch, dtype, device, mode, generator) -> Problem
    functional: Callable[[tuple, str], Tensor]   # (args, backend) -> output, via pk's API
    reference: Callable[..., Tensor]             # the reference function, called with *args
    bytes_moved: Callable[[StageShape, int, int, str], int]  # (shape, batch, elem, mode)
    formulas: Dict[str, str]                     # mode -> the byte formula, in words
    mode_text: Dict[str, str]                    # mode -> what it runs
    # name -> (modes it applies to, make(problem) -> a zero-argument call); see PConv's inplace
    extra_providers: Dict[str, Tuple[Tuple[str, ...], Callable[[Problem], Callable[[], Tensor]]]] \
        = field(default_factory=dict)
    skip: Callable[[StageShape, int, str], Optional[str]] = lambda shape, batch, mode: None
    targets: List[Target] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # The providers of BASE_PROVIDERS this family runs, and the order of all its providers
    # (default: these, then the extras). "torch" (the reference) always runs first.
    base_providers: Tuple[str, ...] = BASE_PROVIDERS
    order: Optional[Tuple[str, ...]] = None
    # Providers that compile (once per case, after torch._dynamo.reset(); the first call is not
    # timed, its duration is reported as compile_s; skipped by --quick on the CPU). An extra
    # provider listed here is made with make(problem, compile_mode).
    compiled_providers: Tuple[str, ...] = ("torch.compile",)
    # label -> provider: each measured provider gets speedup_vs_<label> = that provider's time /
    # its own, shown as the column "vs <label>"
    speedups: Dict[str, str] = field(
        default_factory=lambda: {"eager": "torch", "compile": "torch.compile"})
    # (shape, batch, mode) -> floating-point operations of one call, for a TFLOP/s column
    # (the same count for every provider); None: no such column
    flops: Optional[Callable[[StageShape, int, str], int]] = None
    flop_formulas: Dict[str, str] = field(default_factory=dict)   # mode -> the FLOP formula
    default_dtypes: str = "float16,float32"
    # (shape, quick) -> the batches of that shape when --batches is not given (default: 1, 64,
    # 256; quick: 2)
    default_batches: Optional[Callable[[StageShape, bool], List[int]]] = None
    # Check every provider (eager included) against the reference run in float32 on the case's
    # inputs upcast (fp16 / bf16 cases), instead of against eager in the case's dtype. Needs
    # Problem.args of tensors and plain values, with every leaf one of the args.
    fp32_reference: bool = False
    row_info: Optional[Callable[[StageShape], dict]] = None   # extra JSON fields of each row

    @property
    def providers(self) -> List[str]:
        names = list(self.base_providers) + [p for p in self.extra_providers
                                             if p not in self.base_providers]
        if self.order:
            names = [p for p in self.order if p in names] + [p for p in names
                                                              if p not in self.order]
        return names

    def batches_of(self, shape: StageShape, quick: bool) -> List[int]:
        if self.default_batches is not None:
            return list(self.default_batches(shape, quick))
        return [2] if quick else [1, 64, 256]


def param_bytes(tensors: Sequence[Optional[object]], elem: int) -> int:
    """Bytes of the parameter tensors (None entries and BatchNormParams are handled)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, pk.BatchNormParams):
            total += param_bytes([t.weight, t.bias, t.running_mean, t.running_var], elem)
        else:
            total += t.numel() * elem
    return total


def random_weight(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> Tensor:
    """Normal weights with std 1 / sqrt(fan_in): unit gain, so repeated in-place calls and
    fp16 stay finite."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    w = torch.randn(tuple(shape), generator=gen, device=device) / math.sqrt(fan_in)
    return w.to(dtype)


def random_activation(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                      gen: torch.Generator) -> Tensor:
    """Standard normal values, drawn on ``device`` (``gen`` is a generator of that device)."""
    return torch.randn(tuple(shape), generator=gen, device=device).to(dtype)


def random_batch_norm(channels: int, dtype: torch.dtype, device: torch.device,
                      gen: torch.Generator, training: bool) -> pk.BatchNormParams:
    """A BatchNormParams with random affine and running statistics (as patnet.testing does);
    its weight and bias require a gradient in training mode."""
    def rand(scale, offset=0.0):
        return (torch.randn(channels, generator=gen, device=device) * scale + offset).to(dtype)
    weight, bias = rand(0.3, 1.0), rand(0.2)
    mean = rand(0.5)
    var = (torch.rand(channels, generator=gen, device=device) + 0.5).to(dtype)
    if training:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
    return pk.BatchNormParams(weight, bias, mean, var, 0.1, 1e-5)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class Timer:
    device: torch.device
    warmup_ms: float = 25.0    # GPU (do_bench)
    rep_ms: float = 100.0      # GPU (do_bench)
    warmup: int = 2            # CPU loop
    runs: int = 10             # CPU loop

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return (f"triton.testing.do_bench(warmup={self.warmup_ms:g} ms, rep={self.rep_ms:g} "
                    "ms): median and 20th/80th percentiles; L2 flushed (256 MB written) before "
                    "every timed call; gradients reset to None between calls, untimed")
        return (f"CPU loop: {self.warmup} warm-up calls, then median and 20th/80th percentiles "
                f"of {self.runs} timed calls (time.perf_counter); no cache flush")

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence[Tensor] = ()) -> dict:
        """{"ms": median, "ms_p20": ..., "ms_p80": ...} of one call of ``fn``."""
        if self.device.type == "cuda":
            import triton.testing
            p20, p50, p80 = triton.testing.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms,
                grad_to_none=list(grad_to_none) or None, quantiles=[0.2, 0.5, 0.8])
            return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
        times = []
        for i in range(self.warmup + self.runs):
            for t in grad_to_none:
                t.grad = None
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= self.warmup:
                times.append(elapsed)
        if len(times) >= 2:
            q = statistics.quantiles(times, n=5, method="inclusive")  # 20, 40, 60, 80 %
            p20, p80 = q[0], q[3]
        else:
            p20 = p80 = times[0]
        return {"ms": statistics.median(times), "ms_p20": p20, "ms_p80": p80}


def measure_copy_bandwidth(timer: Timer, nbytes: int) -> dict:
    """GB/s of ``dst.copy_(src)`` over two float32 buffers of ``nbytes`` each (reads + writes)."""
    n = nbytes // 4
    src = torch.randn(n, device=timer.device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    moved = 2 * n * 4  # the buffers are freed on return
    return {"bytes": moved, "buffer_bytes": n * 4, "ms": t["ms"], "ms_p20": t["ms_p20"],
            "ms_p80": t["ms_p80"], "gbps": moved / (t["ms"] * 1e-3) / 1e9,
            "what": "dst.copy_(src), float32, bytes = read + written"}


# --------------------------------------------------------------------------------------------
# Running the cases
# --------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A provider that cannot run this case (status already chosen)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _outputs(mode: str, impl: Callable[[], Tensor], leaves: Sequence[Tensor],
             grad_out: Optional[Tensor]) -> List[Tensor]:
    """One call, untimed: the output (and in fwd+bwd the gradients of the leaves), detached."""
    if mode == "fwd":
        with torch.no_grad():
            return [impl().clone()]
    for t in leaves:
        t.grad = None
    out = impl()
    out.backward(grad_out)
    return [out.detach().clone()] + [t.grad.clone() if t.grad is not None else
                                     torch.full_like(t, float("nan")) for t in leaves]


def _timed_call(mode: str, impl: Callable[[], Tensor], grad_out: Optional[Tensor]):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                impl()
    else:
        def fn():
            impl().backward(grad_out)
    return fn


def _rel_error(results: List[Tensor], expected: List[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(results, expected):
        a, b = a.double(), b.double()
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        if math.isnan(diff):
            return float("nan")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _compile_settings():
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch._dynamo


def make_impl(family: Family, provider: str, problem: Problem, mode: str,
              compile_mode: str) -> Callable[[], Tensor]:
    if provider in family.compiled_providers:
        dynamo = _compile_settings()
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


def _fp32_expected(family: Family, problem: Problem, mode: str,
                   grad_out: Optional[Tensor]) -> List[Tensor]:
    """The reference's output (and gradients) on float32 copies of the case's inputs."""
    def up(value):
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.detach().float().requires_grad_(value.requires_grad)
        return value
    args = tuple(up(a) for a in problem.args)
    leaves = []
    for leaf in problem.leaves:
        index = next((i for i, a in enumerate(problem.args) if a is leaf), None)
        if index is None:
            raise ValueError("fp32_reference needs every leaf among Problem.args")
        leaves.append(args[index])
    out = _outputs(mode, lambda: family.reference(*args), leaves,
                   grad_out.float() if grad_out is not None else None)
    return out


def run_case(family: Family, shape: StageShape, batch: int, dtype: torch.dtype, mode: str,
             providers: List[str], timer: Timer, copy_gbps: float, skipped: Dict[str, str],
             compile_mode: str, seed: int, layout: str = "nchw") -> dict:
    """Time every provider on one case; returns the JSON row. ``layout="channels_last"`` lays
    the case's main activation (its first argument) out channels_last."""
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
            problem = _channels_last(problem)
        if mode == "fwd+bwd":  # every op returns a tensor shaped like its first input
            grad_out = random_activation(problem.args[0].shape, dtype, timer.device, gen)
        row["reference"] = f"eager ({DTYPE_NAMES.get(dtype, str(dtype))})"
        if family.fp32_reference and dtype != torch.float32:
            try:
                expected = _fp32_expected(family, problem, mode, grad_out)
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
            try:
                out = _outputs(mode, impl, problem.leaves, grad_out)  # check (and compile)
            except pk.BackendUnavailableError as e:
                raise Unavailable("unavailable", str(e)) from None
            if timer.device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            if provider == "torch" and expected is None:
                expected = out
            err = _rel_error(out, expected) if expected is not None else None
            del out
            t = timer(_timed_call(mode, impl, grad_out), problem.leaves if mode != "fwd" else ())
            entry.update(status="ok", ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"],
                         gbps=nbytes / (t["ms"] * 1e-3) / 1e9, max_rel_error=err)
            entry["pct_copy"] = 100.0 * entry["gbps"] / copy_gbps if copy_gbps else None
            if flops is not None:
                entry["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
            if provider in family.compiled_providers:
                entry["compile_s"] = first_s
            if err is not None and not err <= MISMATCH[dtype]:
                against = ("the fp32 reference" if row["reference"].startswith("reference")
                           else "eager")
                entry["status"] = "mismatch"
                entry["reason"] = (f"max rel error {err:.2g} vs {against} exceeds "
                                   f"{MISMATCH[dtype]:g}")
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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec``; small values keep three significant digits."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 0.995 and not spec.endswith("e"):
        return f"{value:.3g}{suffix}"
    return format(value, spec) + suffix


def format_table(rows: List[dict], providers: List[str],
                 speedup_labels: Sequence[str] = ("eager", "compile"),
                 flops: bool = False) -> str:
    headers = (["shape", "blocks", "B", "C", "HxW", "dtype", "mode", "provider", "time us",
                "GB/s", "% copy"] + (["TFLOP/s"] if flops else [])
               + [f"vs {label}" for label in speedup_labels] + ["max err", "status"])
    lines = []
    for row in rows:
        first = True
        for provider in providers:
            entry = row["providers"].get(provider)
            if entry is None:
                continue
            case = ([row["shape"], str(row["blocks"]), str(row["batch"]), str(row["channels"]),
                     f"{row['height']}x{row['width']}", row["dtype"], row["mode"]]
                    if first else [""] * 7)
            first = False
            ms = entry.get("ms")
            status = entry["status"]
            if entry.get("reason"):
                status += ": " + entry["reason"].splitlines()[0]
            lines.append(case + [
                provider, _fmt(ms * 1e3 if ms is not None else None, ",.1f"),
                _fmt(entry.get("gbps"), ",.1f"), _fmt(entry.get("pct_copy"), ".1f", "%")]
                + ([_fmt(entry.get("tflops"), ",.1f")] if flops else [])
                + [_fmt(entry.get(f"speedup_vs_{label}"), ".2f", "x")
                   for label in speedup_labels]
                + [_fmt(entry.get("max_rel_error"), ".1e"), status])
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    left = {0, 5, 6, 7, len(headers) - 1}

    def render(cells):
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            if i == len(cells) - 1:
                out.append(cell)
            else:
                out.append(cell.ljust(w) if i in left else cell.rjust(w))
        return "  ".join(out).rstrip()

    text = [render(headers), "-" * len(render(headers))]
    previous = None
    for line in lines:
        if line[0] and previous is not None:
            text.append("")
        text.append(render(line))
        previous = line
    return "\n".join(text)


def check_targets(family: Family, rows: List[dict], cuda_name: Optional[str]) -> List[str]:
    out = []
    for target in family.targets:
        values = []
        for row in rows:
            entry = row["providers"].get(target.provider, {})
            if (row["mode"] == target.mode and row["batch"] == target.batch
                    and (target.where is None or target.where(row))
                    and entry.get(target.metric) is not None):
                values.append((entry[target.metric], row))
        head = f"  {target.text}: "
        if not values:
            out.append(head + f"no measured {target.provider} rows at batch {target.batch} "
                              f"in mode {target.mode}")
            continue
        worst, row = min(values, key=lambda v: v[0])
        unit = "%" if target.metric == "pct_copy" else "x"
        verdict = "met" if worst >= target.threshold else "NOT met"
        text = (head + f"{verdict}: worst {worst:.2f}{unit} ({row['shape']} {row['dtype']}, "
                       f"{len(values)} rows; target {target.threshold:g}{unit})")
        dtypes = sorted({r["dtype"] for _, r in values})
        if len(dtypes) > 1:  # the worst row per dtype, as a target may hold for some only
            text += "; worst per dtype: " + ", ".join(
                f"{d} {min(v for v, r in values if r['dtype'] == d):.2f}{unit}" for d in dtypes)
        out.append(text)
    if out and not (cuda_name and "H100" in cuda_name):
        out.append("  (the targets are for an H100; this run is on "
                   f"{cuda_name or 'the CPU'}, so they are shown for information only)")
    return out


def geomean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary_lines(rows: List[dict], providers: List[str],
                  speedup_labels: Sequence[str] = ("eager", "compile"),
                  flops: bool = False) -> List[str]:
    """Per provider, mode, dtype and batch: geometric-mean speed-ups and the % of copy range
    (and with ``flops`` the TFLOP/s range)."""
    keys = sorted({(r["mode"], r["dtype"], r["batch"]) for r in rows},
                  key=lambda k: (MODES.index(k[0]) if k[0] in MODES else 9, k[1], k[2]))
    lines = []
    for provider in providers:
        if provider == "torch":
            continue
        for mode, dtype, batch in keys:
            entries = [r["providers"][provider] for r in rows
                       if (r["mode"], r["dtype"], r["batch"]) == (mode, dtype, batch)
                       and r["providers"].get(provider, {}).get("ms") is not None]
            if not entries:
                continue
            pct = [e["pct_copy"] for e in entries if e.get("pct_copy") is not None]
            speedups = ", ".join(
                f"vs {label} "
                f"{_fmt(geomean([e.get(f'speedup_vs_{label}') for e in entries]), '.2f', 'x')}"
                for label in speedup_labels)
            line = (f"  {provider:<14} {mode:<8} {dtype} B={batch:<4} shapes {len(entries)}: "
                    f"{speedups} (geomean); % copy {_fmt(min(pct) if pct else None, '.1f')}.."
                    f"{_fmt(max(pct) if pct else None, '.1f')}")
            if flops:
                tf = [e["tflops"] for e in entries if e.get("tflops") is not None]
                line += (f"; TFLOP/s {_fmt(min(tf) if tf else None, '.1f')}.."
                         f"{_fmt(max(tf) if tf else None, '.1f')}")
            lines.append(line)
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(family: Family, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.bench_{family.name}",
        description=f"Benchmark {family.title}: {' vs '.join(family.providers)}.")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of float16, bfloat16, float32 (default: "
                             f"{family.default_dtypes}; --quick on the CPU: float32)")
    parser.add_argument("--batches", default=None,
                        help="comma list, for every shape (default: 1,64,256, or the family's "
                             "batches per shape; --quick: 2)")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    parser.add_argument("--shapes", default=None,
                        help="comma list of substrings of the shape names to keep, e.g. "
                             "'fasternet_t2.s1,patnet_t2' (names: <model>.s<stage>)")
    parser.add_argument("--providers", default=None,
                        help=f"comma list, default all: {', '.join(family.providers)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (the networks shrunk: embed_dim 8, 32 x 32 input), "
                             "batch 2, few runs: a smoke run; on the CPU the compiled "
                             f"providers ({', '.join(family.compiled_providers)}) are skipped")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON report (default: benchmarks/results/"
                             f"{family.name}.<device>.json; .local.json for CPU or --quick runs)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench repetition")
    parser.add_argument("--warmup", type=int, default=None, help="CPU: warm-up calls (2)")
    parser.add_argument("--runs", type=int, default=None, help="CPU: timed calls (10; quick 3)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of each copy buffer (default 1024 MiB on GPU, 64 on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (default 1, as the authors time CPU latency; "
                             "also robust on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw",
                        help="memory format of the op's (B, C, H, W) activation (not for the "
                             "attention, whose (B, heads, N, d) tensors have none)")
    args = parser.parse_args(argv)
    if args.layout == "channels_last" and family.name == "rpe_attention":
        parser.error("--layout channels_last: the attention's (B, heads, N, d) tensors have no "
                     "channels_last form; leave --layout out")
    return args


def run(family: Family, argv=None) -> int:
    """Entry point of a family script. Returns 0, or 1 if a provider failed or mismatched."""
    args = parse_args(family, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this PyTorch")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(family, args, argv, device)
    finally:
        torch.set_num_threads(threads)


def _run(family: Family, args: argparse.Namespace, argv, device: torch.device) -> int:
    cpu = device.type == "cpu"
    notes = list(family.notes)
    if cpu and "triton" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        # Triton kernels reach CPU tensors only through its interpreter, chosen before import.
        os.environ["TRITON_INTERPRET"] = "1"
    if cpu and "cuda" in family.providers and not os.environ.get("PATNET_CUDA_EMULATE"):
        # The CUDA kernels reach CPU tensors only through their CPU emulation.
        os.environ["PATNET_CUDA_EMULATE"] = "1"
        notes.append("cuda runs the CUDA kernels' CPU emulation (PATNET_CUDA_EMULATE=1): its "
                     "times say nothing about GPU speed")
    if cpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append("Triton runs under its interpreter (TRITON_INTERPRET=1) on the CPU: its "
                     "times say nothing about GPU speed")
    if cpu:
        notes.append("CPU run: a smoke test of the harness; no figure here is a GPU result")

    dtypes_text = args.dtypes or ("float32" if (args.quick and cpu) else family.default_dtypes)
    try:
        dtypes = [DTYPES[d.lower()] for d in _split(dtypes_text)]
    except KeyError as e:
        raise SystemExit(f"unknown dtype {e}; choose from {', '.join(DTYPES)}")
    given_batches = [int(b) for b in _split(args.batches)] if args.batches else None
    modes = _split(args.modes)
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    providers = family.providers
    if args.providers:
        wanted = _split(args.providers)
        unknown = set(wanted) - set(providers)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {providers}")
        providers = [p for p in providers if p in wanted]
    if "torch" not in providers:
        providers = ["torch"] + providers  # the reference: speed-ups and the parity check
    shapes = family.shapes(args.quick)
    if args.shapes:
        keep = _split(args.shapes)
        shapes = [s for s in shapes if any(k in s.name for k in keep)]
        if not shapes:
            raise SystemExit(f"--shapes {args.shapes!r} matches none of "
                             f"{[s.name for s in family.shapes(args.quick)]}")
    batches_of = {s.name: given_batches or family.batches_of(s, args.quick) for s in shapes}
    batches = sorted({b for bs in batches_of.values() for b in bs})
    skipped = {}
    if args.quick and cpu:
        for provider in family.compiled_providers:
            if provider in providers and not (args.providers and provider in wanted):
                skipped[provider] = "--quick on the CPU"
        if skipped:
            names = ", ".join(skipped)
            notes.append(f"{names} {'is' if len(skipped) == 1 else 'are'} skipped in --quick "
                         "runs on the CPU (compiling takes seconds per case there); name "
                         f"{'it' if len(skipped) == 1 else 'them'} in --providers, or drop "
                         "--quick, to time "
                         f"{'it' if len(skipped) == 1 else 'them'}")

    timer = Timer(device, args.warmup_ms, args.rep_ms,
                  2 if args.warmup is None else args.warmup,
                  args.runs if args.runs is not None else (3 if args.quick else 10))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        cuda_name = torch.cuda.get_device_name(device)
    else:
        cuda_name = None
    device_name = cuda_name or f"CPU {cpu_name()}"
    default_json = (REPO / "benchmarks" / "results" /
                    f"{family.name}.{_slug(cuda_name or 'cpu')}"
                    f"{'.channels_last' if args.layout == 'channels_last' else ''}"
                    f"{'.quick' if args.quick else ''}{'.local' if (cpu or args.quick) else ''}.json")
    json_path = Path(args.json) if args.json else default_json

    log = sys.stderr
    print(f"{family.title} on {device_name}", file=log, flush=True)
    copy_mib = args.copy_mib or (64 if cpu else 1024)
    copy = measure_copy_bandwidth(timer, copy_mib << 20)
    print(f"copy bandwidth (the ceiling): {copy['gbps']:,.1f} GB/s "
          f"({copy['what']}, 2 x {copy_mib} MiB)", file=log, flush=True)

    report = {
        "benchmark": family.name, "title": family.title,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(), "device": device_name, "device_type": device.type,
        "torch": torch.__version__, "triton": _version("triton"),
        "cuda": torch.version.cuda, "cudnn": (torch.backends.cudnn.version()
                                              if torch.backends.cudnn.is_available() else None),
        "python": platform.python_version(), "cpu": cpu_name(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "settings": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "dtypes": [DTYPE_NAMES[d] for d in dtypes], "batches": batches,
            "batches_per_shape": batches_of, "modes": modes,
            "providers": providers, "quick": args.quick, "compile_mode": args.compile_mode,
            "timing": timer.method, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "mismatch_tolerance": {DTYPE_NAMES[d]: MISMATCH[d] for d in dtypes},
            "checked_against": ("the reference in fp32 on the inputs upcast (fp16 / bf16 "
                                "cases), eager itself in fp32 cases" if family.fp32_reference
                                else "eager (the torch provider) in the case's dtype"),
            "seed": args.seed,
            "layout": ("channels_last (the activation)" if args.layout == "channels_last"
                       else "NCHW (contiguous)"),
            "cpu_threads": torch.get_num_threads() if cpu else None,
        },
        "modes": {m: family.mode_text[m] for m in modes},
        "byte_formulas": {m: family.formulas[m] for m in modes},
        "flop_formulas": ({m: family.flop_formulas[m] for m in modes}
                          if family.flops is not None else None),
        "speedups": {f"speedup_vs_{label}": provider
                     for label, provider in family.speedups.items()},
        "shapes": [dict(asdict(s), name=s.name) for s in shapes],
        "copy_bandwidth": copy, "notes": notes, "complete": False, "rows": [],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)

    cases = [(s, b, d, m) for d in dtypes for m in modes for s in shapes
             for b in batches_of[s.name]]
    for index, (shape, batch, dtype, mode) in enumerate(cases, 1):
        label = (f"{shape.name} B={batch} C={shape.channels} {shape.height}x{shape.width} "
                 f"{DTYPE_NAMES[dtype]} {mode}")
        print(f"[{family.name} {index}/{len(cases)}] {label}", file=log, flush=True)
        row = run_case(family, shape, batch, dtype, mode, providers, timer, copy["gbps"],
                       skipped, args.compile_mode, args.seed, args.layout)
        for provider in providers:
            entry = row["providers"][provider]
            text = (f"{entry['ms'] * 1e3:,.1f} us, {entry['gbps']:,.1f} GB/s"
                    if entry.get("ms") is not None else "")
            if entry["status"] != "ok":
                text += (" " if text else "") + f"{entry['status']}: {entry.get('reason', '')}"
            print(f"    {provider:<14} {text}", file=log, flush=True)
        report["rows"].append(row)
        json_path.write_text(json.dumps(report, indent=1) + "\n")  # partial results survive

    report["complete"] = True
    json_path.write_text(json.dumps(report, indent=1) + "\n")

    out = sys.stdout
    print(f"{family.title}", file=out)
    print(f"device: {device_name}; torch {torch.__version__}, triton {report['triton']}, "
          f"commit {report['git_commit']}", file=out)
    print(f"timing: {timer.method}", file=out)
    print(f"copy bandwidth (the ceiling of '% copy'): {copy['gbps']:,.1f} GB/s "
          f"({copy['what']})", file=out)
    for mode in modes:
        print(f"{mode}: {family.mode_text[mode]}", file=out)
        print(f"  bytes: {family.formulas[mode]}", file=out)
        if family.flops is not None:
            print(f"  FLOPs: {family.flop_formulas[mode]}", file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    print(file=out)
    labels = list(family.speedups)
    has_flops = family.flops is not None
    print(format_table(report["rows"], providers, labels, has_flops), file=out)
    summary = summary_lines(report["rows"], providers, labels, has_flops)
    if summary:
        print("\nSummary (speed-ups: geometric mean over shapes)", file=out)
        print("\n".join(summary), file=out)
    targets = check_targets(family, report["rows"], cuda_name)
    if targets:
        print("\nTargets of the issue", file=out)
        print("\n".join(targets), file=out)
    print(f"\nReport written to {json_path}", file=out)
    bad = [(r["shape"], r["batch"], r["dtype"], r["mode"], p, e["status"])
           for r in report["rows"] for p, e in r["providers"].items()
           if e["status"] in ("error", "mismatch")]
    if bad:
        print(f"{len(bad)} provider runs failed or mismatched the reference:", file=out)
        for item in bad[:20]:
            print("  " + " ".join(map(str, item)), file=out)
        return 1
    return 0
