"""Shared test helpers: where the authors' reference vectors live, error measures, and the fused
backends (the ``fused_backend`` fixture, the op namespace of each)."""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks package is imported by its smoke test
    sys.path.insert(0, str(REPO))

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which has to
# be chosen before triton is first imported (the kernel modules import it), and the CUDA
# kernels on CPU tensors through their CPU emulation build (csrc/kernels/emulate.h).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PATNET_CUDA_EMULATE", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The fused backends. A test taking the ``fused_backend`` fixture runs once for each (ids
# "triton" / "cuda", so ``-k cuda`` selects one); a test that only one of them serves says so
# with ``@TRITON_ONLY`` (or its own ``parametrize("fused_backend", [...], indirect=True)``).
FUSED_BACKENDS = ("triton", "cuda")
TRITON_ONLY = pytest.mark.parametrize("fused_backend", ["triton"], indirect=True)


def fused_backend_unavailable(backend: str) -> Optional[str]:
    """None if ``backend`` can run on DEVICE, else why not (patnet_kernels.backends' reason)."""
    from patnet_kernels.backends import BackendUnavailableError, resolve_backend

    try:
        resolve_backend(backend, DEVICE)
    except BackendUnavailableError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def _load_error(backend: str) -> Optional[str]:
    """Import the backend's op modules once (for "cuda": load or build the extension); the
    error, if any, is kept so that a failed build fails every test at once instead of being
    retried by each."""
    modules = (["cuda"] if backend == "cuda"  # (loads, or builds, the extension)
               else ["partial_conv", "channel_attention", "rpe_attention", "self_mixer",
                     "spatial_attention"])
    try:
        for module in modules:
            importlib.import_module(f"patnet_kernels.ops.{module}")
    except Exception as exc:  # CudaBuildFailed, ImportError, a load error ...
        return f"{type(exc).__name__}: {exc}"
    return None


def require_fused_backend(backend: str) -> str:
    """Skip (saying why) where ``backend`` cannot run on DEVICE; fail where it should run but
    its ops cannot be loaded (a broken build is a failure, not a skip). Returns ``backend``."""
    why = fused_backend_unavailable(backend)
    if why is not None:
        pytest.skip(why)
    error = _load_error(backend)
    if error is not None:
        pytest.fail(f"backend={backend!r} is usable here but its ops did not load: "
                    f"{error[-6000:]}", pytrace=False)
    return backend


def fused_ops(backend: str):
    """The ``torch.ops`` namespace of a fused backend: patnet_triton or patnet_cuda (the same
    schemas), with every op registered."""
    require_fused_backend(backend)
    return torch.ops.patnet_cuda if backend == "cuda" else torch.ops.patnet_triton


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request) -> str:
    """Each fused backend by name, skipped with the reason where it cannot run on DEVICE."""
    return require_fused_backend(request.param)


# Error budget of a fused kernel: relative error vs the float64 reference at most
# BUDGET_FACTOR x that of the reference run in the kernel's dtype, plus a floor of a few units
# of that dtype's rounding (the reference may be exact by luck on tiny inputs).
BUDGET_FACTOR = 4.0
BUDGET_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
                torch.float64: 1e-12}


@contextlib.contextmanager
def no_tf32():
    """float32 convolutions and matmuls in full float32 on a GPU (cuDNN's convolutions use TF32
    by default, which would make a float32 reference ~1e-3 off); nothing changes on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
