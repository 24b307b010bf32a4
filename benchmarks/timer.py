"""The one timer of the benchmarks: warm-up calls excluded, then statistics of the timed calls.

Two ways of timing, each on the CPU and on a GPU:

* :class:`Timer`, per call (the op benchmarks): the median with the 20th and 80th percentiles.
  On a GPU ``triton.testing.do_bench``, which warms up for ``warmup_ms``, times calls for
  ``rep_ms`` and before **every** timed call writes a 256 MB buffer, so the inputs come from
  device memory, not L2 (cold-L2 timing); on the CPU a plain loop of ``warmup`` + ``runs``
  calls (time.perf_counter), no cache flush. Gradients given in ``grad_to_none`` are reset to
  None before each call, untimed. :meth:`Timer.warm` times without the flush (what stays in
  L2 between calls stays there: the L2 read rate).
* :func:`time_cuda` / :func:`time_cpu` / :func:`time_cpu_round_robin`, throughput and latency
  (the whole-model benchmarks, the authors' way): the mean, median and minimum per call. On a
  GPU the timed calls run between two synchronisations (the mean) with CUDA events around each
  (median, minimum); on the CPU per-call wall times, several functions optionally round-robin
  (one call of each per round, so that a shared machine's load reaches all alike).

Also the copy bandwidth, the ceiling of a memory-bound op (:func:`measure_copy_bandwidth`), and
a plain progress display.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch


class Progress:
    """``label  37/210`` on one updating stdout line on a terminal; a line per 25% elsewhere."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stdout.isatty()
        self._next_mark = 0.25

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            sys.stdout.write(f"\r    {self.label}  {self.done}/{self.total}")
            if self.done >= self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif self.done >= self._next_mark * self.total:
            sys.stdout.write(f"    {self.label}  {self.done}/{self.total}\n")
            sys.stdout.flush()
            while self._next_mark * self.total <= self.done:
                self._next_mark += 0.25


def cpu_loop(fns: Dict[object, Callable[[], object]], warmup: int, runs: int,
             before: Optional[Callable[[], None]] = None,
             progress: Optional[Progress] = None) -> Dict[object, List[float]]:
    """Wall time in ms of each call of each function of ``fns`` (one call of each per round),
    the ``warmup`` first rounds left out; ``before()`` runs untimed before every call."""
    times: Dict[object, List[float]] = {key: [] for key in fns}
    for i in range(warmup + runs):
        for key, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times[key].append(elapsed)
        if progress is not None:
            progress.step()
    return times


def quantiles(times: Sequence[float]) -> Dict[str, float]:
    """{"ms": median, "ms_p20": 20th percentile, "ms_p80": 80th percentile}."""
    if len(times) >= 2:
        q = statistics.quantiles(times, n=5, method="inclusive")  # 20, 40, 60, 80 %
        p20, p80 = q[0], q[3]
    else:
        p20 = p80 = times[0]
    return {"ms": statistics.median(times), "ms_p20": p20, "ms_p80": p80}


@dataclass
class Timer:
    """Per-call time of an op: median and 20th / 80th percentiles (see the module docstring)."""

    device: torch.device
    warmup_ms: float = 25.0    # GPU (do_bench)
    rep_ms: float = 100.0      # GPU (do_bench)
    warmup: int = 2            # CPU loop
    runs: int = 10             # CPU loop

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return (f"triton.testing.do_bench(warmup={self.warmup_ms:g} ms, rep={self.rep_ms:g} "
                    "ms): median and 20th/80th percentiles; L2 flushed (256 MB written) before "
                    "every timed call; gradients reset to None between calls, untimed")
        return (f"CPU loop: {self.warmup} warm-up calls, then median and 20th/80th percentiles "
                f"of {self.runs} timed calls (time.perf_counter); no cache flush")

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()
                 ) -> dict:
        """{"ms": median, "ms_p20": ..., "ms_p80": ...} of one call of ``fn``."""
        if self.device.type == "cuda":
            import triton.testing
            p20, p50, p80 = triton.testing.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms,
                grad_to_none=list(grad_to_none) or None, quantiles=[0.2, 0.5, 0.8])
            return {"ms": p50, "ms_p20": p20, "ms_p80": p80}

        def reset():
            for t in grad_to_none:
                t.grad = None
        return quantiles(cpu_loop({0: fn}, self.warmup, self.runs, reset)[0])

    def warm(self, fn: Callable[[], object], runs: int = 20) -> dict:
        """As calling the timer, but on a GPU with no L2 flush: one warm-up call, then
        ``runs`` calls each between CUDA events (on the CPU: the timer's own loop)."""
        if self.device.type != "cuda":
            return self(fn)
        fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        torch.cuda.synchronize()
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return quantiles([begin.elapsed_time(end) for begin, end in events])


def measure_copy_bandwidth(timer: Timer, nbytes: int) -> dict:
    """GB/s of ``dst.copy_(src)`` over two float32 buffers of ``nbytes`` each (reads + writes)."""
    n = nbytes // 4
    src = torch.randn(n, device=timer.device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    moved = 2 * n * 4  # the buffers are freed on return
    return {"bytes": moved, "buffer_bytes": n * 4, "ms": t["ms"], "ms_p20": t["ms_p20"],
            "ms_p80": t["ms_p80"], "gbps": moved / (t["ms"] * 1e-3) / 1e9,
            "what": "dst.copy_(src), float32, bytes = read + written"}


def _per_call(times: Sequence[float], runs: int, mean_ms: Optional[float] = None
              ) -> Dict[str, float]:
    return {"mean_ms": statistics.fmean(times) if mean_ms is None else mean_ms,
            "median_ms": statistics.median(times), "min_ms": min(times), "runs": runs}


def time_cpu(fn: Callable[[], object], warmup: int, runs: int, label: str) -> Dict[str, float]:
    """Per-call wall time of ``fn`` in ms (mean, median, min) over ``runs`` after ``warmup``."""
    return time_cpu_round_robin({label: fn}, warmup, runs, label)[label]


def time_cpu_round_robin(fns: Dict[object, Callable[[], object]], warmup: int, runs: int,
                         label: str) -> Dict[object, Dict[str, float]]:
    """Like :func:`time_cpu` for several functions at once, one call of each per round, so
    that a shared machine's load reaches all of them alike (their ratios are what to read).
    Returns, per key of ``fns``, its per-call wall time in ms (mean, median, min)."""
    times = cpu_loop(fns, warmup, runs, progress=Progress(label, warmup + runs))
    return {key: _per_call(t, runs) for key, t in times.items()}


def time_cuda(fn: Callable[[], object], warmup: int, runs: int, label: str) -> Dict[str, float]:
    """Mean time per call of ``fn`` in ms on the current CUDA stream: ``runs`` calls between two
    synchronisations, after ``warmup`` calls, as the authors time throughput. Also the median
    and minimum of the per-call GPU times, from CUDA events recorded around each call (no
    synchronisation between calls; read after the last one)."""
    progress = Progress(label, warmup + runs)
    for _ in range(warmup):
        fn()
        progress.step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for begin, end in events:  # (no progress output in here: its host time would count)
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    mean_ms = (time.perf_counter() - start) / runs * 1e3
    progress.step(runs)
    return _per_call([begin.elapsed_time(end) for begin, end in events], runs, mean_ms)
