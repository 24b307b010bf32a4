"""Every shipped Triton kernel configuration compiles for sm_90 and sm_80 ahead of time.

The interpreter that runs the parity tests on the CPU compiles nothing, so a kernel that the
real compiler rejects, or that needs more shared memory than an H100 / A100 block has, would
pass them. This runs ``python -m patnet_kernels.triton.aot --gpu-triton`` in a process without
TRITON_INTERPRET, under the installed Triton and under the GPU machines' (3.6.0, whose front
end spilled where 3.9 did not): each kernel for each target as a real launch specialises it
(one compile per kind of launch; ``--no-generic`` leaves out the plain signature, which needs
a few KiB more only in fp32 attention kernels far below the limits). A variant listed in the
committed record (``patnet_kernels/triton/aot_record/``: Triton's compile key -> what its
compile showed) is judged from it, so the check takes seconds on a fresh clone; one not listed
(a changed kernel) is compiled, minutes per family on 2 cores, and fails the test until the
record lists it. It runs in the background from the end of collection
(``conftest.pytest_collection_finish``), beside the interpreter tests. A second test checks
that specialisation against Triton's own for real launches, and a third that every configuration
the released models launch on a GPU is on the lists compiled (``tests/released_launches.py``).
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from typing import Tuple

import pytest

from conftest import REPO, aot_check_report, compile_env


def test_every_kernel_compiles_for_sm90_and_sm80():
    # (started in the background when the tests were collected: conftest.aot_check_report)
    import triton
    from patnet_kernels.triton.aot import GPU_MACHINE_TRITON

    code, report = aot_check_report()
    assert code == 0, report[-6000:]
    assert "FAILED" not in report, report[-6000:]
    # Checked under the installed Triton and under the GPU machines' (what the GPU compiles),
    # every variant listed in the committed record (else a fresh clone compiles them all),
    # unless the record is of another build of that version (whose keys none are).
    for version in {triton.__version__, GPU_MACHINE_TRITON}:
        assert re.search(rf" 0 failed \(\d+ variants in \d+ s, Triton {re.escape(version)}: "
                         r"\d+ compiled, \d+ from the record; ", report), (version, report[-6000:])
        assert re.search(rf"Triton {re.escape(version)}: .*; (0 not in the record|the record is "
                         r"of another build)\)", report), (
            "a kernel changed: run python -m patnet_kernels.triton.aot --arch 90 80 "
            "--no-generic --gpu-triton --record and commit patnet_kernels/triton/aot_record/",
            report[-3000:])
    # Every kernel was compiled as launched (NCHW / channels_last / contiguous q, k, v), not only
    # from its plain signature.
    for variant in ("NCHW ", "channels_last ", "contiguous "):
        assert variant in report, report[-6000:]


# Runs without TRITON_INTERPRET: calls the real launchers on CPU tensors with the kernels' run
# method replaced by a recorder, feeds each recorded launch to Triton's own binder (what
# JITFunction.run does on a GPU) and compares the result with aot.specialise for the launch kind.
_SPECIALISATION_CHECK = textwrap.dedent("""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from patnet_kernels.triton import aot, partial_conv, pointwise_mlp, rpe_attention

    backend = make_backend(GPUTarget("cuda", 90, 32))

    def recorded(module, fn_name, launch):
        fn, calls = getattr(module, fn_name), []
        fn.run = lambda *args, grid, warmup, **kwargs: calls.append((args, kwargs))
        try:
            launch()
        finally:
            del fn.run
        assert len(calls) == 1, calls
        return fn, calls[0]

    def check(module, fn_name, kind, launch):
        fn, (args, kwargs) = recorded(module, fn_name, launch)
        bound, spec, options = create_function_from_signature(fn.signature, fn.params,
                                                              backend)(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        kernel = next(k for k in module.aot_kernels() if k.fn is fn and all(
            constexprs[(fn.arg_names.index(n),)] == v for n, v in k.constexprs.items())
            and all(k.signature[n] == t for n, t in signature.items() if t != "constexpr"))
        ours_sig, ours_const, ours_attrs = aot.specialise(kernel, kernel.launches[kind])
        assert ours_sig == signature, (kernel.name, kind, ours_sig, signature)
        ours_const = {(fn.arg_names.index(n),): v for n, v in ours_const.items()}
        assert ours_const == constexprs, (kernel.name, kind, ours_const, constexprs)
        theirs_attrs = {k: v for k, v in attrs.items() if v}
        assert ours_attrs == theirs_attrs, (kernel.name, kind, ours_attrs, theirs_attrs)
        print("same as a launch:", kernel.name, kind)

    # Shapes whose every integer argument is a multiple of 16 (the launch kinds' assumption).
    half = torch.float16
    q, k, v = (torch.randn(2, 16, 64, 64, dtype=half) for _ in range(3))
    table, ids = torch.randn(16, 64), torch.randint(0, 64, (64, 64), dtype=torch.int32)
    check(rpe_attention, "_rpe_fwd_kernel", "contiguous",
          lambda: rpe_attention.rpe_attention_forward(q, k, v, table, ids, 0.125, 0.0, 0))
    w = torch.randn(9, 16, 16, dtype=half)
    for kind, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = torch.randn(2, 64, 32, 32, dtype=half).contiguous(memory_format=fmt)
        y = torch.empty_like(x)
        check(partial_conv, "_conv3x3_passthrough_kernel", kind,
              lambda: partial_conv.conv3x3_passthrough(x, w, y, True))
        # the MLP as a FasterNet-T1 block calls it: a conv head, the residual, GELU, b1, no b2
        w1, b1, w2 = torch.randn(128, 64, dtype=half), torch.randn(128, dtype=half), \
            torch.randn(64, 128, dtype=half)
        check(pointwise_mlp, "_pointwise_mlp_kernel", kind,
              lambda: pointwise_mlp.pointwise_mlp(x, w1, b1, w2, None, x, "gelu", y,
                                                  conv_taps=w))
        # as a PATNet-T1 block calls it: also PAT_ch's affine, the statistics and PAT_sp
        sp = pointwise_mlp.SpatialAttention(
            torch.randn(32, dtype=half), torch.randn(32, 32, dtype=half),
            torch.randn(32, dtype=half), tuple(torch.rand(32) for _ in range(4)), 1e-5, None,
            0.0)
        scale, stats = torch.rand(2, 48), (torch.empty(2, 32, 48), torch.empty(2, 32, 48))
        check(pointwise_mlp, "_pointwise_mlp_kernel", kind,
              lambda: pointwise_mlp.pointwise_mlp(x, w1, b1, w2, None, x, "gelu", y,
                                                  conv_taps=w, scale=scale, shift=scale,
                                                  statistics=stats, stats_first=16,
                                                  spatial=sp))
""")


def test_aot_specialisation_matches_triton_launches():
    proc = subprocess.run([sys.executable, "-c", _SPECIALISATION_CHECK], cwd=REPO, env=compile_env(),
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert report.count("same as a launch:") == 7, report[-6000:]


def test_machine_code_problems():
    """The machine-code check: spills beyond the pinned stack, and an fp16/bf16 dot without
    tensor-core instructions, fail; a listed kernel within its pin passes."""
    from patnet_kernels.triton import aot

    clean = aot.MachineCode(registers=96, stack=0, spills=0, mma=8, half_dot=True,
                            wide_loads=4, narrow_loads=0)
    assert aot.machine_code_problems("any[fp16]", clean) == []
    fma = clean._replace(mma=0)
    assert "FMA" in aot.machine_code_problems("any[fp16]", fma)[0]
    assert aot.machine_code_problems("any[fp32]", fma._replace(half_dot=False)) == []
    spilled = clean._replace(stack=64, spills=30)
    assert "64 B of stack" in aot.machine_code_problems("new_kernel[fp16]", spilled)[0]
    name, pinned = next(iter(aot.KNOWN_SPILLS.items()))
    assert aot.machine_code_problems(name, clean._replace(stack=pinned)) == []
    assert "more than the" in aot.machine_code_problems(name, clean._replace(stack=pinned + 8))[0]


# Runs without TRITON_INTERPRET: the first kernel of partial_conv for sm_90 as launched on NCHW
# inputs, judged from a record entry that says it spills (Triton's compile made to fail, so
# only the record can answer), then with an empty record (so it is compiled: that failure).
_RECORD_CHECK = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from patnet_kernels.triton import aot

    kernel = aot._kernels("partial_conv")[0]
    index = [name for name, _ in aot.variants(kernel, False)].index("NCHW")
    job = ("partial_conv", 0, 90, index, False)
    signature, constexprs, attrs = aot.specialise(kernel, kernel.launches["NCHW"])
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    key = aot.compile_key(source, 90, dict(num_warps=kernel.num_warps,
                                          num_stages=kernel.num_stages, **kernel.options))

    def refuse(*args, **kwargs):
        raise RuntimeError("compiled")

    triton.compile = refuse
    aot._use_record({key: [kernel.name, 90, "NCHW", 1024, 80, 4096, 12, 0, False, 0, 0]})
    got = aot._compile(job)
    assert got.recorded and got.key == key and got.shared == 1024, got
    assert "spills: 4096 B of stack per thread (12 LDL/STL)" in got.error, got
    aot._use_record({})
    got = aot._compile(job)
    assert not got.recorded and got.error == "RuntimeError: compiled", got
    print("judged from the record")
""")


