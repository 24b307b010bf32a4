"""benchmarks/host_time.py on the CPU: a table and JSON per model with each provider's host
time per forward (Triton's kernels launched, not run), kernels and Python calls per forward;
and the pins of our inference path's Python calls (its host work, counted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import host_time


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "sub" / "host.json"
    assert host_time.main(["--models", "patnet_t0", "--repeat", "3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PATNet-T0, batch 1 at 32 x 32, eval forward" in out
    assert "Triton kernels launched but not run" in out
    doc = json.loads(path.read_text())
    rows = doc["models"]["patnet_t0"]["providers"]
    assert set(rows) == {"eager", "triton"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert 0 < row["ms_p20"] <= row["ms"] <= row["ms_p80"]
        assert row["us_per_kernel"] == pytest.approx(1e3 * row["ms"] / row["kernels"])
        assert row["python_calls"] > row["kernels"]
    assert 0 < rows["triton"]["kernels"] < rows["eager"]["kernels"]
    assert doc["settings"]["repeat"] == 3
    assert f"{rows['triton']['python_calls']:>10}" in out


# Python-level calls of one eval forward of our inference path on Triton, at 32 x 32, batch 1
# (host_time's count: functions and builtins), fp32 NCHW and fp16 autocast channels_last
# (the model benchmark's AMP mode), measured at commit time with torch 2.13 / Python 3.11:
# PATNet-T2 7071 and 8792 (48 kernels), FasterNet-T2 3649 and 4710 (31); before the host-work
# pass (33665b6) 8628 and 12046, 4330 and 6534. A pin is the count plus about 4% (another
# Python or torch makes a few builtin calls more or fewer): lower it when a change cuts it.
CALLS_PINNED = {("patnet_t2", None): 7350, ("patnet_t2", torch.float16): 9150,
                ("fasternet_t2", None): 3800, ("fasternet_t2", torch.float16): 4900}


@pytest.mark.parametrize("name,amp", sorted(CALLS_PINNED, key=str))
def test_inference_python_calls_are_pinned(name, amp):
    layout = "nchw" if amp is None else "channels_last"
    row = host_time.measure(name, ("triton",), repeat=1, amp=amp, layout=layout)[
        "providers"]["triton"]
    assert row["status"] == "ok", row
    assert row["python_calls"] <= CALLS_PINNED[name, amp], (
        f"{name} ({amp or 'fp32'}): {row['python_calls']} Python calls per forward, pinned at "
        f"{CALLS_PINNED[name, amp]}: a change added host work per launch")


def test_training_steps(capsys):
    report = host_time.measure("patnet_t0", ("eager", "triton"), batch=2, repeat=2, train=True)
    rows = report["providers"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["ms"] > 0
    assert 0 < rows["triton"]["kernels"] < rows["eager"]["kernels"]
    assert "training step" in host_time.format_table(report)


def test_autocast_and_channels_last():
    report = host_time.measure("patnet_t0", ("triton",), repeat=2, amp=torch.bfloat16,
                               layout="channels_last")
    assert report["providers"]["triton"]["status"] == "ok", report
    assert "bfloat16 autocast, channels_last" in host_time.format_table(report)
    # training steps too (the forward under autocast, as the training target's)
    report = host_time.measure("patnet_t0", ("triton",), batch=2, repeat=2, train=True,
                               amp=torch.bfloat16, layout="channels_last")
    assert report["providers"]["triton"]["status"] == "ok", report
    assert "training step, bfloat16 autocast" in host_time.format_table(report)


def test_cli_arguments():
    args = host_time.parse_args(["--models", "patnet_t2", "--providers", "triton", "--batch",
                                 "2", "--size", "64", "--repeat", "5"])
    assert (args.models, args.providers, args.batch, args.size, args.repeat) == (
        ["patnet_t2"], ["triton"], 2, 64, 5)
    defaults = host_time.parse_args([])
    assert defaults.providers == list(host_time.DEFAULT_PROVIDERS) and defaults.json is None
    assert defaults.batch == 1 and host_time.parse_args(["--train"]).batch == 2
    assert defaults.amp is None and defaults.layout == "nchw"
    amp = host_time.parse_args(["--amp", "float16", "--layout", "channels_last"])
    assert (amp.amp, amp.layout) == ("float16", "channels_last")
    for bad in (["--models", "patnet_x"], ["--providers", "tpu"], ["--size", "16"],
                ["--repeat", "0"], ["--batch", "0"], ["--providers", ","],
                ["--train", "--providers", "cuda"],
                ["--amp", "float32"], ["--layout", "nhwc"]):
        with pytest.raises(SystemExit):
            host_time.parse_args(bad)


def test_triton_launcher_runs_as_on_a_gpu(tmp_path):
    """With TRITON_INTERPRET=0 on a machine without a GPU, Triton's launcher runs each launch up
    to the kernel (its binder and cache look-up; stand-in kernels, launched once compiled as
    on a GPU would be), so the host time and calls include Triton's share: more calls than
    with the launches stopped before it (its binder makes dozens a launch)."""
    from conftest import REPO, compile_env
    path = tmp_path / "host.json"
    env = dict(compile_env(), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_time", "--models", "patnet_t0",
                           "--providers", "triton", "--repeat", "2", "--json", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton's launcher run as on a GPU (stand-in kernels)" in proc.stdout
    report = json.loads(path.read_text())["models"]["patnet_t0"]
    row = report["providers"]["triton"]
    assert report["triton_launcher"] and row["status"] == "ok", row
    stopped = host_time.measure("patnet_t0", ("triton",), repeat=1)["providers"]["triton"]
    assert row["kernels"] == stopped["kernels"]
    assert row["python_calls"] > stopped["python_calls"] + 10 * row["kernels"]
