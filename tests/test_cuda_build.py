"""The CUDA backend's build, on any machine: which environment gives which build, the errors
without one, the nvcc compile of every kernel file for sm_80 / sm_90, the host compile of
bindings.cpp in its real CUDA form, the JIT loader's build lock, and the CPU emulation the other
CUDA tests run the kernels through."""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import _cuda_ext, backends
from patnet_kernels._build import (DEFAULT_ARCH_LIST, CudaBuildError, decide_cuda_build,
                                   find_cuda_home)

from conftest import REPO

CUDA_TORCH = "12.8"
TOOLKIT = str(REPO / "tests" / "data" / "fake_cuda_toolkit")  # (include/cuda_runtime.h, empty)


# ------------------------------------------------------------------ the build decision
@pytest.mark.parametrize("env, torch_cuda, cuda_home, build, reason", [
    ({}, CUDA_TORCH, TOOLKIT, True, f"CUDA toolkit at {TOOLKIT}"),
    ({}, None, TOOLKIT, False, "CPU build"),
    ({}, CUDA_TORCH, None, False, "no CUDA toolkit"),
    ({"FORCE_CUDA": "1"}, CUDA_TORCH, TOOLKIT, True, "FORCE_CUDA=1"),
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, CUDA_TORCH, TOOLKIT, True, "TORCH_CUDA_ARCH_LIST=9.0"),
    ({"PATNET_SKIP_CUDA_BUILD": "1"}, CUDA_TORCH, TOOLKIT, False, "PATNET_SKIP_CUDA_BUILD"),
    ({"PATNET_SKIP_CUDA_BUILD": "1", "FORCE_CUDA": "1"}, None, None, False,
     "PATNET_SKIP_CUDA_BUILD"),
    ({"FORCE_CUDA": "0"}, None, TOOLKIT, False, "CPU build"),
])
def test_build_decision(env, torch_cuda, cuda_home, build, reason):
    decision = decide_cuda_build(env, torch_cuda, cuda_home)
    assert decision.build is build
    assert reason in decision.reason


