"""Shared test helpers: where the authors' reference vectors live, error measures, and the fused
backends (the ``fused_backend`` fixture, the op namespace of each)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

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
# The CPU inference path times the reference against each eval form, and F.conv2d against
# oneDNN, on the first call of each kind and keeps the faster (patnet_kernels.cpu_choice), so
# what runs depends on the machine and the run: the suite runs the fixed path (every eval form,
# every convolution on oneDNN), as PATNET_CPU_MEASURE=0 does; tests/test_cpu_choice.py turns
# the timing on.
os.environ["PATNET_CPU_MEASURE"] = "0"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    """Under pytest-xdist (``bash scripts/test.sh`` runs one worker per CPU), give each worker an
    equal share of the CPUs: its torch and BLAS threads (the interpreter's ``tl.dot`` is NumPy's
    matmul) and Inductor's compile pool. Left at their defaults, each of 2 workers on 2 cores ran
    2 threads and the suite gained only 1.16x over one process (each test 1.6-2.6x slower); with
    one thread each, two test files gained 1.66x and the suite about 1.8x. Set in the controller,
    whose environment the workers inherit."""
    workers = config.getoption("numprocesses", None)
    if not workers or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    cpus = os.cpu_count() or 1
    share = 1 if workers in ("auto", "logical") else max(1, cpus // int(workers))
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(share))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _interpreter_rounds_bfloat16_to_nearest() -> None:
    """Make Triton's interpreter convert float32 to bfloat16 as a GPU does: to nearest, ties to
    even (torch's own conversion). Triton 3.9's interpreter rounds toward zero (2017 of 4096
    random values differ, the largest error twice a GPU's), a biased error that accumulates
    through a network's residual sums: a whole bfloat16 inference copy came out at 1.8-1.9x
    the reference's error where a GPU's conversion gives its float16 ratio, 1.0-1.1x."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if (input_dtype == tl.float32 and output_dtype == tl.bfloat16
                and rounding_mode in (None, ir.ROUNDING_MODE.RTNE)):
            as_float = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


# What _interpreter_without_repeated_work replaced, as (owner, attribute, original), for the test
# that the interpreter computes the same without it (tests/test_triton_backend.py).
INTERPRETER_ORIGINALS = []


def _interpreter_without_repeated_work() -> None:
    """Take from Triton's interpreter four costs that change nothing it computes or checks
    (the Triton model tests are the suite's largest part).

    - Before each call of a ``@triton.jit`` function (a kernel's helpers too) it lists every
      member of ``triton.language``, of its tensor class and of ``triton.language.math`` with
      ``inspect.getmembers``, to redirect the builtins among them. The builtins' names are listed
      once here; each call still checks and redirects their current values, in the same order.
    - ``_get_np_dtype`` builds its table of NumPy dtypes at every call: cached per dtype.
    - ``erf`` in float32, one ``math.erf`` call per element: torch's float64 ``erf`` over the
      array, rounded to float32 as before.
    - Its integer overflow check (``sanitize_overflow``) redoes each int32 add, sub and mul in
      int64 and compares, for a ``device_assert`` that drops it unread: its options say
      ``debug=False``, where asserts are not checked (as on a GPU). Off while that holds.
    Together they took two of the heaviest Triton model tests from 30 and 21 s to 15 and 9 s
    (run one after the other on the 2-core machine)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    namespaces = (tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base)
    builtin_names = {namespace: [name for name, member in inspect.getmembers(namespace)
                                 if tl.core.is_builtin(member)] for namespace in namespaces}
    listing_each_call = interpreter._patch_builtin

    def patch_builtin(namespace, builder, scope):
        if namespace not in builtin_names:
            return listing_each_call(namespace, builder, scope)
        for name in builtin_names[namespace]:
            member = getattr(namespace, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(namespace, name, member, builder, scope)

    def erf_float32(values):
        as_double = torch.from_numpy(np.asarray(values, dtype=np.float64))
        return torch.special.erf(as_double).numpy().astype(np.float32)

    building_the_table, scalar_dtypes = interpreter._get_np_dtype, {}

    def np_dtype(triton_dtype):
        if isinstance(triton_dtype, tl.block_type):  # (a block's: its element's)
            triton_dtype = triton_dtype.element_ty
        if isinstance(triton_dtype, tl.pointer_type):  # (unhashable)
            return np.dtype(np.uint64)
        if triton_dtype not in scalar_dtypes:
            scalar_dtypes[triton_dtype] = building_the_table(triton_dtype)
        return scalar_dtypes[triton_dtype]

    options = interpreter.interpreter_builder.options
    INTERPRETER_ORIGINALS.extend(
        [(interpreter, name, getattr(interpreter, name))
         for name in ("_patch_builtin", "_get_np_dtype", "np_erf_fp32")]
        + [(interpreter.interpreter_builder, "options", options)])
    interpreter._patch_builtin = patch_builtin
    interpreter._get_np_dtype = np_dtype
    interpreter.np_erf_fp32 = erf_float32
    if not options.debug:
        interpreter.interpreter_builder.options = dataclasses.replace(options,
                                                                      sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_rounds_bfloat16_to_nearest()
    _interpreter_without_repeated_work()
# float32 means float32 in every test: a GPU's cuDNN convolutions default to TF32, which puts a
# float32 model ~1e-4 off the float64 reference (set at import, so the processes that the DDP
# tests spawn, which import this module, run the same way).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# The fused backends. A test taking the ``fused_backend`` fixture runs once for each (ids
# "triton" / "cuda", so ``-k cuda`` selects one); a test that only one of them serves says so
# with ``@TRITON_ONLY`` (or its own ``parametrize("fused_backend", [...], indirect=True)``).
FUSED_BACKENDS = ("triton", "cuda")
TRITON_ONLY = pytest.mark.parametrize("fused_backend", ["triton"], indirect=True)


def backends_of(op: str):
    """Parametrise a test's ``fused_backend`` over the fused backends with kernels for ``op``
    (patnet_kernels.registry), instead of all of them."""
    from patnet_kernels import registry
    return pytest.mark.parametrize("fused_backend", registry.OPS[op].backends, indirect=True)


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
    from patnet_kernels import registry

    try:
        for op in registry.ops_of(backend):
            registry.load(op, backend)  # (for "cuda": loads, or builds, the extension)
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
# of that dtype's rounding (the reference may be exact by luck on tiny inputs). (The
# interpreter's float32 -> bfloat16 conversion is made to round as a GPU's does, above.)
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


def frozen(t: torch.Tensor) -> torch.nn.Parameter:
    """t as an inference copy holds its weights: a parameter that requires no gradient (what
    the copy's caches key on: autocast's casts, oneDNN's reordered weights)."""
    return torch.nn.Parameter(t, requires_grad=False)


def slowed(function, seconds: float = 0.002):
    """``function`` that first sleeps ``seconds``: a way made slower for a timed choice."""
    import time

    return lambda *args, **kwargs: time.sleep(seconds) or function(*args, **kwargs)


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64 (Frobenius norms), on the CPU
    (so a GPU result can be compared with stored CPU vectors)."""
    actual, expected = (t.detach().to("cpu", torch.float64) for t in (actual, expected))
    diff = (actual - expected).norm().item()
    return diff / max(expected.norm().item(), floor, 1e-300)


def merged_statistics(mean: torch.Tensor, m2: torch.Tensor, pixels: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (mean, sum of squared deviations) over all ``pixels`` of per-chunk statistics in
    partial_block's form ((B, T, C2) each, the chunks of patnet_kernels._types.chunk_layout;
    an empty chunk not read): (B, C2) float64 each, on the CPU (Chan's parallel merge)."""
    from patnet_kernels._types import chunk_counts

    counts = torch.tensor([chunk_counts(pixels, mean.shape[1], b) for b in range(mean.shape[0])],
                          dtype=torch.float64)[:, :, None]
    mean, m2 = (t.detach().to("cpu", torch.float64).masked_fill(counts == 0, 0.0)
                for t in (mean, m2))
    total = (counts * mean).sum(1) / pixels
    return total, m2.sum(1) + (counts * (mean - total[:, None]) ** 2).sum(1)


# Units in the last place (of the largest value) by which two tilings of the same arithmetic
# may differ under the Triton interpreter: see assert_same_arithmetic.
INTERPRETER_TILING_ULPS = 4


def assert_same_arithmetic(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """The same arithmetic over different pixel tiles (a tile spanning samples against tiles of
    one sample, a statistics epilogue's tiles against none) gives the same numbers: bit for
    bit where the kernels are compiled (each output's dot products accumulate in one order
    whatever row of its tile it sits in), within INTERPRETER_TILING_ULPS units in the last
    place of the largest |expected| on the CPU, where the interpreter's ``tl.dot`` is numpy's
    matmul: OpenBLAS picks its kernels by CPU, and some round a row differently by where it
    sits in the matrix (seen on an AMD EPYC, 1-2 ulps; not on the Intel Xeons before it).
    NaNs must sit in the same places."""
    if actual.is_cuda:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True,
                                   msg=msg or None)
        return
    finite = expected[expected.isfinite()]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    ulps = INTERPRETER_TILING_ULPS * torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=ulps, atol=ulps * largest,
                               equal_nan=True, msg=msg or None)


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


def small_inference_model(name: str, backend: str, channels_last: bool = False):
    """(eval model, its ``optimize_for_inference`` copy on ``backend``) of a shrunk variant
    (embed_dim 16, depths 1, 1, 2, 1; random BatchNorm statistics) on DEVICE."""
    import patnet
    from patnet.testing import randomize_norms

    torch.manual_seed(0)
    model = patnet.create_model(name, embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0)
    model = randomize_norms(model, seed=1).eval().to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, patnet.optimize_for_inference(model, backend=backend)


# ------------------------------------------------- torch.compile on the oldest supported torch
# The GPU machines run torch 2.11, CI torch 2.13, and dynamo traces more C builtins in newer
# versions: torch 2.11 cannot trace torch._C._is_autocast_available, which 2.13 can, and that
# broke every compiled model on the first GPU run. So every builtin torch function that dynamo
# resolves while a test compiles is recorded, and a test fails if one is neither an aten op
# binding (traceable in every version) nor listed below as checked on torch 2.11. To add one,
# check that dynamo 2.11 traces it (it is in torch 2.11's torch/_dynamo/trace_rules.py lists
# of in-graph or constant-folded functions, or a compile with torch==2.11 passes).
ATEN_BINDINGS = ("torch._VariableFunctionsClass.", "torch._C._nn.", "torch._C._fft.",
                 "torch._C._linalg.", "torch._C._special.", "torch._C._TensorBase.",
                 "torch._C.TensorBase.")
TRACEABLE_ON_OLDEST_TORCH = frozenset({
    "torch.get_autocast_dtype",
    "torch.is_autocast_enabled",
    "torch.is_grad_enabled",
})
_TRACED_BUILTINS: set = set()


def builtin_name(obj) -> Optional[str]:
    """'module.qualname' of a builtin (C) function, or None for anything else."""
    if type(obj).__name__ != "builtin_function_or_method":
        return None
    module = getattr(obj, "__module__", None)
    if module is None:  # (methods of a module object such as torch._C._nn)
        module = getattr(getattr(obj, "__self__", None), "__name__", "?")
    return f"{module}.{getattr(obj, '__qualname__', obj.__name__)}"


def untraceable_on_oldest_torch(names) -> list:
    """The torch builtins of ``names`` not known to trace on torch 2.11."""
    return sorted(n for n in names if n.startswith("torch") and not n.startswith(ATEN_BINDINGS)
                  and n not in TRACEABLE_ON_OLDEST_TORCH)


def _record_traced_builtins() -> None:
    """Wrap dynamo's trace-rule lookup so that each builtin it resolves is recorded."""
    from torch._dynamo import trace_rules

    lookup = trace_rules.lookup_inner
    if getattr(lookup, "_patnet_recorder", False):
        return

    def recording_lookup(obj, *args, **kwargs):
        name = builtin_name(obj)
        if name is not None:
            _TRACED_BUILTINS.add(name)
        return lookup(obj, *args, **kwargs)

    recording_lookup._patnet_recorder = True
    trace_rules.lookup_inner = recording_lookup


_record_traced_builtins()


@pytest.fixture(autouse=True)
def _compiled_code_traces_on_oldest_torch():
    """Fail a test whose compiled code calls a torch builtin not known to trace on torch 2.11."""
    _TRACED_BUILTINS.clear()
    yield
    bad = untraceable_on_oldest_torch(_TRACED_BUILTINS)
    if bad:
        pytest.fail(f"torch.compile traced {', '.join(bad)}: not known to trace on torch 2.11 "
                    "(the GPU machines' version); avoid the call on compiled paths, or check it "
                    "on torch 2.11 and add it to TRACEABLE_ON_OLDEST_TORCH in tests/conftest.py",
                    pytrace=False)


# ------------------------------------------------------------------ the ahead-of-time compile
# tests/test_triton_aot.py compiles every shipped kernel configuration for sm_90 and sm_80
# (``python -m patnet_kernels.triton.aot``), under the installed Triton and then under the GPU
# machines' (``--gpu-triton``): seconds with a warm Triton cache, many minutes for a changed
# kernel family on 2 cores. Where that test is collected (and not under pytest-xdist,
# whose workers each collect it), the compile starts in the background as collection ends, at
# a lower priority, so that it runs on the CPU time the interpreter tests (one core, mostly)
# leave; the test waits for it and judges its report.
AOT_CHECK_TEST = "test_triton_aot.py::test_every_kernel_compiles_for_sm90_and_sm80"
AOT_CHECK_COMMAND = (sys.executable, "-m", "patnet_kernels.triton.aot", "--arch", "90", "80",
                     "--no-generic", "--gpu-triton")
_AOT_CHECK = {}  # "process" and "output" (its file) of the background run, once started


def compile_env() -> dict:
    """The environment of a real (not interpreted) Triton compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def pytest_collection_finish(session):
    if (os.environ.get("PYTEST_XDIST_WORKER") is None
            and any(item.nodeid.endswith(AOT_CHECK_TEST) for item in session.items)):
        output = tempfile.TemporaryFile(mode="w+")
        _AOT_CHECK["output"] = output
        _AOT_CHECK["process"] = subprocess.Popen(
            AOT_CHECK_COMMAND, cwd=REPO, env=compile_env(), stdout=output,
            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.nice(10))


def aot_check_report(timeout: float = 3600) -> Tuple[int, str]:
    """(exit status, output) of the ahead-of-time compile: the background run's where one was
    started for this session, else a run now."""
    process = _AOT_CHECK.pop("process", None)
    if process is None:
        proc = subprocess.run(AOT_CHECK_COMMAND, cwd=REPO, env=compile_env(),
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    try:
        code = process.wait(timeout=timeout)
    finally:
        process.kill()
    output = _AOT_CHECK.pop("output")
    output.seek(0)
    return code, output.read()


def pytest_sessionfinish(session, exitstatus):
    process = _AOT_CHECK.pop("process", None)  # (the test did not run: -x, an interrupt)
    if process is not None:
        process.kill()
        process.wait()
