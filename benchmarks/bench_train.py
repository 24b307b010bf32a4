"""Training-step benchmark: eager against ours (the fused training kernels), side by side.

    python -m benchmarks.bench_train [--models patnet_t2,fasternet_t2] [--backend triton]
                                     [--batch 128] [--size 224] [--amp bfloat16|float16|none]
                                     [--layout channels_last|nchw] [--warmup 10] [--runs 30]
                                     [--json PATH]

Issue 13's training target: PATNet-T2's step, bf16 autocast, batch 128, at >= 1.2x eager's
speed. A step is what a training loop runs per batch: the forward under ``torch.autocast``,
the cross-entropy of the logits (float32) against fixed random labels, the backward, an SGD
step (momentum 0.9, weight decay 5e-5, ``foreach``), the gradients set to None. Providers,
each from the same weights (eager's, copied) on the same batch, in train mode:

* ``eager``: ``patnet.create_model(name, backend="torch")``, the authors' modules;
* ``ours``: ``patnet.create_model(name, backend=--backend)``: ``triton`` (default) runs every
  fused training kernel, ``auto`` only those a GPU measurement shows faster, ``cuda`` the
  CUDA kernels (PAT_sp has none).

**Check** (before timing): both models without their random parts (drop path and PAT_sf's
dropouts 0), with the same weights, take one step's forward and backward on the first
``--check-batch`` images (16) of the batch (no optimizer step) in the timed precision, and eager's also in float64; ours' logits and
parameter gradients must be as close to float64's as eager's are, within the tests' budget
(the largest max |diff| / max |float64's| over the tensors, a gradient's scale at least
GRADIENT_FLOOR of the model's largest, at most CHECK_FACTOR times eager's; the worst tensor is
reported). A model that fails is timed all the same, and marked ``mismatch``.

**Timing**: the released configurations (drop path and dropouts as trained), each provider's
first step (where Triton compiles its kernels) untimed; on a GPU ``time_cuda``
(``--runs`` steps between two synchronisations after ``--warmup``: ms per step, images/s), on
the CPU ``time_cpu_round_robin`` (a smoke run: the Triton kernels under the interpreter, at
the small sizes it allows, where the training BatchNorms normalise over few values and the
gradients are ill-conditioned: eager's own error is large there, and the budget follows it).
"""
from __future__ import annotations

import argparse
import copy
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import env  # noqa: E402

if not torch.cuda.is_available():  # before triton or the CUDA extension are first imported
    env.use_cpu_emulation()

import torch.nn.functional as F  # noqa: E402

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks.model_measure import LAYOUTS, autocast  # noqa: E402
from benchmarks.report import columns, pretty, run_models, split_list  # noqa: E402
from benchmarks.report import write_json as write_json_file  # noqa: E402
from benchmarks.timer import time_cpu_round_robin, time_cuda  # noqa: E402
from benchmarks.tolerance import max_rel_error  # noqa: E402

PROVIDERS = ("eager", "ours")
# Ours' largest error against eager's in float64 may be this many times eager's own in the
# same precision (the tests' error budget, tests/conftest.py).
CHECK_FACTOR = 4.0
# A gradient is compared at its own scale, or at least at this fraction of the largest
# gradient of the model: some vanish in exact arithmetic (the bias of a BatchNorm that another
# normalisation follows: eager's values there are rounding noise, about 1e-4 of the largest in
# bfloat16, seen on the CPU at 64 x 64, batch 8).
GRADIENT_FLOOR = 1e-2
AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
# The options that make a training step random, per family (zeroed for the check).
RANDOM_PARTS = {"patnet": {"drop_path_rate": 0.0, "attn_drop": 0.0, "proj_drop": 0.0},
                "fasternet": {"drop_path_rate": 0.0}}


def _models(name: str, backend: str, device: torch.device, layout: str, seed: int,
            **overrides) -> Dict[str, torch.nn.Module]:
    """eager's and ours' training models (train mode) with the same weights, as initialised
    for training (seeded), on ``device`` in ``layout``."""
    torch.manual_seed(seed)
    eager = patnet.create_model(name, backend="torch", **overrides)
    ours = patnet.create_model(name, backend=backend, **overrides)
    ours.load_state_dict(eager.state_dict())
    return {p: m.to(device, memory_format=LAYOUTS[layout]).train()
            for p, m in zip(PROVIDERS, (eager, ours))}


