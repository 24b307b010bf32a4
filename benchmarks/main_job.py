"""The main job: what patnet-kernels does, in one command.

Builds a model (default PATNet-T2) and FasterNet of the same size, says which backend runs each
fused op here, checks the inference path (``patnet.optimize_for_inference``) against the eval
model, counts parameters and FLOPs, and runs the headline comparison the authors' way (SPEC.md
section 7): CPU latency at batch 1 with one thread of the eager reference and of our inference
path, both models timed round-robin in one loop (so that a noisy machine slows all alike); on a
GPU also images/s at batch 256, fp32 and AMP, of the eager reference, torch.compile of it and
ours (benchmarks/bench_models.py). Prints a table and the ratios, and writes them as JSON.

    python benchmarks/main_job.py [--model patnet_t2] [--runs 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks import env  # noqa: E402
from benchmarks.report import columns, pretty, write_json  # noqa: E402
from benchmarks.timer import time_cpu_round_robin  # noqa: E402
from benchmarks.tolerance import rel_max_error  # noqa: E402
from patnet.testing import randomize_norms  # noqa: E402

FOLD_TOLERANCE = 1e-5      # max |inference path - eval| / max |eval|, fp32
BACKEND_TOLERANCE = 1e-4   # max |backend - reference| / max |reference|, fp32 eval


def step(index: int, total: int, text: str) -> None:
    print(f"[{index}/{total}] {text}", flush=True)


def check_parity(name: str, device: torch.device, seed: int) -> dict:
    """Fastest backend vs reference, and the inference path vs the eval model, fp32, batch 2 at
    224 x 224, random BatchNorm statistics."""
    torch.manual_seed(seed)
    reference = randomize_norms(patnet.create_model(name, backend="torch"), seed).eval()
    reference = reference.to(device)
    x = torch.randn(2, 3, 224, 224, device=device)
    fastest = patnet.set_backend(copy.deepcopy(reference), "auto")
    with torch.no_grad():
        expected = reference(x)
        result = {"backends": fastest.backend_plan(device),
                  "inference_vs_eval": rel_max_error(
                      patnet.optimize_for_inference(reference)(x), expected)}
        if set(result["backends"].values()) != {"torch"}:
            result["backend_vs_reference"] = rel_max_error(fastest(x), expected)
    return result


def time_cpu_latency(names, warmup: int, runs: int) -> dict:
    """CPU latency (ms) at batch 1, one thread, fp32, eval, no_grad: the eager reference and
    the inference path of each model, timed round-robin (one call of each per round)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(1, 3, 224, 224)
        calls = {}
        for name in names:
            model = patnet.create_model(name).eval()
            for kind, net in (("eager", model), ("ours", patnet.optimize_for_inference(model))):
                calls[(name, kind)] = lambda net=net: net(x)
        with torch.no_grad():
            return time_cpu_round_robin(calls, warmup, runs, "CPU latency")
    finally:
        torch.set_num_threads(threads)


