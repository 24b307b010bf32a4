"""Host time of one eval forward (or training step), per model and provider: what the CPU
spends issuing its kernels (our Python layers, PyTorch's dispatch, Triton's launcher).

    python -m benchmarks.host_time [--models patnet_t2,fasternet_t2] [--providers eager,triton]
                                   [--batch N] [--size 32] [--repeat 50] [--train]
                                   [--amp float16|bfloat16] [--layout nchw|channels_last]
                                   [--json PATH]

A GPU runs a forward no faster than its host issues it: at 48 launches per PATNet-T2 forward,
tens of microseconds of Python per launch are milliseconds per batch, as much as the kernels
of a whole batch at the speed targets. This measures it, and counts it: the Python-level
calls of one forward (functions and builtins), the same on every machine, which
``tests/test_host_time.py`` pins so that a change adding host work per launch fails CI.

* On a machine without a GPU the Triton kernels are launched but not run (the call stops at
  Triton's launcher, as the traffic model's ``--count-only`` does; Triton's own launch cost is
  not in the figure): the time is that of our layers (functional API, backend choice,
  registered ops, launchers) plus the path's few aten ops, which do run, on the CPU at this
  size (the head's pooling, 1x1 conv and classifier). Eager's row is context, not eager's
  host time on a GPU: all of its kernels run on the CPU.
* On a GPU every kernel is launched and runs; each forward is timed on the host without a
  synchronisation (then one outside the timing, so the launch queue never fills): the host
  time per forward with real launches. Where it is above the forward's GPU time, the model is
  host-bound (CUDA graphs: ``patnet.optimize_for_inference(model, example_input=x)``).

``--amp DTYPE`` runs each forward under ``torch.autocast`` in that dtype, ``--layout
channels_last`` takes the input and the model in channels_last (the model benchmark's AMP
mode: fp16, channels_last, whose kernels a GPU run has compiled by then).

With ``--train``: the training model's step, forward and backward (the output's gradient all
ones, made once; the gradients set to None between steps, untimed; no optimizer step), eager
against ours on Triton; with ``--amp`` the forward under autocast, as a GPU trains (issue 13's
training target: bf16). Without a GPU its values are garbage (kernels not run), its time not.

Median and 20th/80th percentiles of ``--repeat`` forwards after 3 untimed ones, the kernels
per forward (the traffic model's count) and the Python calls of one more. Times on a shared
machine are noisy (compare rows of one run); the calls are not.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import traffic  # noqa: E402  (sets up the CPU emulation first where needed)
from benchmarks import gpu_launches  # noqa: E402
from benchmarks.model_measure import autocast  # noqa: E402
from benchmarks.report import pretty, run_models, split_list  # noqa: E402
from benchmarks.report import write_json as write_json_file  # noqa: E402

import patnet  # noqa: E402

PROVIDERS = ("eager", "torch", "triton", "cuda")
DEFAULT_PROVIDERS = ("eager", "triton")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
WARMUP = 3


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _runs_triton_launcher() -> bool:
    """Without a GPU: whether Triton's launcher runs as on a GPU, up to the launch
    (``gpu_launches.stand_in_kernels``): where the environment had TRITON_INTERPRET=0 when
    Triton's kernels were defined (else they are the interpreter's, stopped before it)."""
    from patnet_kernels.triton._common import INTERPRET
    return not _on_gpu() and not INTERPRET


def _launches_without_a_gpu():
    """What stands for the GPU's launches here: the stand-in kernels behind Triton's launcher
    (:func:`_runs_triton_launcher`) or the launches stopped before it."""
    if _runs_triton_launcher():
        return gpu_launches.stand_in_kernels()
    return traffic.triton_launches([], run_kernels=False)


class HostWork(NamedTuple):
    """What one model's forwards (or training steps) cost the host."""
    seconds: List[float]  # host time of each timed forward
    python_calls: int  # Python-level calls of one more (see :func:`host_work`)


