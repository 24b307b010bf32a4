"""Shared test helpers: where the authors' reference vectors live, and error measures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks package is imported by its smoke test
    sys.path.insert(0, str(REPO))

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which has to
# be chosen before triton is first imported (the kernel modules import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Error budget of a fused kernel: relative error vs the float64 reference at most
# BUDGET_FACTOR x that of the reference run in the kernel's dtype, plus a floor of a few units
# of that dtype's rounding (the reference may be exact by luck on tiny inputs).
BUDGET_FACTOR = 4.0
BUDGET_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
                torch.float64: 1e-12}


def authors_reference_dir() -> Path:
    """../shared/testdata/authors_reference beside the repository, or $PATNET_AUTHORS_REFERENCE.

    Missing data fails the test that needs it (it is the test of exactness; never skipped).
    """
    path = Path(os.environ.get("PATNET_AUTHORS_REFERENCE",
                               REPO.parent / "shared" / "testdata" / "authors_reference"))
    if not (path / "index.json").is_file():
        pytest.fail(f"the authors' reference vectors are missing: expected {path}/index.json; "
                    "set PATNET_AUTHORS_REFERENCE to their directory")
    return path


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64 (Frobenius norms)."""
    diff = (actual.detach().double() - expected.detach().double()).norm().item()
    return diff / max(expected.double().norm().item(), floor, 1e-300)


def assert_within_budget(name: str, ours: torch.Tensor, exact: torch.Tensor,
                         reference_in_dtype: torch.Tensor, dtype: torch.dtype,
                         factor: float = BUDGET_FACTOR) -> None:
    """Assert rel_error(ours, exact) <= factor * rel_error(reference_in_dtype, exact) + floor.

    ``exact`` is the float64 reference; ``reference_in_dtype`` the reference run in ``dtype``.
    NaNs (H * W = 1 makes the unbiased std NaN) must sit exactly where the reference has them;
    the rest is compared.
    """
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    nan = exact.isnan()
    assert torch.equal(ours.detach().cpu().isnan(), nan.cpu()), \
        f"{name}: NaNs differ from the reference's ({int(nan.sum())} expected)"
    if nan.any():
        ours, exact, reference_in_dtype = (t.detach().masked_fill(nan.to(t.device), 0)
                                           for t in (ours, exact, reference_in_dtype))
    ours_err = rel_error(ours, exact)
    ref_err = rel_error(reference_in_dtype, exact)
    budget = factor * ref_err + BUDGET_FLOOR[dtype]
    assert ours_err <= budget, (f"{name}: relative error {ours_err:.3g} exceeds the budget "
                                f"{budget:.3g} ({factor} x the reference's {ref_err:.3g} in "
                                f"{dtype} + floor {BUDGET_FLOOR[dtype]:.1g})")
