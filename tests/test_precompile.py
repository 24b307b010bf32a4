"""benchmarks/precompile.py: the kernels it compiles ahead are those a run's own launches then
find in Triton's cache.

Runs without TRITON_INTERPRET, in a process of its own (it makes the Triton backend take CPU
tensors for good): FasterNet-T0's inference copy at 64 x 64, fp16 autocast, channels_last,
its stem and merging layers' kernels (the patch_conv family: few and quick to compile)
precompiled for sm_90 into an empty cache; then the same model run through Triton's real JIT
path (``JITFunction.run``: binder, cache key, compile), nothing loaded or launched, must find
every one of those kernels in the cache (the precompile's own runs tell a compile from a cache
hit the same way: Triton's compilation listener).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO, compile_env

_CHECK = textwrap.dedent("""
    import torch
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from benchmarks import precompile
    from benchmarks.gpu_launches import run_model

    mode = ["--models", "fasternet_t0", "--batch", "2", "--size", "64", "--kinds", "inference",
            "--precisions", "fp16", "--layouts", "channels_last", "--jobs", "2"]
    assert precompile.main(mode + ["--families", "patch_conv"]) == 0
    assert precompile.main(mode + ["--families", "patch_conv"]) == 0  # (all cached now)

    def no_load(self):  # a compiled kernel is neither loaded nor run
        self.module = self.function = 0
        self._run = lambda *args, **kwargs: None

    CompiledKernel._init_handles = no_load
    compiled = []
    knobs.compilation.listener = lambda *, src, cache_hit, **_: compiled.append(
        (src.fn.__name__, cache_hit))

    def only_patch_conv(*, fn, **_):  # (True: skip the compile)
        return fn.name != "_patch_conv_kernel"

    knobs.runtime.jit_cache_hook = only_patch_conv
    (label, model, training, x, amp), = precompile.modes(["fasternet_t0"], [2], 64,
                                                         ["inference"], ["fp16"],
                                                         ["channels_last"])
    run_model(model, x, training, amp)
    patch = [hit for name, hit in compiled if name == "_patch_conv_kernel"]
    assert len(patch) == 4 and all(patch), compiled
    print("replayed:", compiled)
""")


def test_precompiled_kernels_are_what_the_launches_find(tmp_path):
    env = {**compile_env(), "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    env.pop("TRITON_DEFAULT_FP_FUSION")  # (as on the GPU machines: unset)
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "replayed:" in proc.stdout, report[-6000:]
    assert "precompiled 4 kernels: 4 compiled, 0 already in the cache, 0 failed" in report, report
    assert "precompiled 4 kernels: 0 compiled, 4 already in the cache, 0 failed" in report, report
