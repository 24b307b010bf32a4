"""The parity check of the op benchmarks, run on every provider before it is timed.

A provider's output (and, in fwd+bwd, every gradient) is compared with the eager reference's
on the same inputs (with ``Family.fp32_reference``, fp16 and bf16 cases are compared with the
reference run in fp32 on the inputs upcast, eager included); the largest max|diff| /
max|reference| is reported as ``max err``, and above MISMATCH[dtype] the provider reads
``mismatch``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from benchmarks.op_family import Family
from benchmarks.op_inputs import Problem
from benchmarks.tolerance import MISMATCH

Tensor = torch.Tensor


def outputs(mode: str, impl: Callable[[], Tensor], leaves: Sequence[Tensor],
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


def fp32_expected(family: Family, problem: Problem, mode: str,
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
    return outputs(mode, lambda: family.reference(*args), leaves,
                   grad_out.float() if grad_out is not None else None)


def mismatch(err: Optional[float], dtype: torch.dtype, against: str) -> Optional[str]:
    """Why ``err`` (max rel error vs ``against``) is a mismatch in ``dtype``, or None."""
    if err is not None and not err <= MISMATCH[dtype]:
        return f"max rel error {err:.2g} vs {against} exceeds {MISMATCH[dtype]:g}"
    return None