def _step_tensors(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  amp: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """The logits and every parameter gradient of one forward and backward, in float64."""
    with autocast(x.device, amp):
        logits = model(x)
    F.cross_entropy(logits.double(), labels).backward()
    return {"logits": logits.detach().double(),
            **{n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}}


def _errors(got: Dict[str, torch.Tensor], exact: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """max_rel_error of each tensor against exact's, a gradient's scale at least
    GRADIENT_FLOOR of the largest exact gradient."""
    missing = sorted(set(got) ^ set(exact))
    if missing:
        raise RuntimeError(f"gradients of only one model: {missing}")
    largest = max(t.abs().max().item() for key, t in exact.items() if key != "logits")
    return {key: max_rel_error([got[key]], [exact[key]],
                               0.0 if key == "logits" else GRADIENT_FLOOR * largest)
            for key in exact}


def check(name: str, backend: str, x: torch.Tensor, labels: torch.Tensor, layout: str,
          amp: Optional[torch.dtype], seed: int) -> dict:
    """One forward and backward of eager's and ours' models without their random parts, in
    the timed precision, and of eager's in float64 (the exact one): ``error``, ours' largest
    error against exact (over its logits and gradients, :func:`_errors`) and its ``worst``
    tensor; ``eager_error``, eager's own (PyTorch's error in this precision); ``budget``,
    CHECK_FACTOR times the larger of eager's error and the precision's unit roundoff."""
    models = _models(name, backend, x.device, layout, seed, **RANDOM_PARTS[name.split("_")[0]])
    exact_model = copy.deepcopy(models["eager"]).double()
    exact = _step_tensors(exact_model, x.double(), labels, None)
    errors = {p: _errors(_step_tensors(m, x, labels, amp), exact) for p, m in models.items()}
    ours, eager = errors["ours"], errors["eager"]
    worst = max(ours, key=lambda k: (ours[k] != ours[k], ours[k]))  # (NaN first)
    eager_error = max(eager.values())
    unit = torch.finfo(amp or torch.float32).eps
    return {"error": ours[worst], "worst": worst, "eager_error": eager_error,
            "budget": CHECK_FACTOR * max(eager_error, unit)}


def _trainer(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
             amp: Optional[torch.dtype]) -> Callable[[], None]:
    """One training step of ``model`` on the batch, as a training loop runs it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5,
                                foreach=True)

    def step() -> None:
        with autocast(x.device, amp):
            logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One model's report: the settings and, per provider, ms per step, images/s, the speed-up
    over eager and (ours) the check; or ``status`` / ``reason`` where it cannot run."""
    amp = AMP[args.amp]
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(
        device, memory_format=LAYOUTS[args.layout])
    report = {"model": name, "batch": args.batch, "size": args.size, "amp": args.amp,
              "layout": args.layout, "backend": args.backend, **env.run_info(device),
              "warmup": args.warmup, "runs": args.runs, "providers": {}}
    rows = report["providers"]
    try:
        models = _models(name, args.backend, device, args.layout, args.seed)
        labels = torch.randint(0, models["eager"].head.out_features, (args.batch,),
                               generator=gen).to(device)
        n = min(args.batch, args.check_batch)  # (float64 convolutions are slow on a GPU)
        checked = check(name, args.backend, x[:n], labels[:n], args.layout, amp, args.seed)
        steps = {p: _trainer(m, x, labels, amp) for p, m in models.items()}
        plan = models["ours"].backend_plan(input_shape=tuple(x.shape), dtype=amp)
        label = f"{name} training step"
        if device.type == "cuda":
            for step in steps.values():  # (the first step compiles the kernels: not timed)
                step()
            times = {p: time_cuda(step, args.warmup, args.runs, f"{label}, {p}")
                     for p, step in steps.items()}
        else:
            times = time_cpu_round_robin(steps, args.warmup, args.runs, label)
    except pk.BackendUnavailableError as exc:
        rows.update({p: {"status": "unavailable", "reason": str(exc)} for p in PROVIDERS})
        return report
    except Exception as exc:  # noqa: BLE001 (reported, the next model runs)
        reason = f"{type(exc).__name__}: {exc}".strip()
        rows.update({p: {"status": "error", "reason": reason,
                         "traceback": traceback.format_exc(limit=6)} for p in PROVIDERS})
        return report
    for provider, t in times.items():
        rows[provider] = {"status": "ok", "mean_ms": t["mean_ms"], "median_ms": t["median_ms"],
                          "min_ms": t["min_ms"],
                          "images_per_s": args.batch / (t["mean_ms"] * 1e-3),
                          "speedup_vs_eager": times["eager"]["mean_ms"] / t["mean_ms"]}
    rows["eager"]["error_vs_float64"] = checked["eager_error"]
    rows["ours"].update(error_vs_float64=checked["error"], check=checked, backends=plan)
    if not checked["error"] <= checked["budget"]:
        rows["ours"].update(status="mismatch", reason=(
            f"{checked['worst']}: max rel error {checked['error']:.2g} against float64 "
            f"exceeds {CHECK_FACTOR:g} x eager's {checked['eager_error']:.2g}"))
    return report


def format_table(report: dict) -> str:
    mode = (f"{report['amp']} autocast" if report["amp"] != "none" else "fp32") + (
        ", channels_last" if report["layout"] == "channels_last" else "")
    title = (f"{pretty(report['model'])} training step, batch {report['batch']} at "
             f"{report['size']} x {report['size']}, {mode}, on {report['device']} "
             f"(mean of {report['runs']} steps)")
    table_rows, notes = [], []
    for provider, row in report["providers"].items():
        label = provider if provider == "eager" else f"ours ({report['backend']})"
        if row.get("mean_ms") is None:
            notes.append(f"{label}: {row['status']}: {row['reason'].splitlines()[0]}")
            continue
        check_text = f"{row['error_vs_float64']:.1e}" + (
            f" ({row['check']['worst']})" if "check" in row else "")
        rate = row["images_per_s"]
        table_rows.append([label, f"{row['mean_ms']:.2f}",
                           f"{rate:,.0f}" if rate >= 100 else f"{rate:.2g}",
                           f"{row['speedup_vs_eager']:.2f}", check_text])
        if row["status"] != "ok":
            notes.append(f"{label}: {row['status']}: {row['reason']}")
    lines = [title]
    if table_rows:
        header, render = columns(["provider", "ms/step", "img/s", "x eager",
                                  "error vs float64 (worst tensor)"], table_rows, left={0, 4})
        lines += header + [render(row) for row in table_rows]
    return "\n".join(lines + notes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=split_list, default=["patnet_t2", "fasternet_t2"],
                        help="comma list (default patnet_t2,fasternet_t2)")
    parser.add_argument("--backend", default="triton", choices=list(pk.BACKENDS),
                        help="ours' backend (default triton: every fused training kernel)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default 128 on a GPU, 4 on the CPU)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side, >= 32 (default 224 on a GPU, 64 on the CPU)")
    parser.add_argument("--amp", choices=list(AMP), default=None,
                        help="autocast dtype, or none (fp32) (default bfloat16 on a GPU, none "
                             "on the CPU)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default=None,
                        help="memory format of the model and its input (default channels_last "
                             "on a GPU, nchw on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (default 10 on a GPU, 0 on the CPU)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed steps (default 30 on a GPU, 1 on the CPU)")
    parser.add_argument("--check-batch", type=int, default=16,
                        help="images of the batch the check takes (default 16: its float64 "
                             "step is slow on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in patnet.list_models()]
    if unknown or not args.models:
        parser.error(f"unknown model(s) {unknown}; choose from {patnet.list_models()}")
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    for key, on_gpu, on_cpu in (("batch", 128, 4), ("size", 224, 64),
                                ("amp", "bfloat16", "none"), ("warmup", 10, 0),
                                ("layout", "channels_last", "nchw"), ("runs", 30, 1)):
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    if args.batch < 2 or args.check_batch < 2:
        parser.error("--batch and --check-batch must be at least 2 (BatchNorm trains on more "
                     "than one value)")
    if args.size < 32:
        parser.error(f"--size must be at least 32 (the models' smallest input), got {args.size}")
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = env.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def write(reports: List[dict]) -> None:
        write_json_file(args.json, {
            "what": "training step, eager against ours (benchmarks/bench_train.py)",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "models": {r["model"]: r for r in reports}})

    return run_models(args.models, lambda name: measure(name, args, device), format_table,
                      None if args.json is None else write)


if __name__ == "__main__":
    sys.exit(main())
