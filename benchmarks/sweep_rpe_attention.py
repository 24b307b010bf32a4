"""Time many configurations of PAT_sf's attention kernels in one run: their GPU tuning sweep.

    python -m benchmarks.sweep_rpe_attention [--dtypes float16] [--batch 256] [--det-batch 8]
        [--shapes patnet_t2.s4.cls] [--kernels fwd,kv,q] [--json out.json]
        [--compile-workers N] [--budget SECONDS] [--quick]

For each shape of ``bench_rpe_attention`` (stage 4 of PATNet-T0, T2 and L: 4 heads of
d = 48, 96, 240, on the 7 x 7 map of a 224 x 224 image, N = 49, at ``--batch``, and on the
25 x 42 map of an 800 x 1344 detection image, N = 1050, at ``--det-batch``) and dtype, the
configurations (BLOCK_M, BLOCK_N, warps, stages: ``rpe_attention.Config``) of each kernel,
timed as its op runs it:

* ``fwd``: the forward;
* ``kv``: the whole backward with each configuration of the dK/dV kernel (a key block
  narrower than N adds the dQ kernel, in its shipped configuration);
* ``q``: the whole backward with each configuration of the dQ kernel, where it runs (N wider
  than the shipped dK/dV kernel's key block).

Dropout 0: a configuration is per kernel, and the dropout forms take the one timed here.
Compiling one takes seconds of a CPU, more than timing it: every configuration is first run
once in ``--compile-workers`` spawned processes side by side (``sweep_common``), then, alone on the machine, each is run once, checked against the reference
in fp32 on the same inputs (the output; dq, dk, dv and the table's gradient) and timed with the
op benchmarks' timer (GPU: ``do_bench``, L2 flushed before every call). ``--budget``: the
compile phase ends at half of it, and no configuration starts timing past it (recorded as
skipped; exit status 2). Prints per (shape, dtype, kernel) the configurations from fastest,
the shipped one marked ``*``, with TFLOP/s (``bench_rpe_attention``'s count) and the share of
the fastest; one that does not compile or launch reads ``error``. JSON: every row, rewritten
after every shape. A configuration found faster becomes the shipped one by an edit of
``rpe_attention._CONFIGS`` (this report committed beside it), once ``python -m
patnet_kernels.triton.aot`` compiles it within the spill pins. ``--quick``: the Triton
interpreter on the CPU, shrunk shapes, batch 2, two configurations per kernel: a smoke run.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import env, sweep_common  # noqa: E402

if not torch.cuda.is_available():  # (before anything imports triton: its interpreter, --quick)
    env.use_cpu_emulation(cuda=False)

from benchmarks import bench_rpe_attention as bench  # noqa: E402
from benchmarks.op_inputs import random_activation  # noqa: E402
from benchmarks.report import matching_shapes, split_list, write_json  # noqa: E402
from benchmarks.timer import Timer  # noqa: E402
from benchmarks.tolerance import MISMATCH  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KERNELS = ("fwd", "kv", "q")


def grid(kernel: str, dtype: torch.dtype) -> list:
    """The configurations timed of ``kernel``: 16 to 128 queries per program (forward) or 16 to
    64 per step (dK/dV, dQ), 32 or 64 keys, 4 or 8 warps, 1 or 2 stages (fp32, whose dots run
    on FMA units, 1): 24 per kernel, 12 in fp32."""
    rows = (32, 64, 128) if kernel == "fwd" else (16, 32, 64)
    stages = (1,) if dtype == torch.float32 else (1, 2)
    return list(itertools.product(rows, (32, 64), (4, 8), stages))


class Case:
    """One shape's attention on fixed inputs: its fp32 reference (output and gradients), the
    forward's output and log-sum-exp that the backward takes, and a kernel's run with a given
    configuration."""

    def __init__(self, shape, batch: int, dtype: torch.dtype, device, gen):
        from patnet_kernels.reference import rpe_attention as reference
        from patnet_kernels.triton import rpe_attention as kernels

        self.kernels, self.dtype = kernels, dtype
        q, k, v, table, bucket, scale = bench.build(shape, batch, dtype, device, "fwd", gen).args
        self.inputs, self.scale = (q, k, v), scale
        self.table32 = table.float().contiguous()
        self.ids32, self.order, self.seg, self.low, _ = kernels.bucket_segments(
            bucket, table.shape[1])
        self.grad_out = random_activation(q.shape, dtype, device, gen)
        leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v, table)]
        exact = reference(*leaves, bucket, scale=scale, dropout_p=0.0)
        exact.backward(self.grad_out.float())
        self.exact = {"fwd": [exact.detach()], "bwd": [t.grad for t in leaves]}
        self.out, self.lse = kernels.rpe_attention_forward(
            q, k, v, self.table32, self.ids32, scale, 0.0, 0)
        self.flops = {"fwd": bench.flops(shape, batch, "fwd")}
        self.flops["bwd"] = bench.flops(shape, batch, "fwd+bwd") - self.flops["fwd"]
        self.head_dim, self.tokens = q.shape[3], q.shape[2]

    def shipped(self, kernel: str):
        return self.kernels._config(self.head_dim, self.dtype, kernel)

    def runs(self, kernel: str) -> bool:
        """Whether ``kernel`` runs here as shipped (the dQ kernel: N wider than a key block)."""
        return kernel != "q" or self.tokens > self.shipped("kv")[1]

    def call(self, kernel: str, config) -> list:
        """The op's pass that ``kernel`` runs in, with ``config`` for it: [O] or [dq, dk, dv,
        dtable]."""
        q, k, v = self.inputs
        if kernel == "fwd":
            return [self.kernels.rpe_attention_forward(
                q, k, v, self.table32, self.ids32, self.scale, 0.0, 0,
                configs={"fwd": tuple(config)})[0]]
        return list(self.kernels.rpe_attention_backward(
            self.grad_out, q, k, v, self.out, self.lse, self.table32, self.ids32, self.order,
            self.seg, self.low, self.scale, 0.0, 0, configs={kernel: tuple(config)}))

    def error(self, kernel: str, config) -> float:
        """The largest max |difference| / max |reference| over the pass's outputs."""
        exact = self.exact["fwd" if kernel == "fwd" else "bwd"]
        return max(((got.float() - want).abs().max() / want.abs().max()).item()
                   for got, want in zip(self.call(kernel, config), exact))