def test_a_recorded_variant_is_judged_without_compiling():
    proc = subprocess.run([sys.executable, "-c", _RECORD_CHECK], cwd=REPO, env=compile_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "judged from the record" in proc.stdout, (
        proc.stdout + proc.stderr)[-6000:]


def test_record_keeps_one_line_per_variant(tmp_path, monkeypatch):
    from patnet_kernels.triton import aot

    monkeypatch.setattr(aot, "RECORD_DIR", tmp_path / "aot_record")
    entries = {"b" * 64: ["k[fp16]", 90, "NCHW", 0, 40, 0, 0, 2, True, 1, 0],
               "a" * 64: ["k[fp16]", 80, "NCHW", 0, 40, 0, 0, 2, True, 1, 0],
               "c" * 64: ["j[fp32]", 90, "channels_last", 512, 96, 8, 2, 0, False, 0, 4]}
    aot.write_record("9.9.9", "f" * 64, entries)
    assert aot.load_record("9.9.9") == ("f" * 64, entries)
    assert aot.load_record("1.0.0") == ("", {})
    lines = aot.record_path("9.9.9").read_text().splitlines()
    assert len(lines) == 5 and lines[0] == '{"triton": "' + "f" * 64 + '", "variants": {'
    assert lines[1].startswith('  "' + "c" * 64)  # (by kernel, then arch)
    assert lines[2].startswith('  "' + "a" * 64) and lines[3].startswith('  "' + "b" * 64)


def test_machine_code_reads_each_cubin_once(tmp_path, monkeypatch):
    """The disassembly of a cubin is read once and kept (a warm rerun disassembles nothing);
    another cubin is read anew; a reading is kept whole or not at all."""
    from patnet_kernels.triton import aot

    sass = ("Function : k\n REG:40 STACK:16 SHARED:0\n"
            "  HGMMA.64x64x16.F32 R0, gdesc[UR4], R0 ;\n  LDL R2, [R1] ;\n  STL [R1], R2 ;\n"
            "  LDG.E.128 R4, desc[UR6][R2.64] ;\n  LDG.E.U16 R5, desc[UR6][R2.64] ;\n")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=sass, stderr="")

    monkeypatch.setattr(aot, "machine_code_cache", lambda: tmp_path / "readings")
    monkeypatch.setattr(aot.subprocess, "run", fake_run)
    ttir = "%0 = tt.dot %a, %b, %c : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32>"
    first = aot.machine_code(b"cubin one", ttir)
    assert first == aot.MachineCode(registers=40, stack=16, spills=2, mma=1, half_dot=True,
                                    wide_loads=1, narrow_loads=1)
    assert aot.machine_code(b"cubin one", "") == first._replace(half_dot=False)
    assert len(calls) == 1
    aot.machine_code(b"cubin two", ttir)
    assert len(calls) == 2
    assert sorted(p.suffix for p in (tmp_path / "readings").iterdir()) == [".json", ".json"]


