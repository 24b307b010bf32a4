"""The rates the traffic model's roofline takes, measured on this GPU.

    python -m benchmarks.machine_rates [--json PATH] [--quick]

* ``copy``: ``dst.copy_(src)`` over two float32 buffers of 1 GiB (as the op benchmarks measure
  it, :func:`benchmarks.timer.measure_copy_bandwidth`), GB/s read + written;
* ``matmul``: ``torch.matmul`` of two 8192 x 8192 matrices in float16 and in bfloat16 (cuBLAS,
  fp32 accumulation), 2 n^3 FLOPs over the median time, TFLOP/s;
* ``l2_read``: a Triton kernel whose programs (4 per multiprocessor) each read their own
  slice of a 25 MB buffer (it fits the L2 of an H100 or H200; a warm-up call brings it there,
  and the calls are timed without the op benchmarks' L2 flush) 50 times, with loads that bypass
  L1 (``.cg``), summing what they read: GB/s read from L2.

The traffic model's roofline takes all three with ``python -m benchmarks.traffic --rates PATH``
(its defaults are the H200's copy and matmul rates; without an L2 rate it gives the rate each
op's weight reads, from L2 by every program tile, would need instead of timing them).
``scripts/gpu_check.sh`` runs this first in its benchmark phase. Without a GPU (``--quick``, a
smoke run under Triton's interpreter) the sizes are tiny and the figures mean nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import env  # noqa: E402

if not torch.cuda.is_available():  # (before anything imports triton: its interpreter)
    env.use_cpu_emulation(cuda=False)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.report import write_json  # noqa: E402
from benchmarks.timer import Timer, measure_copy_bandwidth  # noqa: E402

MATMUL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@triton.jit
def _l2_read_kernel(
    src_ptr,  # (programs * SLICE,) fp32 contiguous: the buffer, each program its own slice
    out_ptr,  # (programs * BLOCK,) fp32 contiguous, out: each program's sums (kept, so the
              # loads are not optimised away)
    SLICE,  # elements per program, a multiple of BLOCK
    REPEAT,  # passes over the slice
    BLOCK: tl.constexpr,  # elements per load step
):
    # grid: (programs,)
    pid = tl.program_id(0)
    base = src_ptr + pid.to(tl.int64) * SLICE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, REPEAT):
        for i in range(0, SLICE, BLOCK):
            acc += tl.load(base + i + tl.arange(0, BLOCK), cache_modifier=".cg")
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def measure_l2_read(timer: Timer, programs: int, slice_elements: int, repeat: int,
                    block: int) -> dict:
    """GB/s of :func:`_l2_read_kernel` reading a buffer of ``programs`` x ``slice_elements``
    fp32, ``repeat`` times each slice."""
    src = torch.randn(programs * slice_elements, device=timer.device)
    out = torch.empty(programs * block, device=timer.device)

    def run():
        _l2_read_kernel[(programs,)](src, out, slice_elements, repeat, BLOCK=block,
                                     num_warps=8)

    t = timer.warm(run)  # (no L2 flush between calls: the buffer stays in L2)
    read = programs * slice_elements * 4 * repeat
    return {"bytes": read, "buffer_bytes": src.numel() * 4, "programs": programs,
            "repeat": repeat, "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
            "gbps": read / (t["ms"] * 1e-3) / 1e9,
            "what": "each program re-reads its own slice of a buffer that fits in L2, loads "
                    "bypassing L1 (.cg); bytes = read"}


def measure_matmul(timer: Timer, n: int, dtype: torch.dtype) -> dict:
    """TFLOP/s of ``torch.matmul`` of two (n, n) matrices in ``dtype`` (2 n^3 FLOPs)."""
    gen = torch.Generator(device=timer.device).manual_seed(0)
    a = torch.randn(n, n, device=timer.device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=timer.device, generator=gen).to(dtype)
    t = timer(lambda: torch.matmul(a, b))
    flops = 2 * n ** 3
    return {"n": n, "flops": flops, "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
            "tflops": flops / (t["ms"] * 1e-3) / 1e12}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machine_rates",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a smoke run; the only way without a GPU)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("machine_rates: no GPU here; run with --quick for a smoke run (its figures mean "
              "nothing)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    timer = Timer(device, warmup_ms=25, rep_ms=100, warmup=1, runs=2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
    block = 4096 if not args.quick else 64
    slice_elements = 3 * block  # (48 KB a program: 25 MB over 132 multiprocessors' 528)
    print(f"machine rates on {env.device_name(device)}", flush=True)
    report = {"benchmark": "machine_rates", **env.run_info(device), "quick": args.quick}
    report["copy"] = measure_copy_bandwidth(timer, (1 << 30) if not args.quick else 1 << 16)
    print(f"  copy            {report['copy']['gbps']:12,.1f} GB/s (read + written)", flush=True)
    report["matmul"] = {}
    for name, dtype in MATMUL_DTYPES.items():
        row = measure_matmul(timer, 8192 if not args.quick else 32, dtype)
        report["matmul"][name] = row
        print(f"  matmul {name:<8} {row['tflops']:12,.1f} TFLOP/s ({row['n']}^3)", flush=True)
    report["l2_read"] = measure_l2_read(timer, 4 * sms, slice_elements,
                                        50 if not args.quick else 2, block)
    print(f"  L2 read         {report['l2_read']['gbps']:12,.1f} GB/s "
          f"({report['l2_read']['buffer_bytes'] / 1e6:.1f} MB buffer)", flush=True)
    if args.json:
        write_json(Path(args.json), report)
        print(f"Report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