def gpu_throughput(names, args) -> dict:
    """GPU images/s at batch ``args.gpu_batch``, fp32 and AMP (fp16), NCHW: eager reference,
    torch.compile of it and ours, per model, as benchmarks/bench_models.py measures them
    (benchmarks/model_measure.py)."""
    from benchmarks.model_measure import run_mode

    torch.backends.cudnn.benchmark = True
    settings = argparse.Namespace(warmup=args.warmup or 50, runs=args.runs,
                                  compile_backend="inductor", compile_mode="default",
                                  ours_backend="auto")
    providers = ["eager", "ours"] if args.no_compile else ["eager", "compile", "ours"]
    image = torch.randn(args.gpu_batch, 3, 224, 224, device="cuda")
    rows = {}
    for name in names:
        reference = randomize_norms(patnet.create_model(name, backend="torch"), 0).eval().cuda()
        for precision, amp_dtype in (("fp32", None), ("amp", torch.float16)):
            print(f"    {pretty(name)} {precision}", flush=True)
            rows[(name, precision)] = run_mode(
                name, reference, image, precision, amp_dtype, "nchw", providers, settings)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="patnet_t2", choices=patnet.list_models())
    parser.add_argument("--baseline", default=None, choices=patnet.list_models(),
                        help="default: FasterNet of the same size")
    parser.add_argument("--runs", type=int, default=200, help="timed runs (authors: 200)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up runs (authors: 10 on CPU, 50 on GPU)")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true",
                        help="GPU: leave out torch.compile of the reference (saves minutes)")
    parser.add_argument("--out", default="benchmarks/results/main_job.local.json",
                        help="where to write the JSON report")
    args = parser.parse_args(argv)
    baseline = args.baseline or "fasternet_" + args.model.split("_")[1]
    names = [args.model] if baseline == args.model else [args.model, baseline]
    cuda = torch.cuda.is_available()
    total = 5 if cuda else 4

    step(1, total, "Backends")
    backends = pk.info()
    for backend, status in backends["backends"].items():
        mark = "yes" if status["available"] else "no "
        print(f"    {backend:<7} {mark}  {status['reason']}")
    print(f"    CPU inference path's convolutions: {backends['cpu_convolutions']}")

    device = torch.device("cuda" if cuda else "cpu")
    step(2, total, f"Correctness on {device.type}: inference path vs eval model, fastest "
                   "backend vs reference (fp32, 2x3x224x224)")
    checks, failures = {}, []
    for name in names:
        checks[name] = c = check_parity(name, device, seed=0)
        plan = ", ".join(f"{op} {backend}" for op, backend in c["backends"].items())
        print(f"    {pretty(name):<13} backends: {plan}")
        texts = [f"inference path vs eval: max rel error {c['inference_vs_eval']:.1e}"]
        if c["inference_vs_eval"] > FOLD_TOLERANCE:
            failures.append(f"{name}: inference path vs eval {c['inference_vs_eval']:.1e}")
        if "backend_vs_reference" in c:
            texts.append(f"fused vs reference: {c['backend_vs_reference']:.1e}")
            if c["backend_vs_reference"] > BACKEND_TOLERANCE:
                failures.append(f"{name}: fused vs reference {c['backend_vs_reference']:.1e}")
        print(f"    {'':<13} " + "; ".join(texts))

    step(3, total, "Parameters and FLOPs at 224 x 224 (fvcore convention)")
    rows = {}
    for name in names:
        with torch.device("meta"):
            meta_model = patnet.create_model(name).eval()
        rows[name] = {"model": pretty(name), "params": patnet.count_params(meta_model),
                      "flops": patnet.count_flops(meta_model)}
        print(f"    {pretty(name):<13} {rows[name]['params']:,} parameters, "
              f"{rows[name]['flops'] / 1e9:.3f} GFLOPs")

    step(4, total, f"CPU latency, batch 1, 1 thread, fp32: eager reference and ours, "
                   f"round-robin, {args.warmup or 10} warm-up + {args.runs} timed rounds")
    for (name, kind), t in time_cpu_latency(names, args.warmup or 10, args.runs).items():
        rows[name][f"cpu_{kind}_ms"] = t["mean_ms"]
        rows[name][f"cpu_{kind}_median_ms"] = t["median_ms"]

    gpu_rows = {}
    if cuda:
        step(5, total, f"GPU throughput, batch {args.gpu_batch}, fp32 and AMP (fp16), NCHW, "
                       f"cudnn.benchmark: {args.warmup or 50} warm-up + {args.runs} timed runs")
        gpu_rows = gpu_throughput(names, args)
        for (name, precision), row in gpu_rows.items():
            for provider, entry in row["providers"].items():
                if entry.get("images_per_s") is not None:
                    rows[name][f"gpu_{precision}_{provider}_img_s"] = entry["images_per_s"]
                elif entry.get("status") in ("error", "mismatch"):
                    failures.append(f"{name} GPU {precision} {provider}: {entry.get('reason')}")

    print()
    print_table(rows, names, cuda)
    report = {
        "date": env.now(),
        "git_commit": env.git_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": env.cpu_name(), "gpu": torch.cuda.get_device_name() if cuda else None,
        "backends": backends, "checks": checks, "rows": [rows[n] for n in names],
        "gpu_runs": [row for row in gpu_rows.values()],
        "settings": {"runs": args.runs, "warmup": args.warmup, "gpu_batch": args.gpu_batch,
                     "cpu_threads": 1, "dtype": "float32", "layout": "NCHW",
                     "cpu_timing": "round-robin over the models and providers"},
    }
    out = Path(args.out)
    write_json(out, report)
    print(f"\nReport written to {out}")
    if failures:
        print("CORRECTNESS CHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


def print_table(rows: dict, names: list, cuda: bool) -> None:
    fields = [("model", "model", "{}"), ("params", "params", "{:,}"),
               ("FLOPs", "flops", "{:.3f}G"), ("CPU eager ms", "cpu_eager_ms", "{:.2f}"),
               ("CPU ours ms", "cpu_ours_ms", "{:.2f}")]
    if cuda:
        for precision in ("fp32", "amp"):
            for provider in ("eager", "compile", "ours"):
                key = f"gpu_{precision}_{provider}_img_s"
                if any(key in rows[n] for n in names):
                    fields.append((f"GPU {precision} {provider} img/s", key, "{:,.0f}"))
    cells = [[fmt.format(rows[n][key] / 1e9 if key == "flops" else rows[n][key])
              if key in rows[n] else "-" for _, key, fmt in fields] for n in names]
    head, render = columns([h for h, _, _ in fields], cells, left={0})
    print("\n".join(head + [render(r) for r in cells]))
    print()
    a = rows[names[0]]
    model = a["model"]
    print(f"CPU latency, {model}: ours / eager reference = "
          f"{a['cpu_ours_ms'] / a['cpu_eager_ms']:.2f}")
    if len(names) == 2:
        b = rows[names[1]]
        base = b["model"]
        for kind in ("eager", "ours"):
            print(f"CPU latency, {kind}: {model} / {base} = "
                  f"{a[f'cpu_{kind}_ms'] / b[f'cpu_{kind}_ms']:.2f}")
        print(f"CPU latency: {model} ours / {base} eager = "
              f"{a['cpu_ours_ms'] / b['cpu_eager_ms']:.2f}")
    if cuda:
        for precision in ("fp32", "amp"):
            ours = a.get(f"gpu_{precision}_ours_img_s")
            for provider in ("eager", "compile"):
                other = a.get(f"gpu_{precision}_{provider}_img_s")
                if ours and other:
                    print(f"GPU {precision}, {model}: ours / {provider} images/s = "
                          f"{ours / other:.2f}")
            if len(names) == 2 and ours and rows[names[1]].get(f"gpu_{precision}_ours_img_s"):
                print(f"GPU {precision}, ours: {model} / {rows[names[1]]['model']} images/s = "
                      f"{ours / rows[names[1]][f'gpu_{precision}_ours_img_s']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
