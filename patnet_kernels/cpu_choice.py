"""Measured choices on the CPU: of the ways to run a call that compute the same thing, the one
that is fastest on this machine, timed on the call's own inputs the first time a kind of call
is met, and kept for every later call of that kind.

Two choices of the CPU inference path are made this way, each in one place:

- a call of an op with a CPU eval form: the reference or the eval form
  (:func:`patnet_kernels.backends.choose_implementation`, :data:`EVAL_FORMS`);
- a float32 convolution of an eval form: ``F.conv2d`` or oneDNN with the weight reordered
  (:func:`patnet_kernels.cpu_conv.conv2d`, :data:`CONVOLUTIONS`).

Which is faster depends on the CPU and on the size of the call, more than a fixed rule can say:
oneDNN's convolutions ran the same arithmetic about 2x faster than PyTorch's own path on an
AVX-512 EPYC and 0.7-1.7x per shape on an AVX2 one (:mod:`patnet_kernels.cpu_conv`), with a
fixed cost of about 50 us a call in PyTorch's glue; the eval forms save passes on large maps
and make more, smaller ops on small ones (``python -m benchmarks.cpu_choice_speed`` times both
ways of every kind of op call of a copy).

A kind of call is its key (the caller's: the op and its tensors' shapes, strides and dtype)
and torch's thread count (``torch.get_num_threads()``: which way is faster depends on it).
Its first call runs each candidate once to warm it up, then :data:`ROUNDS` times in turn, and
keeps the last candidate (the eval form, oneDNN: the fixed path) unless another's least time of
a round is :data:`MARGIN` below the last's; the call returns the last output of the kept one.
The margin because a call timed alone is not the call in the model (its caches, the
machine's load), and within a few percent the timing cannot tell two ways apart: such ties
keep the fixed path (with the plain least time, one run of PATNet-T2's and FasterNet-T2's
copies at 224 x 224 on the AVX2 EPYC was 3% slower than with every op in its eval form; with
the margin, three runs 0.97-1.19x, within that machine's noise), while on 32 x 32 inputs,
where the eval forms lose by 7-35%, the choices made four T0-T2 copies 1.2-1.5x faster
(``python -m benchmarks.cpu_choice_speed``, its round-robin of both paths and eager).
The first call at a new input shape costs several forwards (a copy of PATNet-T2 at 224 x 224
on the AVX2 EPYC: 283 ms, then 45 a forward), and two runs of a process can choose differently
where two ways are about as fast (their outputs differ by float rounding).
``PATNET_CPU_MEASURE=0`` (read at import; or :func:`set_measuring`, :func:`measuring_as`) turns
the timing off: then the last candidate runs (the eval form, oneDNN), the same on every machine
and every run, which the traffic model and the test suite use. Under a torch.compile trace
nothing is timed (the last candidate is traced).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["CONVOLUTIONS", "EVAL_FORMS", "MARGIN", "MeasuredChoice", "ROUNDS", "measuring",
           "measuring_as", "set_measuring"]

# Timed runs of each candidate, in turn, after one warm-up run each.
ROUNDS = 3
# How much faster (a fraction of its time) another candidate must be than the last to be kept.
MARGIN = 0.05
# Whether calls are timed (PATNET_CPU_MEASURE=0: the last candidate runs).
_MEASURING = [os.environ.get("PATNET_CPU_MEASURE", "1") not in ("", "0")]


def measuring() -> bool:
    """Whether the CPU's measured choices are made (else the last candidate always runs)."""
    return _MEASURING[0]


def set_measuring(on: bool) -> bool:
    """Turn the measured choices on or off for this process (``PATNET_CPU_MEASURE``'s
    setting; off, the last candidate runs whatever was chosen before, which is kept for when
    they are on again). Returns the previous setting."""
    if not isinstance(on, bool):
        raise TypeError(f"set_measuring takes True or False, got {on!r}")
    previous, _MEASURING[0] = _MEASURING[0], on
    return previous


