"""What an op-family script (bench_partial_conv.py, ...) declares: its :class:`Family`.

A family describes its op: stage shapes, inputs, the functional call, the reference function,
the bytes it must move at least (and optionally its FLOPs), its providers and the issue's
targets. The harness (op_cases, op_tables, op_cli) times every provider on the same inputs.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks.op_inputs import Problem
from benchmarks.op_shapes import StageShape

MODES = ("fwd", "fwd+bwd")
# speedup_vs_best (JSON) = the faster of these providers' times / a provider's own time.
BEST_OF = ("triton", "torch.compile")
BASE_PROVIDERS = ("torch", "torch.compile", "triton", "cuda")


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


def fused_op_targets(op: str) -> List[Target]:
    """Issue 13's targets of a fused op (``op``: its name in the report) on the Triton backend,
    at its stage 1-3 shapes and batch 256: the forward at >= 70% of the measured copy bandwidth
    and >= 1.3x torch.compile of the reference, forward + backward >= 1.2x torch.compile."""
    def early(row: dict) -> bool:
        return row["stage"] in (1, 2, 3)

    where = "at stages 1-3, batch 256"
    return [Target("triton", "fwd", 256, "pct_copy", 70.0,
                   f"{op} reaches >= 70% of the copy bandwidth {where} (fwd)", where=early),
            Target("triton", "fwd", 256, "speedup_vs_compile", 1.3,
                   f"{op} >= 1.3x torch.compile of the reference {where} (fwd)", where=early),
            Target("triton", "fwd+bwd", 256, "speedup_vs_compile", 1.2,
                   f"{op} >= 1.2x torch.compile of the reference {where} (fwd+bwd)",
                   where=early)]


@dataclass
class Family:
    name: str                                    # "partial_conv": file names, JSON
    title: str                                   # one line for the report
    shapes: Callable[[bool], List[StageShape]]   # quick -> the stage shapes
    build: Callable[..., Problem]   # (shape, batch, dtype, device, mode, generator) -> Problem
    functional: Callable[[tuple, str], torch.Tensor]   # (args, backend) -> output, via pk's API
    reference: Callable[..., torch.Tensor]       # the reference function, called with *args
    bytes_moved: Callable[[StageShape, int, int, str], int]  # (shape, batch, elem, mode)
    formulas: Dict[str, str]                     # mode -> the byte formula, in words
    mode_text: Dict[str, str]                    # mode -> what it runs
    # name -> (modes it applies to, make(problem) -> a zero-argument call); see PConv's inplace
    extra_providers: Dict[str, Tuple[Tuple[str, ...],
                                     Callable[[Problem], Callable[[], torch.Tensor]]]] \
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
    # The modes the op has (an inference op: fwd only); each needs its formulas and mode_text.
    modes: Tuple[str, ...] = MODES
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
