"""backend="auto": a fused backend only where committed GPU measurements show it faster than the
reference (patnet_kernels/auto_rule.py, patnet_kernels/measured_speed.json), else the reference;
the decision made in one place (backends.choose_backend), traceable by torch.compile, and
reported by backend_plan() and info().

The GPU is simulated: the fused backends' status and the device name are patched, nothing runs
on a GPU."""
from __future__ import annotations

import contextlib

import pytest
import torch

import patnet
import patnet_kernels as pk
from patnet_kernels import auto_rule, backends, registry
from patnet_kernels.auto_rule import Call

from benchmarks import update_auto_rule

H200 = "NVIDIA H200"
GPU = torch.device("cuda", 0)


@contextlib.contextmanager
def simulated_gpu(monkeypatch, name=H200, usable=("triton", "cuda")):
    """A GPU named ``name`` on which the fused backends of ``usable`` can run."""
    status = dict(backends._STATUS)
    for backend in ("triton", "cuda"):
        ok = backend in usable
        status[backend] = lambda device, ok=ok: (ok, "usable" if ok else "not built here")
    monkeypatch.setattr(backends, "_STATUS", status)
    monkeypatch.setattr(backends, "gpu_name", lambda device: name)
    backends.forget_decisions()
    try:
        yield
    finally:
        backends.forget_decisions()


def _point(ms, op="partial_conv3x3", shape=(256, 96, 3136), dtype="float16", mode="fwd",
           layout="nchw", gpu=H200):
    return auto_rule.Point(gpu, Call(op, dtype, mode, layout, shape), ms, "test")


# ---------------------------------------------------------------------------- the rule itself
def test_a_fused_backend_measured_faster_is_chosen():
    point = _point({"torch": 0.6, "triton": 0.3, "cuda": 0.4})
    name, reason = auto_rule.choose(H200, point.call, ("triton", "cuda"), [point])
    assert name == "triton"
    assert "measured faster than the reference" in reason and "torch 600 us" in reason


def test_the_reference_wins_where_every_fused_backend_is_slower_or_only_as_fast():
    slower = _point({"torch": 0.3, "triton": 0.6})
    assert auto_rule.choose(H200, slower.call, ("triton",), [slower])[0] == "torch"
    # within the margin: noise, not a win
    tie = _point({"torch": 1.0, "triton": 1.0 / (auto_rule.MARGIN * 0.99)})
    assert auto_rule.choose(H200, tie.call, ("triton",), [tie])[0] == "torch"


def test_only_usable_backends_are_chosen():
    point = _point({"torch": 0.6, "triton": 0.3, "cuda": 0.2})
    assert auto_rule.choose(H200, point.call, ("triton",), [point])[0] == "triton"
    assert auto_rule.choose(H200, point.call, (), [point])[0] == "torch"


@pytest.mark.parametrize("change", [
    dict(gpu="NVIDIA A100-SXM4-80GB"), dict(dtype="bfloat16"), dict(mode="fwd+bwd"),
    dict(layout="channels_last"), dict(shape=(256, 96, 3136 * 3)), dict(shape=(1, 96, 3136)),
    dict(op="channel_attention"),
], ids=["other_gpu", "other_dtype", "other_mode", "other_layout", "far_size", "far_batch",
        "other_op"])
def test_without_a_measurement_of_its_class_the_reference_runs(change):
    point = _point({"torch": 0.6, "triton": 0.3})
    gpu = change.pop("gpu", H200)
    call = point.call._replace(**change)
    name, reason = auto_rule.choose(gpu, call, ("triton", "cuda"), [point])
    assert name == "torch" and "no measurement of" in reason


def test_a_nearby_shape_takes_the_nearest_measurement():
    fast = _point({"torch": 0.6, "triton": 0.3}, shape=(256, 96, 3136))
    slow = _point({"torch": 0.1, "triton": 0.3}, shape=(256, 512, 49))
    near_fast = Call("partial_conv3x3", "float16", "fwd", "nchw", (128, 128, 2500))
    assert auto_rule.choose(H200, near_fast, ("triton",), [fast, slow])[0] == "triton"
    near_slow = Call("partial_conv3x3", "float16", "fwd", "nchw", (256, 400, 64))
    assert auto_rule.choose(H200, near_slow, ("triton",), [fast, slow])[0] == "torch"


def test_auto_never_picks_a_backend_measured_slower_than_the_reference():
    """Every committed point: the backend auto picks there is the reference or measured faster
    than it by the margin."""
    points = auto_rule.measured_points()
    assert points, "patnet_kernels/measured_speed.json has no measurement"
    for point in points:
        name, _ = auto_rule.choose(point.gpu, point.call, auto_rule.FUSED, [point])
        assert name == "torch" or point.ms["torch"] / point.ms[name] >= auto_rule.MARGIN, point


