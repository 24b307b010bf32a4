"""The main job: what patnet-kernels does, in one command.

Builds a model (default PATNet-T2) and FasterNet of the same size, checks the fastest backend
usable here against the pure-PyTorch reference and the folded model against the eval model,
counts parameters and FLOPs, and times both models the authors' way (SPEC.md section 7):
CPU latency at batch 1 with one thread, eager and folded; on a GPU also throughput at batch 256.
Prints a table and writes it as JSON.

    python benchmarks/main_job.py [--model patnet_t2] [--runs 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet  # noqa: E402
import patnet_kernels as pk  # noqa: E402
from benchmarks.timing import time_cpu, time_cuda  # noqa: E402
from patnet.testing import randomize_norms  # noqa: E402

FOLD_TOLERANCE = 1e-5      # max |folded - eval| / max |eval|, fp32
BACKEND_TOLERANCE = 1e-4   # max |backend - reference| / max |reference|, fp32 eval


def pretty(name: str) -> str:
    family, size = name.split("_")
    return {"patnet": "PATNet", "fasternet": "FasterNet"}[family] + "-" + size.upper()


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def step(index: int, total: int, text: str) -> None:
    print(f"[{index}/{total}] {text}", flush=True)


def check_parity(name: str, device: torch.device, seed: int) -> dict:
    """Fastest backend vs reference, and folded vs eval, fp32, batch 2 at 224 x 224."""
    torch.manual_seed(seed)
    reference = randomize_norms(patnet.create_model(name, backend="torch"), seed).eval()
    reference = reference.to(device)
    x = torch.randn(2, 3, 224, 224, device=device)
    fastest = pk.resolve_backend("auto", device)
    with torch.no_grad():
        expected = reference(x)
        folded = patnet.fuse_for_inference(reference)(x)
        result = {"fastest_backend": fastest,
                  "folded_vs_eval": rel_max_error(folded, expected)}
        if fastest != "torch":
            model = patnet.set_backend(copy.deepcopy(reference), fastest)
            result["backend_vs_reference"] = rel_max_error(model(x), expected)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="patnet_t2", choices=patnet.list_models())
    parser.add_argument("--baseline", default=None, choices=patnet.list_models(),
                        help="default: FasterNet of the same size")
    parser.add_argument("--runs", type=int, default=200, help="timed runs (authors: 200)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up runs (authors: 10 on CPU, 50 on GPU)")
    parser.add_argument("--gpu-batch", type=int, default=256)
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

    step(2, total, "Correctness: fastest backend vs reference, folded vs eval (fp32, 2x3x224x224)")
    device = torch.device("cuda" if cuda else "cpu")
    checks, failures = {}, []
    for name in names:
        checks[name] = check_parity(name, device, seed=0)
        c = checks[name]
        if c["fastest_backend"] == "torch":
            backend_text = "fastest usable backend is the reference itself (nothing to compare)"
        else:
            backend_text = (f"{c['fastest_backend']} vs reference: max rel error "
                            f"{c['backend_vs_reference']:.1e}")
            if c["backend_vs_reference"] > BACKEND_TOLERANCE:
                failures.append(f"{name}: {backend_text}")
        if c["folded_vs_eval"] > FOLD_TOLERANCE:
            failures.append(f"{name}: folded vs eval {c['folded_vs_eval']:.1e}")
        print(f"    {pretty(name):<13} folded vs eval: max rel error {c['folded_vs_eval']:.1e}; "
              f"{backend_text}")

    step(3, total, "Parameters and FLOPs at 224 x 224 (fvcore convention)")
    rows = {}
    for name in names:
        with torch.device("meta"):
            meta_model = patnet.create_model(name).eval()
        rows[name] = {"model": pretty(name), "params": patnet.count_params(meta_model),
                      "flops": patnet.count_flops(meta_model)}
        print(f"    {pretty(name):<13} {rows[name]['params']:,} parameters, "
              f"{rows[name]['flops'] / 1e9:.3f} GFLOPs")

    step(4, total, f"CPU latency, batch 1, 1 thread, fp32: {args.warmup or 10} warm-up + "
                   f"{args.runs} timed runs each")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(1, 3, 224, 224)
        for name in names:
            model = patnet.create_model(name).eval()
            for kind, net in (("eager", model), ("folded", patnet.fuse_for_inference(model))):
                with torch.no_grad():
                    t = time_cpu(lambda: net(x), args.warmup or 10, args.runs,
                                 f"{pretty(name)} {kind}")
                rows[name][f"cpu_{kind}_ms"] = t["mean_ms"]
                rows[name][f"cpu_{kind}_median_ms"] = t["median_ms"]
    finally:
        torch.set_num_threads(threads)

    if cuda:
        step(5, total, f"GPU throughput, batch {args.gpu_batch}, fp32, cudnn.benchmark: "
                       f"{args.warmup or 50} warm-up + {args.runs} timed runs each")
        torch.backends.cudnn.benchmark = True
        x = torch.randn(args.gpu_batch, 3, 224, 224, device="cuda")
        for name in names:
            model = patnet.create_model(name).eval().cuda()
            for kind, net in (("eager", model), ("folded", patnet.fuse_for_inference(model))):
                with torch.no_grad():
                    t = time_cuda(lambda: net(x), args.warmup or 50, args.runs,
                                  f"{pretty(name)} {kind}")
                rows[name][f"gpu_{kind}_img_s"] = args.gpu_batch / (t["mean_ms"] / 1e3)

    print()
    print_table(rows, names, cuda)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": cpu_name(), "gpu": torch.cuda.get_device_name() if cuda else None,
        "backends": backends, "checks": checks, "rows": [rows[n] for n in names],
        "settings": {"runs": args.runs, "warmup": args.warmup, "gpu_batch": args.gpu_batch,
                     "cpu_threads": 1, "dtype": "float32", "layout": "NCHW"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nReport written to {out}")
    if failures:
        print("CORRECTNESS CHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


def print_table(rows: dict, names: list, cuda: bool) -> None:
    columns = [("model", "{}"), ("params", "{:,}"), ("FLOPs", "{:.3f}G"),
               ("CPU eager ms", "{:.2f}"), ("CPU folded ms", "{:.2f}")]
    keys = ["model", "params", "flops", "cpu_eager_ms", "cpu_folded_ms"]
    if cuda:
        columns += [("GPU eager img/s", "{:,.0f}"), ("GPU folded img/s", "{:,.0f}")]
        keys += ["gpu_eager_img_s", "gpu_folded_img_s"]
    cells = [[fmt.format(rows[n][k] / 1e9 if k == "flops" else rows[n][k])
              for (_, fmt), k in zip(columns, keys)] for n in names]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, (h, _) in enumerate(columns)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _), w) in
                     enumerate(zip(columns, widths)))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
    if len(names) == 2:
        a, b = rows[names[0]], rows[names[1]]
        print()
        for kind in ("eager", "folded"):
            ratio = a[f"cpu_{kind}_ms"] / b[f"cpu_{kind}_ms"]
            change = "lower" if ratio < 1 else "higher"
            print(f"CPU latency {kind:<6}: {a['model']} / {b['model']} = {ratio:.2f} "
                  f"({a['model']} has {abs(1 - ratio) * 100:.0f}% {change} latency)")
        if cuda:
            for kind in ("eager", "folded"):
                ratio = a[f"gpu_{kind}_img_s"] / b[f"gpu_{kind}_img_s"]
                change = "higher" if ratio > 1 else "lower"
                print(f"GPU throughput {kind:<6}: {a['model']} / {b['model']} = {ratio:.2f} "
                      f"({a['model']} has {abs(ratio - 1) * 100:.0f}% {change} throughput)")


if __name__ == "__main__":
    sys.exit(main())
