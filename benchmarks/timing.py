"""Timing helpers shared by the benchmark scripts, and a plain progress display."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict

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


def time_cpu(fn: Callable[[], object], warmup: int, runs: int, label: str) -> Dict[str, float]:
    """Per-call wall time of ``fn`` in ms (mean, median, min) over ``runs`` after ``warmup``."""
    return time_cpu_round_robin({label: fn}, warmup, runs, label)[label]


def time_cpu_round_robin(fns: Dict[object, Callable[[], object]], warmup: int, runs: int,
                         label: str) -> Dict[object, Dict[str, float]]:
    """Like :func:`time_cpu` for several functions at once, one call of each per round, so
    that a shared machine's load reaches all of them alike (their ratios are what to read).
    Returns, per key of ``fns``, its per-call wall time in ms (mean, median, min)."""
    progress = Progress(label, warmup + runs)
    times: Dict[object, list] = {key: [] for key in fns}
    for i in range(warmup + runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append((time.perf_counter() - start) * 1e3)
        progress.step()
    return {key: {"mean_ms": statistics.fmean(t), "median_ms": statistics.median(t),
                  "min_ms": min(t), "runs": runs} for key, t in times.items()}


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
    for begin, end in events:
        begin.record()
        fn()
        end.record()
        progress.step()
    torch.cuda.synchronize()
    mean_ms = (time.perf_counter() - start) / runs * 1e3
    times = [begin.elapsed_time(end) for begin, end in events]
    return {"mean_ms": mean_ms, "median_ms": statistics.median(times), "min_ms": min(times),
            "runs": runs}