def test_the_committed_measurements_are_those_of_the_committed_reports(capsys):
    """measured_speed.json is what `python -m benchmarks.update_auto_rule` makes of the reports
    under benchmarks/results (regenerate and commit it after adding a report)."""
    assert update_auto_rule.main(["--check"]) == 0, capsys.readouterr().err


def test_the_first_h200_report_gives_the_rule_it_measured():
    """From the first H200 run (fp16, batch 256, NCHW): Triton's PConv was faster than eager at
    FasterNet-T2's stages 1-3 only; PAT_ch and the N = 49 attention were slower everywhere."""
    lines = auto_rule.summary(H200)
    chosen = {line.rsplit(": ", 1)[0]: line.rsplit(": ", 1)[1] for line in lines}
    assert chosen["partial_conv3x3 float16 fwd nchw 256x96x3136"] == "triton"
    assert chosen["partial_conv3x3 float16 fwd nchw 256x384x196"] == "triton"
    assert chosen["partial_conv3x3 float16 fwd nchw 256x512x49"] == "torch"
    assert {v for k, v in chosen.items() if k.startswith(("channel_attention", "rpe"))} == {
        "torch"}


def test_update_refuses_a_missing_report_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        update_auto_rule.main([str(tmp_path / "nowhere")])
    assert "no such report folder" in capsys.readouterr().err


def test_update_takes_gpu_reports_only_and_the_newest(tmp_path):
    def report(date, ms, device_type="cuda"):
        return {"benchmark": "partial_conv", "device": H200, "device_type": device_type,
                "date": date, "settings": {"layout": "NCHW (contiguous)"},
                "rows": [{"shape": "s1", "batch": 8, "channels": 16, "height": 4, "width": 4,
                          "dtype": "fp16", "mode": "fwd",
                          "providers": {"torch": {"status": "ok", "ms": 1.0},
                                        "triton": {"status": "ok", "ms": ms},
                                        "cuda": {"status": "error", "error": "build"}}}]}
    import json
    for name, data in (("old.json", report("2026-01-01", 2.0)),
                       ("new.json", report("2026-02-01", 0.5)),
                       ("cpu.json", report("2026-03-01", 0.1, "cpu"))):
        (tmp_path / name).write_text(json.dumps(data))
    points = update_auto_rule.collect([tmp_path])
    assert len(points) == 1
    assert points[0]["ms"] == {"torch": 1.0, "triton": 0.5}
    assert points[0]["shape"] == [8, 16, 16] and points[0]["layout"] == "nchw"


# ------------------------------------------------------------------- the one decision
def test_auto_on_a_gpu_follows_the_measurements(monkeypatch):
    with simulated_gpu(monkeypatch):
        fast = Call("partial_conv3x3", "float16", "fwd", "nchw", (256, 96, 3136))
        assert backends.resolve_backend("auto", GPU, "partial_conv3x3", call=fast) == "triton"
        slow = Call("channel_attention", "float16", "fwd", "nchw", (256, 64, 3136))
        assert backends.resolve_backend("auto", GPU, "channel_attention", call=slow) == "torch"
        # without the call's shapes there is nothing to go by: the reference
        assert backends.resolve_backend("auto", GPU, "partial_conv3x3") == "torch"
    with simulated_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB"):
        name, reason = backends.choose_backend("auto", GPU, "partial_conv3x3", call=fast)
        assert name == "torch" and "no measurement" in reason


def test_auto_takes_no_cuda_kernel_the_op_lacks_or_refuses(monkeypatch):
    """The measurement names cuda faster, but the CUDA backend has no PAT_sp kernel and takes
    at most 1024 tokens: auto passes over it there."""
    points = [_point({"torch": 1.0, "triton": 0.5, "cuda": 0.2}, op=op, shape=shape,
                     layout=layout)
              for op, shape, layout in (("spatial_attention", (8, 16, 16), "nchw"),
                                        ("rpe_attention", (8, 2048, 8), "any"))]
    monkeypatch.setattr(auto_rule, "measured_points", lambda: tuple(points))
    with simulated_gpu(monkeypatch):
        assert backends.resolve_backend("auto", GPU, "spatial_attention",
                                        call=points[0].call) == "triton"
        q = torch.empty(2, 4, 2048, 8, device="meta")
        too_many = registry.refusals("rpe_attention", q)
        assert [r.backend for r in too_many] == ["cuda"]
        assert backends.resolve_backend("auto", GPU, "rpe_attention", too_many,
                                        call=points[1].call) == "triton"
        with pytest.raises(pk.BackendUnavailableError,
                           match="N <= 1024 tokens, got 2048; use backend='triton' or 'auto'"):
            backends.resolve_backend("cuda", GPU, "rpe_attention", too_many)


def test_auto_without_a_usable_fused_backend_says_so_once(monkeypatch):
    with simulated_gpu(monkeypatch, usable=()):
        monkeypatch.setattr(backends, "_WARNED_DEVICES", set())
        call = Call("partial_conv3x3", "float16", "fwd", "nchw", (256, 96, 3136))
        with pytest.warns(RuntimeWarning, match="no fused backend is usable here"):
            assert backends.resolve_backend("auto", GPU, "partial_conv3x3", call=call) == "torch"