def _shapes(quick: bool, wanted: Optional[str]):
    return matching_shapes(bench.shapes(quick), wanted)


def _batch(shape, args) -> int:
    return 2 if args.quick else args.det_batch if shape.tag == "det" else args.batch


def _configs(case: Case, kernel: str, quick: bool) -> list:
    """The shipped configuration first, then the grid's others (--quick: one other, the
    forward's with half its queries per program, the backward kernels' with a key block of 32,
    which at N = 49 runs the dQ kernel too)."""
    block_m, block_n, _, warps, stages = case.shipped(kernel)
    if quick:
        other = (block_m // 2, block_n) if kernel == "fwd" else (block_m, 32)
        return [(block_m, block_n, warps, stages), other + (warps, stages)]
    return list(dict.fromkeys([(block_m, block_n, warps, stages)] + grid(kernel, case.dtype)))


def _compile_job(quick: bool, shape_name: str, batch: int, dtype_name: str, kernel: str,
                 configs: list) -> List[Optional[str]]:
    """In a worker process: each configuration of ``kernel`` run once on the shape's case (the
    timing run's inputs, so its specialisation), compiling it into Triton's disk cache; per
    configuration None or its error."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = next(s for s in _shapes(quick, None) if s.name == shape_name)
    case = Case(shape, batch, DTYPES[dtype_name], device,
                torch.Generator(device=device).manual_seed(0))
    return sweep_common.run_each(lambda config: case.call(kernel, config), configs, device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_rpe_attention",
        description="Time many configurations of the attention kernels (pk.rpe_attention) per "
                    "shape, checked against the reference.")
    parser.add_argument("--dtypes", default="float16",
                        help="comma list of float16, bfloat16, float32")
    parser.add_argument("--batch", type=int, default=256, help="batch of the 7 x 7 maps")
    parser.add_argument("--det-batch", type=int, default=8, help="batch of the detection maps")
    parser.add_argument("--shapes", default=None,
                        help="comma list of substrings of shape names, e.g. patnet_t2.s4.cls")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help="comma list of fwd, kv, q (default: all)")
    sweep_common.add_options(parser, "two configurations per kernel")
    args = parser.parse_args(argv)
    unknown = [d for d in split_list(args.dtypes) if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    kernels = split_list(args.kernels)
    if not kernels or any(k not in KERNELS for k in kernels):
        parser.error(f"--kernels: choose from {', '.join(KERNELS)}, got {args.kernels!r}")
    sweep_common.check_options(parser, args)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    run = sweep_common.Run("sweep_rpe_attention", args)
    if run.refused():
        return 2
    shapes = _shapes(args.quick, args.shapes)
    device = run.device
    timer = Timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, warmup=1, runs=2)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []  # (dtype name, shape, case, {kernel: configurations})
    for dtype_name in split_list(args.dtypes):
        for shape in shapes:
            case = Case(shape, _batch(shape, args), DTYPES[dtype_name], device, gen)
            cases.append((dtype_name, shape, case, {
                kernel: _configs(case, kernel, args.quick) for kernel in split_list(args.kernels)
                if case.runs(kernel)}))
    run.precompile(_compile_job, [
        (args.quick, shape.name, _batch(shape, args), dtype_name, kernel, configs[i:i + 4])
        for dtype_name, shape, _, per_kernel in cases
        for kernel, configs in per_kernel.items() for i in range(0, len(configs), 4)])
    rows: List[dict] = []
    report = None
    if args.json:
        report = {"benchmark": "sweep_rpe_attention", **env.run_info(device),
                  "arch": run.arch(), "timing": timer.method, "budget_s": args.budget,
                  "rows": rows}
    failures = 0
    for dtype_name, shape, case, per_kernel in cases:
        for kernel, configs in per_kernel.items():
            print(f"{shape.name} B={_batch(shape, args)} N={case.tokens} d={case.head_dim} "
                  f"{dtype_name}, {kernel}: {len(configs)} configurations ({run.elapsed()})",
                  flush=True)
            found = [_timed(case, kernel, config, i == 0, shape, dtype_name, timer,
                            run.out_of_time()) for i, config in enumerate(configs)]
            failures += sum(r["shipped"] and r["status"] == "error" for r in found)
            _print_rows(found)
            rows.extend(found)
        if report is not None:
            write_json(Path(args.json), report)
    return run.finish(rows, failures)


def _timed(case: Case, kernel: str, config, shipped: bool, shape, dtype_name: str, timer,
           skip: Optional[str]) -> Dict[str, object]:
    """One configuration's row: checked, then timed (or skipped, for reason ``skip``)."""
    row = dict(shape=shape.name, dtype=dtype_name, batch=case.inputs[0].shape[0],
               tokens=case.tokens, head_dim=case.head_dim, kernel=kernel,
               config=dict(zip(("block_m", "block_n", "warps", "stages"), config)),
               shipped=shipped)
    if skip:
        return dict(row, status="skipped", reason=skip)
    try:
        error = case.error(kernel, config)
        if not error <= MISMATCH[DTYPES[dtype_name]]:
            raise RuntimeError(f"max rel error {error:.2g} vs the reference")
        row.update(status="ok", max_rel_error=error,
                   **timer(lambda: case.call(kernel, config)))
        row["tflops"] = case.flops["fwd" if kernel == "fwd" else "bwd"] / (row["ms"] * 1e-3) / 1e12
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not end it
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
    return row


def _print_rows(rows: List[dict]) -> None:
    timed = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["ms"])
    best = timed[0]["ms"] if timed else None
    for r in timed + [r for r in rows if r["status"] != "ok"]:
        c = r["config"]
        name = f"M{c['block_m']} N{c['block_n']} w{c['warps']} s{c['stages']}"
        mark = "*" if r["shipped"] else " "
        if r["status"] == "ok":
            print(f"  {mark} {name:<18} {r['ms'] * 1e3:10.1f} us {r['tflops']:7.2f} TFLOP/s "
                  f"{100 * best / r['ms']:6.1f}% of best")
        else:
            print(f"  {mark} {name:<18} {r['status']}: {r['reason']}")


if __name__ == "__main__":
    sys.exit(main())