def test_gpu_triton_overlay(tmp_path, monkeypatch):
    """The GPU machines' Triton is installed once into a folder of its own (the marker written
    last: a half-finished install is redone); a failed install says what to run."""
    from patnet_kernels.triton import aot

    monkeypatch.setenv("PATNET_TRITON_OVERLAY_DIR", str(tmp_path))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        (tmp_path / "triton-9.9.9" / "triton").mkdir(parents=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(aot.subprocess, "run", fake_pip)
    folder = aot.triton_overlay("9.9.9")
    assert folder == tmp_path / "triton-9.9.9" and (folder / ".installed").read_text() == "9.9.9"
    assert calls[0][-3:] == ["--target", str(folder), "triton==9.9.9"]
    assert aot.triton_overlay("9.9.9") == folder and len(calls) == 1  # (kept)
    (folder / ".installed").unlink()  # (an install cut short: redone from scratch)
    monkeypatch.setattr(aot.subprocess, "run",
                        lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match=r"could not install triton==9\.9\.9 .* run: .*pip"):
        aot.triton_overlay("9.9.9")
    assert not folder.exists()


def _released_launches(*args: str) -> Tuple[int, str]:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "released_launches.py"), *args],
                          cwd=REPO, env=compile_env(), capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_released_models_launch_only_configurations_compiled_ahead_of_time():
    """Each released model's inference copy and training step (fp32, fp16 autocast, cast to
    bf16; NCHW and channels_last; 224 x 224) launches only kernel configurations that the AOT
    check compiles: the launchers choose tiles from widths, dtypes, layouts and map sizes, and
    the families list theirs by hand, so a launch they miss would be compiled first on a GPU,
    unchecked (as the FasterNet-T0 conv with 10 channels, PAT_sf's training output with its
    residual, the attention kernels with dropout and PAT_ch's gate with the BatchNorms of a
    bf16 model were)."""
    code, report = _released_launches()
    assert code == 0, report[-6000:]
    assert re.search(r"covered: \d{5,} launches, 0 configurations missing", report), report


def test_released_launches_check_notices_a_missing_configuration():
    # (FasterNet-T1's training step runs its 16-channel PConv in fp32 with this one)
    name = "conv3x3_passthrough[fp32, CI=16, CO=16, copy=64]"
    code, report = _released_launches("--models", "fasternet_t1", "--without", name)
    assert code == 1, report[-6000:]
    assert "not compiled ahead of time: _conv3x3_passthrough_kernel" in report, report


def test_distinct_configurations_drops_repeats_and_refuses_a_shared_name():
    # (every family's aot_kernels() ends with it: the released-launches check imports them all)
    from patnet_kernels.triton._common import AotKernel, distinct_configurations

    def kernel(name, warps=4):
        return AotKernel(name, print, {"x_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 64},
                         num_warps=warps)

    first = kernel("k[fp16, 64]")
    kept = distinct_configurations([first, kernel("k[fp16, 64]"), kernel("j")])
    assert [k.name for k in kept] == ["k[fp16, 64]", "j"] and kept[0] is first
    with pytest.raises(ValueError, match="put what tells them apart into the name"):
        distinct_configurations([first, kernel("k[fp16, 64]", warps=8)])