def host_work(model: torch.nn.Module, x: torch.Tensor, repeat: int, train: bool = False,
              amp: Optional[torch.dtype] = None) -> HostWork:
    """Seconds of host time of each of ``repeat`` eval forwards of ``model`` on ``x`` (with
    ``train``: forward and backward steps; with ``amp``: under autocast in that dtype), after
    WARMUP untimed ones; without a GPU with the Triton kernels launched but not run. Then the
    Python-level calls of one more (functions and builtins: ``sys.setprofile``'s "call" and
    "c_call" events): our layers' host work counted, not timed, so the same on every machine
    (a test pins it, as the traffic model's test pins the kernels); without a GPU, Triton's own
    launcher is in either only with TRITON_INTERPRET=0 (:func:`_runs_triton_launcher`)."""
    stub = contextlib.nullcontext() if _on_gpu() else _launches_without_a_gpu()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    grad = None
    if train:  # (in the output's dtype: under autocast the logits are the autocast dtype's)
        with torch.no_grad(), autocast(x.device, amp):
            grad = torch.ones_like(model(x))

    def step():
        with autocast(x.device, amp):
            out = model(x)
        if grad is not None:
            out.backward(grad)

    calls = [0]

    def count(frame, event, arg):
        if event == "call" or event == "c_call":
            calls[0] += 1

    times = []
    with torch.set_grad_enabled(train), stub:
        for _ in range(WARMUP + repeat):
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        sync()
        model.zero_grad(set_to_none=True)
        sys.setprofile(count)
        try:
            step()
        finally:
            sys.setprofile(None)
    sync()
    return HostWork(times[WARMUP:], calls[0])


def measure_provider(name: str, provider: str, batch: int, size: int, repeat: int,
                     train: bool = False, amp: Optional[torch.dtype] = None,
                     layout: str = "nchw") -> dict:
    """One row: kernels per forward (step) and host milliseconds (median, p20, p80), or
    ``status`` / ``reason`` where the provider cannot run."""
    try:
        device = "cuda" if _on_gpu() else "cpu"
        if _runs_triton_launcher():
            gpu_launches.launch_as_on_a_gpu()  # (Triton's backend on CPU tensors, as on a GPU)
        model = traffic.build(name, provider, train=train, device=device)
        model = model.to(memory_format=LAYOUTS[layout])
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        x = x.to(device).contiguous(memory_format=LAYOUTS[layout])
        work = host_work(model, x, repeat, train, amp)
        times = sorted(work.seconds)
        record = traffic.record_step if train else traffic.record_forward
        with autocast(x.device, amp):  # (warm: its caches are built)
            kernels = traffic.summarize(record(model, x, warmup=False,
                                               run_kernels=_on_gpu())).kernels
    except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
        from patnet_kernels import BackendUnavailableError
        status = "unavailable" if isinstance(exc, BackendUnavailableError) else "error"
        return {"status": status, "reason": f"{type(exc).__name__}: {exc}"}
    ms = [t * 1e3 for t in times]
    median = statistics.median(ms)
    return {"status": "ok", "kernels": kernels, "python_calls": work.python_calls, "ms": median,
            "ms_p20": ms[int(0.2 * (len(ms) - 1))], "ms_p80": ms[int(0.8 * (len(ms) - 1))],
            "us_per_kernel": 1e3 * median / kernels}


def measure(name: str, providers: Sequence[str], batch: int = 1, size: int = 32,
            repeat: int = 50, train: bool = False, amp: Optional[torch.dtype] = None,
            layout: str = "nchw") -> dict:
    """The host-time report of one model: a row per provider (see :func:`measure_provider`)."""
    return {"model": name, "batch": batch, "size": size, "repeat": repeat, "train": train,
            "amp": None if amp is None else str(amp).replace("torch.", ""), "layout": layout,
            "device": torch.cuda.get_device_name() if _on_gpu() else "cpu",
            "kernels_run": _on_gpu(), "triton_launcher": _on_gpu() or _runs_triton_launcher(),
            "providers": {p: measure_provider(name, p, batch, size, repeat, train, amp, layout)
                          for p in providers}}