def test_the_call_is_described_by_dtype_mode_layout_and_shape():
    x = torch.randn(2, 8, 5, 6)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    assert backends.describe_call("partial_conv3x3", x, w) == Call(
        "partial_conv3x3", "float32", "fwd+bwd", "nchw", (2, 8, 30))
    with torch.no_grad():
        call = backends.describe_call("partial_conv3x3", x.to(memory_format=torch.channels_last),
                                      w)
    assert (call.mode, call.layout) == ("fwd", "channels_last")
    # a channel slice keeps its parent's layout (NCHW here, though not contiguous)
    assert backends.describe_call("partial_conv3x3", x[:, :4], w).layout == "nchw"
    q = torch.randn(2, 3, 49, 16, dtype=torch.float16)
    assert backends.describe_call("rpe_attention", q) == Call(
        "rpe_attention", "float16", "fwd", "any", (6, 49, 16))


# ------------------------------------------------------------------- what the model reports
def test_model_backend_plan_on_a_measured_gpu(monkeypatch):
    """FasterNet-T2 at batch 256, fp16, inference on the (simulated) H200: Triton's PConv in
    stages 1-3 (1 + 2 + 8 blocks), the reference in stage 4 (2 blocks), as measured; the MLP's
    BatchNorm + activation, never measured, the reference."""
    model = patnet.create_model("fasternet_t2").eval()
    with simulated_gpu(monkeypatch):
        plan = model.backend_plan(GPU, (256, 3, 224, 224), torch.float16)
        calls = model.backend_calls(GPU, (256, 3, 224, 224), torch.float16)
    assert plan == {"partial_conv3x3": "triton x11, torch x2", "batch_norm_act": "torch"}
    conv = [c for c in calls if c[0] == "partial_conv3x3"]
    assert [c[1] for c in conv] == ["triton"] * 11 + ["torch"] * 2
    assert "measured faster" in conv[0][2] and "no fused backend measured faster" in conv[-1][2]
    # batch 1 was never measured: the reference everywhere, saying why
    with simulated_gpu(monkeypatch):
        assert model.backend_plan(GPU, (1, 3, 224, 224), torch.float16) == {
            "partial_conv3x3": "torch", "batch_norm_act": "torch"}


def test_model_backend_plan_of_an_explicit_backend_needs_no_shapes(monkeypatch):
    model = patnet.create_model("patnet_t0", embed_dim=16, depths=(1, 1, 1, 1))
    with simulated_gpu(monkeypatch):
        patnet.model.set_backend(model, "triton")
        assert model.backend_plan(GPU) == {op: "triton" for op in (
            "channel_attention", "batch_norm_act", "rpe_attention", "self_mixer_output")}


def test_info_reports_the_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with simulated_gpu(monkeypatch):
        report = pk.info()
    assert report["cuda_device"] == H200
    assert "partial_conv3x3 float16 fwd nchw 256x96x3136: triton" in report["auto_rule"]
    assert report["auto"] == {"cpu": "torch", "cuda": backends.AUTO_PER_CALL}


# ------------------------------------------------------------------- torch.compile
def test_auto_traces_under_torch_compile_with_autocast():
    """The decision (status probes, the rule) is a constant of the graph: no graph break, also
    under autocast (the conftest guard fails the test on calls torch 2.11 cannot trace)."""
    torch._dynamo.reset()
    x, w = torch.randn(2, 8, 5, 6), torch.randn(2, 2, 3, 3)
    fn = torch.compile(lambda x, w: pk.partial_conv3x3(x, w) * 2, fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(x, w), pk.partial_conv3x3(x, w, backend="torch") * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, w).dtype == torch.bfloat16


def test_update_reads_the_layout_of_channels_last_reports(tmp_path):
    """An op benchmark run with --layout channels_last gives channels_last points."""
    import json
    report = {"benchmark": "channel_attention", "device": H200, "device_type": "cuda",
              "date": "2026-01-01", "settings": {"layout": "channels_last (the activation)"},
              "rows": [{"shape": "s1", "batch": 8, "channels": 16, "height": 4, "width": 4,
                        "dtype": "fp16", "mode": "fwd",
                        "providers": {"torch": {"status": "ok", "ms": 1.0},
                                      "triton": {"status": "ok", "ms": 0.5}}}]}
    (tmp_path / "cl.json").write_text(json.dumps(report))
    assert [p["layout"] for p in update_auto_rule.collect([tmp_path])] == ["channels_last"]


def test_op_benchmark_lays_the_activation_out_channels_last():
    from benchmarks.op_inputs import Problem, channels_last
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    moved = channels_last(Problem((x, w), [x, w]))
    y = moved.args[0]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert y.is_leaf and y.requires_grad and torch.equal(y, x)
    assert moved.leaves[0] is y and moved.leaves[1] is w and moved.args[1] is w