def test_build_decision_never_looks_at_a_gpu(monkeypatch):
    """The same environment gives the same decision whether a GPU is visible or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not decide_cuda_build({}, None, TOOLKIT).build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decide_cuda_build({}, CUDA_TORCH, TOOLKIT).build


def test_arch_list_and_max_jobs():
    default = decide_cuda_build({}, CUDA_TORCH, TOOLKIT)
    assert default.arch_list == DEFAULT_ARCH_LIST and default.max_jobs is None
    chosen = decide_cuda_build({"TORCH_CUDA_ARCH_LIST": "8.6", "MAX_JOBS": "3"}, CUDA_TORCH,
                               TOOLKIT)
    assert chosen.arch_list == "8.6" and chosen.max_jobs == 3
    with pytest.raises(CudaBuildError, match="MAX_JOBS must be a positive integer"):
        decide_cuda_build({"MAX_JOBS": "many"}, CUDA_TORCH, TOOLKIT)


@pytest.mark.parametrize("env, torch_cuda, cuda_home, message", [
    ({"FORCE_CUDA": "1"}, None, TOOLKIT, "FORCE_CUDA=1 asks for the CUDA extension, but the "
                                         "installed PyTorch is a CPU build"),
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, CUDA_TORCH, None, "no CUDA toolkit was found"),
])
def test_forced_build_that_cannot_happen_is_an_error(env, torch_cuda, cuda_home, message):
    with pytest.raises(CudaBuildError, match=message):
        decide_cuda_build(env, torch_cuda, cuda_home)


def test_toolkit_without_headers_builds_nothing(tmp_path, monkeypatch):
    """A root without CUDA's headers (an nvcc wrapper script in /usr/local/bin makes torch take
    /usr/local) is refused before any compile, saying to set CUDA_HOME."""
    root = str(tmp_path)
    decision = decide_cuda_build({}, CUDA_TORCH, root)
    assert not decision.build and "has no include/cuda_runtime.h" in decision.reason
    assert "set CUDA_HOME" in decision.reason
    with pytest.raises(CudaBuildError, match="FORCE_CUDA=1 asks .* no include/cuda_runtime.h"):
        decide_cuda_build({"FORCE_CUDA": "1"}, CUDA_TORCH, root)
    monkeypatch.setattr(torch.version, "cuda", CUDA_TORCH)
    monkeypatch.setenv("CUDA_HOME", root)
    ok, why = _cuda_ext.jit_possible()
    assert not ok and "has no include/cuda_runtime.h" in why
    monkeypatch.setenv("CUDA_HOME", TOOLKIT)
    assert "cuda_runtime.h" not in _cuda_ext.jit_possible()[1]


def test_find_cuda_home(tmp_path):
    assert find_cuda_home({"CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"
    nvcc = tmp_path / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert find_cuda_home({"PATH": str(nvcc.parent)}) == str(tmp_path / "toolkit")
    assert find_cuda_home({"PATH": str(tmp_path)}) is None


def _setup_py(env_updates):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "PATNET_SKIP_CUDA_BUILD")}
    env.update(env_updates)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: setup.py "
                    "would build the extension, which is the GPU machine's job")
def test_setup_py_says_what_it_decided():
    skipped = _setup_py({"PATNET_SKIP_CUDA_BUILD": "1"})
    assert skipped.returncode == 0, skipped.stderr
    assert "CUDA extension not built: PATNET_SKIP_CUDA_BUILD=1 is set" in skipped.stderr
    plain = _setup_py({})
    assert plain.returncode == 0 and "not built: the installed PyTorch is a CPU build" in \
        plain.stderr
    forced = _setup_py({"FORCE_CUDA": "1"})
    assert forced.returncode != 0
    assert "FORCE_CUDA=1 asks for the CUDA extension" in forced.stderr


# ------------------------------------------------------------------ nvcc compile check
def test_every_cuda_file_compiles_for_sm80_and_sm90():
    """nvcc -c of csrc/kernels/*.cu for sm_80 and sm_90: a CUDA syntax or type error fails here
    on a machine without a GPU (CI's nvcc is required; elsewhere a missing nvcc skips)."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH (and CUDA_HOME is unset): CI must compile the "
                        "CUDA kernels")
        pytest.skip("nvcc is not on PATH: the CUDA kernels' compile check needs the CUDA toolkit")
    proc = subprocess.run([sys.executable, "scripts/nvcc_check.py", "--arch", "80", "90",
                           "--only", "kernels"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-8000:]
    for family in _cuda_ext.KERNEL_FAMILIES:
        assert f"{family}.cu: ok" in report, report[-8000:]
    assert "sm_80" in report and "sm_90" in report


def test_nvcc_check_remembers_only_unchanged_successes(tmp_path, monkeypatch):
    """A successful compile is reported again without nvcc while nothing that decides it has
    changed; a changed header, other flags or another nvcc compile anew; a failure is never
    remembered."""
    check = runpy.run_path(str(REPO / "scripts" / "nvcc_check.py"))
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    source = kernels / "op.cu"
    source.write_text('#include "common.cuh"\n')
    (kernels / "common.cuh").write_text("// v1\n")
    ptxas = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
             "ptxas info    : Used 40 registers, 1024 bytes smem\n")
    calls, returncode = [], [0]

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[0] == "c++filt":
            return subprocess.CompletedProcess(cmd, 0, stdout=kwargs["input"], stderr="")
        return subprocess.CompletedProcess(cmd, returncode[0], stdout="", stderr=ptxas)

    monkeypatch.setitem(check["compile_file"].__globals__, "KERNELS", kernels)
    monkeypatch.setitem(check["compile_file"].__globals__, "_cache_dir",
                        lambda: tmp_path / "cache")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # (no c++filt: names as they are)

    def compile_(version="nvcc 13.0", archs=(90,)):
        before = len(calls)
        _, ok, seconds, _, rows = check["compile_file"]("nvcc", source, archs, version)
        return ok, seconds < 0, len(calls) > before, rows

    assert compile_() == (True, False, True, [("_Z1kv", "sm_90", 40, 0, 1024)])
    assert compile_() == (True, True, False, [("_Z1kv", "sm_90", 40, 0, 1024)])
    assert compile_(archs=(80, 90))[2] and compile_(version="nvcc 13.1")[2]
    (kernels / "common.cuh").write_text("// v2\n")
    returncode[0] = 1
    assert compile_()[:3] == (False, False, True)
    assert compile_()[:3] == (False, False, True)  # (the failure ran nvcc again)


# ------------------------------------------------------------------ bindings.cpp, CUDA form
# The emulation build (PATNET_CUDA_EMULATE=1) every other test runs compiles bindings.cpp with
# PATNET_EMULATE defined, so its real CUDA form was first compiled on a GPU machine, where it
# failed (gpu-reports/h200-2026-12-04). scripts/nvcc_check.py compiles that form here, with
# g++ -fsyntax-only against this torch's headers (CUDA library headers a CPU wheel lacks come from
# the stand-ins of tests/data/cuda_stub_headers) and the CUDA toolkit's runtime headers.
@pytest.fixture(scope="module")
def nvcc_check():
    return SimpleNamespace(**runpy.run_path(str(REPO / "scripts" / "nvcc_check.py")))


def _bindings_check(nvcc_check, source):
    ok, output = nvcc_check.bindings_check(source)
    if ok is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must compile bindings.cpp in its CUDA form, but here: {output}")
        pytest.skip(f"bindings.cpp's CUDA form cannot be compiled here: {output}")
    return ok, output


def test_bindings_compile_in_their_cuda_form(nvcc_check):
    ok, output = _bindings_check(nvcc_check, REPO / "csrc" / "bindings.cpp")
    assert ok, f"csrc/bindings.cpp does not compile in its CUDA form:\n{output[-8000:]}"


def test_bindings_check_sees_the_cuda_form(nvcc_check, tmp_path):
    """The check compiles the CUDA branch, not the emulation's: an error only that branch has
    (the guard of the first GPU run, a CUDAGuard built from a Tensor) fails it."""
    broken = tmp_path / "bindings.cpp"
    broken.write_text((REPO / "csrc" / "bindings.cpp").read_text() + textwrap.dedent("""
        #ifndef PATNET_EMULATE
        #include <c10/cuda/CUDAGuard.h>
        void guard_built_from_a_tensor(const at::Tensor& x) { c10::cuda::CUDAGuard guard(x); }
        #endif
    """))
    ok, output = _bindings_check(nvcc_check, broken)
    assert not ok and "guard_built_from_a_tensor" in output and "CUDAGuard" in output, output


# ------------------------------------------------------------------ errors without a build
def test_cuda_backend_on_cpu_tensors_without_emulation_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PATNET_CUDA_EMULATE", "0")
    x, w = torch.randn(1, 4, 3, 3), torch.randn(1, 1, 3, 3)
    with pytest.raises(pk.BackendUnavailableError, match="PATNET_CUDA_EMULATE=1"):
        pk.partial_conv3x3(x, w, backend="cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_cuda_backend_with_a_cpu_torch_says_how_to_build(monkeypatch):
    monkeypatch.setenv("PATNET_CUDA_EMULATE", "0")
    ok, why = backends._cuda_status(torch.device("cuda"))
    assert not ok and "CPU build" in why and "FORCE_CUDA=1 pip install" in why
    monkeypatch.setattr(_cuda_ext, "_LOADED", None)
    with pytest.raises(_cuda_ext.CudaBuildFailed, match="cannot be JIT-built here: this PyTorch "
                       "is a CPU build.*FORCE_CUDA=1 pip install"):
        _cuda_ext.load()


def test_emulation_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setenv("PATNET_CUDA_EMULATE", "1")
    ok, why = backends._cuda_status(torch.device("cuda"))
    assert not ok and "unset it" in why


def test_info_reports_the_cuda_backend():
    cuda = pk.info()["backends"]["cuda"]
    assert isinstance(cuda["available"], bool) and cuda["reason"]


def test_cuda_backend_has_no_spatial_attention_kernel():
    assert "spatial_attention" not in backends.CUDA_OPS
    with pytest.raises(pk.BackendUnavailableError, match="has no kernel for spatial_attention; "
                                                         "use backend='triton' or 'auto'"):
        backends.choose_backend("cuda", None, "spatial_attention")


# ------------------------------------------------------------------ loader and emulator
_PROBE = REPO / "tests" / "data" / "emulator_probe.cpp"

_LOAD_PROBE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from patnet_kernels import _cuda_ext
    _cuda_ext.jit_load("patnet_emulator_probe", [Path(sys.argv[1])], cuda=False)
    print("loaded", torch.ops.patnet_emulator_probe.half_bits_to_float(
        torch.tensor([15360], dtype=torch.int16)).item())
""")


@pytest.fixture(scope="module")
def emulator_probe(tmp_path_factory):
    """Builds the probe library in two processes started at once (one fresh build directory),
    then loads it here."""
    build_root = tmp_path_factory.mktemp("jit")
    env = dict(os.environ, PATNET_CUDA_BUILD_DIR=str(build_root))
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_PROBE, str(_PROBE)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-4000:]
        assert "loaded 1.0" in out, out + err[-2000:]
    old = os.environ.get("PATNET_CUDA_BUILD_DIR")
    os.environ["PATNET_CUDA_BUILD_DIR"] = str(build_root)
    try:
        _cuda_ext.jit_load("patnet_emulator_probe", [_PROBE], cuda=False)
    finally:
        if old is None:
            del os.environ["PATNET_CUDA_BUILD_DIR"]
        else:
            os.environ["PATNET_CUDA_BUILD_DIR"] = old
    return torch.ops.patnet_emulator_probe


def test_two_processes_building_at_once_both_load(emulator_probe):
    assert emulator_probe.half_bits_to_float(torch.tensor([0x3C00], dtype=torch.int16)).item() \
        == 1.0


def test_emulated_half_conversions_equal_torch(emulator_probe):
    every_half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    ours = emulator_probe.half_bits_to_float(every_half)
    theirs = every_half.view(torch.float16).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    gen = torch.Generator().manual_seed(0)
    floats = torch.cat([
        torch.randn(200000, generator=gen) * torch.exp2(torch.randint(-30, 20, (200000,),
                                                                      generator=gen).float()),
        ours[~ours.isnan()],  # every half value exactly, and the midpoints between neighbours
        (ours[~ours.isnan()][:-1] + ours[~ours.isnan()][1:]) / 2,
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 1e-8, 6e-8])])
    floats = floats[floats.isfinite() | floats.isinf()]
    assert torch.equal(emulator_probe.float_to_half_bits(floats),
                       floats.half().view(torch.int16))
    assert torch.equal(emulator_probe.float_to_bfloat16_bits(floats),
                       floats.bfloat16().view(torch.int16))


def test_emulated_barriers_and_shuffles(emulator_probe):
    x = torch.randn(512)
    reversed_, sums = emulator_probe.block_probe(x)
    expected = x.view(2, 256).flip(1).reshape(-1)
    assert torch.equal(reversed_, expected)
    torch.testing.assert_close(sums, expected.view(16, 32).sum(1))


def test_emulator_detects_a_divergent_barrier(emulator_probe):
    with pytest.raises(RuntimeError, match="divergent barrier"):
        emulator_probe.divergent_barrier(torch.zeros(1))


def test_the_registry_limits_match_the_kernels():
    """The attention limits the registry declares (what "auto" and the errors use) are those
    of the kernels: kMaxTokens and kMaxHeadDim of launchers.h, Triton's MAX_HEAD_DIM."""
    from patnet_kernels import registry
    from patnet_kernels.triton import rpe_attention

    text = (REPO / "csrc" / "kernels" / "launchers.h").read_text()
    assert f"constexpr int kMaxTokens = {registry.CUDA_MAX_TOKENS};" in text
    assert f"constexpr int kMaxHeadDim = {registry.MAX_HEAD_DIM};" in text
    assert rpe_attention.MAX_HEAD_DIM == registry.MAX_HEAD_DIM


def test_a_build_lock_left_behind_is_named_not_waited_on_for_ever(tmp_path):
    """A build killed midway leaves torch's lock file in its build directory, on which torch
    would wait for ever: a load waits for it at most its time limit, warning once and naming
    it, then refuses, naming it; a lock that goes away ends the wait; no lock, no wait."""
    import re
    import threading

    lock = tmp_path / "lock"
    lock.write_text("")
    with pytest.warns(UserWarning, match="waiting for another process's build"), \
            pytest.raises(_cuda_ext.CudaBuildFailed,
                          match=f"the build lock {re.escape(str(lock))} is still held after"):
        _cuda_ext.wait_for_build_lock(tmp_path, timeout=0.3)
    threading.Timer(0.3, lock.unlink).start()
    with pytest.warns(UserWarning, match=re.escape(str(lock))):
        _cuda_ext.wait_for_build_lock(tmp_path, timeout=30)
    assert not lock.exists()
    _cuda_ext.wait_for_build_lock(tmp_path, timeout=0)