def _calls(row: dict, per: str) -> str:
    """A row's Python calls per forward (``per`` "per kernel": per kernel launched), or "-" in
    a report written before they were counted."""
    calls = row.get("python_calls")
    if calls is None:
        return "-"
    return f"{calls / row['kernels']:.0f}" if per else str(calls)


def format_table(report: dict) -> str:
    where = (f"on {report['device']}" if report["kernels_run"] else
             "on the CPU, Triton's launcher run as on a GPU (stand-in kernels)"
             if report.get("triton_launcher") else
             "on the CPU, Triton kernels launched but not run")
    what = "training step" if report.get("train") else "eval forward"
    mode = (f"{report['amp']} autocast" if report.get("amp") else "fp32") + (
        ", channels_last" if report.get("layout") == "channels_last" else "")
    lines = [f"{pretty(report['model'])}, batch {report['batch']} at {report['size']} x "
             f"{report['size']}, {what}, {mode}, {where}: host time per {what.split()[-1]}",
             f"{'provider':<22}{'kernels':>8}{'host ms':>10}{'p20-p80':>16}{'us/kernel':>11}"
             f"{'py calls':>10}{'calls/kernel':>14}"]
    lines.append("-" * len(lines[-1]))
    for provider, row in report["providers"].items():
        label = traffic.PROVIDER_LABELS.get(provider, provider)
        if row.get("status") != "ok":
            lines.append(f"{label:<22}{row.get('status')}: {row.get('reason', '')[:90]}")
            continue
        spread = f"{row['ms_p20']:.2f}-{row['ms_p80']:.2f}"
        lines.append(f"{label:<22}{row['kernels']:>8}{row['ms']:>10.2f}{spread:>16}"
                     f"{row['us_per_kernel']:>11.1f}{_calls(row, ''):>10}"
                     f"{_calls(row, 'per kernel'):>14}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_time",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=split_list, default=["patnet_t2", "fasternet_t2"],
                        help="comma list (default patnet_t2,fasternet_t2)")
    parser.add_argument("--providers", type=split_list, default=list(DEFAULT_PROVIDERS),
                        help=f"comma list of {','.join(PROVIDERS)} (default "
                             f"{','.join(DEFAULT_PROVIDERS)})")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per forward (default 1; with --train 2, BatchNorm's least)")
    parser.add_argument("--size", type=int, default=32, help="image side, >= 32 (default 32)")
    parser.add_argument("--repeat", type=int, default=50, help="timed forwards (default 50)")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (forward and backward) of the training "
                             "model instead (providers eager, triton)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None,
                        help="run under torch.autocast in this dtype (default: fp32)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="nchw",
                        help="memory format of the input and the model (default nchw)")
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in patnet.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {patnet.list_models()}")
    bad = [p for p in args.providers if p not in PROVIDERS]
    if bad or not args.providers:
        parser.error(f"unknown provider(s) {bad}; choose from {list(PROVIDERS)}")
    if args.train and [p for p in args.providers if p not in traffic.TRAIN_PROVIDERS]:
        parser.error(f"--train takes the providers {list(traffic.TRAIN_PROVIDERS)}")
    if args.batch is None:
        args.batch = 2 if args.train else 1
    if args.batch < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be at least 1")
    if args.size < 32:
        parser.error(f"--size must be at least 32 (the models' smallest input), got {args.size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def write(reports):
        write_json_file(args.json, {
            "what": "host time per eval forward (benchmarks/host_time.py)",
            "torch": torch.__version__, "settings": vars(args) | {"json": str(args.json)},
            "models": {r["model"]: r for r in reports}})

    return run_models(
        args.models,
        lambda name: measure(name, args.providers, args.batch, args.size, args.repeat,
                             args.train, AMP_DTYPES.get(args.amp), args.layout),
        format_table, None if args.json is None else write)


if __name__ == "__main__":
    sys.exit(main())
