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