@contextlib.contextmanager
def measuring_as(on: bool) -> Iterator[None]:
    """:func:`set_measuring` (``on``) inside the ``with`` block, the previous setting after."""
    previous = set_measuring(on)
    try:
        yield
    finally:
        set_measuring(previous)


class MeasuredChoice:
    """Per kind of call (a hashable key), the index of the fastest of its candidates.

    name: what is chosen (for :meth:`summary`); labels: a name per candidate, in the order of
    the candidates every caller passes."""

    def __init__(self, name: str, labels: Tuple[str, ...]):
        self.name = name
        self.labels = labels
        # (torch's thread count, key) -> (index of the kept candidate, the least time of a
        # round of each, in seconds)
        self._chosen: Dict[Tuple[int, Hashable], Tuple[int, Tuple[float, ...]]] = {}

    def choose(self, key: Hashable, candidates: Sequence[Callable],
               writes_input: bool = False) -> Callable:
        """The candidate to run for a call of kind ``key``: the kept one, the last one where
        nothing is timed, or a function that times them all on the call's arguments first
        (:meth:`measure`). Each candidate takes the call's arguments, its main input first;
        ``writes_input``: the call writes into that input (an in-place op), which is then
        restored before each timed run."""
        if not _MEASURING[0] or torch.compiler.is_compiling():  # (a trace reads nothing kept)
            return candidates[-1]
        kept = self._chosen.get((torch.get_num_threads(), key))
        if kept is not None:
            return candidates[kept[0]]
        return functools.partial(self.measure, key, tuple(candidates), writes_input)

    def measure(self, key: Hashable, candidates: Tuple[Callable, ...], writes_input: bool,
                x: torch.Tensor, *args, **kwargs):
        """Time each candidate on (x, *args, **kwargs), keep one for ``key`` (the last unless
        another is MARGIN faster) and return its output (of its last run)."""
        saved = x.clone() if writes_input else None
        best = [float("inf")] * len(candidates)
        outputs: list = [None] * len(candidates)
        for round_ in range(ROUNDS + 1):  # (round 0 warms each up: caches, layouts, choices)
            for i, candidate in enumerate(candidates):
                if saved is not None:
                    x.copy_(saved)
                start = time.perf_counter()
                outputs[i] = candidate(x, *args, **kwargs)
                if round_:
                    best[i] = min(best[i], time.perf_counter() - start)
        fastest = min(range(len(candidates)), key=best.__getitem__)
        last = len(candidates) - 1
        index = fastest if best[fastest] < (1.0 - MARGIN) * best[last] else last
        self._chosen[(torch.get_num_threads(), key)] = (index, tuple(best))
        if saved is not None:  # (the kept one's output is the call's: run it once more)
            x.copy_(saved)
            return candidates[index](x, *args, **kwargs)
        return outputs[index]

    def chosen(self, key: Hashable) -> Optional[str]:
        """The label of the candidate kept for ``key`` at torch's thread count now, or None if
        none is yet."""
        kept = self._chosen.get((torch.get_num_threads(), key))
        return None if kept is None else self.labels[kept[0]]

    def records(self) -> List[Tuple[Hashable, str, Tuple[float, ...]]]:
        """Each kind of call chosen so far: (its key, the kept candidate's label, the least time
        of a round of each candidate in seconds), in the order they were made (at any thread
        count)."""
        return [(key, self.labels[index], times)
                for (_, key), (index, times) in list(self._chosen.items())]

    def summary(self) -> Dict[str, int]:
        """How many kinds of call kept each candidate so far."""
        counts = dict.fromkeys(self.labels, 0)
        for index, _ in list(self._chosen.values()):
            counts[self.labels[index]] += 1
        return counts

    def forget(self) -> None:
        """Drop every choice made (the next call of each kind is timed again)."""
        self._chosen.clear()


# An op's call on the CPU in eval: the reference or its CPU eval form.
EVAL_FORMS = MeasuredChoice("CPU eval forms", ("reference", "eval form"))
# A float32 convolution of an eval form: F.conv2d or oneDNN.
CONVOLUTIONS = MeasuredChoice("CPU convolutions", ("F.conv2d", "oneDNN"))
