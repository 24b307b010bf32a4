"""What the kernels' GPU tuning sweeps share (``sweep_pointwise_mlp``, ``sweep_rpe_attention``):
their common options, the run's clock, the parallel compile before timing, and the run's end.

A sweep first runs every configuration once in spawned processes side by side, so that each
compiles into Triton's disk cache (seconds of a CPU each, more than timing it), then times them
alone on the machine. ``--budget`` bounds the whole run: the compile phase ends at half of it
and no configuration starts timing past it (recorded as skipped; exit status 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Optional

import torch


def add_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--warmup-ms, --rep-ms, --json, --compile-workers, --budget and --quick; ``what``: what
    --quick shrinks it to (e.g. "two configurations per shape")."""
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=40.0)
    parser.add_argument("--json", default=None,
                        help="write every row here (rewritten after every shape)")
    parser.add_argument("--compile-workers", type=int, default=None, metavar="N",
                        help="first run every configuration once in N processes, in parallel, "
                             "so that each compiles there (Triton's disk cache) and the timing "
                             "that follows, alone on the machine, finds it compiled (default: "
                             "the CPUs less 2, at most 16, on a GPU; 0 under --quick; 0: "
                             "compile each as it is first timed)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="wall time of the whole run: the parallel compile stops at half "
                             "of it, and no configuration starts timing after it (those left "
                             "are recorded as skipped); default: no limit")
    parser.add_argument("--quick", action="store_true",
                        help=f"shrunk shapes, batch 2, {what} (the CPU smoke run)")


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a negative --compile-workers and a --budget that is not positive."""
    if args.compile_workers is not None and args.compile_workers < 0:
        parser.error(f"--compile-workers must be 0 or more, got {args.compile_workers}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")


class Run:
    """One sweep's device, clock and budget (from its parsed options)."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.start = time.monotonic()
        self.deadline = None if args.budget is None else self.start + args.budget
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        workers = args.compile_workers
        if workers is None:
            workers = 0 if args.quick else max(1, min(16, (os.cpu_count() or 4) - 2))
        self.workers = workers

    def refused(self) -> bool:
        """True (and says why) when there is no GPU and the run is not --quick."""
        if self.device.type == "cpu" and not self.args.quick:
            print(f"{self.name}: no GPU here; timing configurations under the Triton "
                  "interpreter says nothing, run with --quick for a smoke run", file=sys.stderr)
            return True
        return False

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.start:.0f} s"

    def arch(self) -> Optional[int]:
        """The GPU's architecture as 10 * major + minor (90: H100 / H200), None on the CPU."""
        if self.device.type != "cuda":
            return None
        major, minor = torch.cuda.get_device_capability(self.device)
        return 10 * major + minor

    def out_of_time(self) -> Optional[str]:
        """The skip reason once past the deadline, else None."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"out of time (--budget {self.args.budget:g} s)"
        return None

    def precompile(self, compile_job: Callable[..., List[Optional[str]]],
                   jobs: List[tuple]) -> dict:
        """:func:`precompile` in this run's workers, until half its budget."""
        total = sum(len(job[-1]) for job in jobs)
        if self.workers and jobs:
            print(f"compiling {total} configurations in {self.workers} processes", flush=True)
        deadline = None if self.deadline is None else self.start + self.args.budget / 2
        return precompile(compile_job, jobs, self.workers, deadline)

    def finish(self, rows: List[dict], failures: int) -> int:
        """The run's last lines and exit status: 1 if a shipped configuration failed, 2 if some
        configuration was not timed, else 0."""
        if self.args.json:
            print(f"Report written to {self.args.json}")
        skipped = sum(r["status"] == "skipped" for r in rows)
        if skipped:
            print(f"{skipped} of {len(rows)} configurations not timed: out of time "
                  f"(--budget {self.args.budget:g} s)")
        return 1 if failures else 2 if skipped else 0


def run_each(call: Callable[[object], object], configs: list, device: torch.device
             ) -> List[Optional[str]]:
    """A compile job's body: ``call(config)`` once per configuration (compiling it into
    Triton's disk cache); per configuration None or its error (the timing run reports it)."""
    errors = []
    for config in configs:
        try:
            call(config)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - the timing run reports it
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return errors


def precompile(compile_job: Callable[..., List[Optional[str]]], jobs: List[tuple], workers: int,
               deadline: Optional[float]) -> dict:
    """Run ``compile_job`` (a module-level function: a sweep's, which runs each configuration of
    its last argument once and returns per configuration None or its error) over ``jobs`` (its
    arguments) in ``workers`` spawned processes until ``deadline`` (time.monotonic(); None:
    all): counts of configurations compiled, failed and left."""
    import concurrent.futures
    import multiprocessing

    counts = {"compiled": 0, "failed": 0, "left": sum(len(j[-1]) for j in jobs)}
    if not jobs or workers <= 0:
        return counts
    start = time.monotonic()
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(compile_job, *job): job for job in jobs}
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for future in concurrent.futures.as_completed(futures, timeout=timeout):
            try:
                errors = future.result()
            except Exception:  # noqa: BLE001 - a crashed worker: the timing run compiles
                continue
            counts["left"] -= len(errors)
            counts["failed"] += sum(e is not None for e in errors)
            counts["compiled"] += sum(e is None for e in errors)
            print(f"  compiled {counts['compiled'] + counts['failed']} configurations "
                  f"({counts['failed']} failed) in {time.monotonic() - start:.0f} s",
                  flush=True)
    except concurrent.futures.TimeoutError:
        print(f"  compile: out of time, {counts['left']} configurations left to compile "
              "as they are timed", flush=True)
        # (workers still compiling would load the CPUs the timing's launches need)
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return counts
