"""The rule behind ``backend="auto"`` on a GPU: a fused backend only where measured faster.

A fused kernel is not faster than the reference just because it is fused: on the first GPU run
(an H200) most of ours were slower than eager PyTorch. So ``"auto"`` runs a fused backend for
an op only where a committed GPU measurement shows it faster than the reference (the ``torch``
provider of the op benchmarks) on the same kind of GPU, for the same dtype, mode and layout,
at a nearby shape; everywhere else it runs the reference.

The measurements are ``measured_speed.json`` beside this file: one point per measured case,
written by ``python -m benchmarks.update_auto_rule`` from the op benchmarks' JSON reports
committed under ``benchmarks/results/`` (what ``scripts/gpu_check.sh`` writes). To update the
rule after a GPU run: commit the run's report folder, run that command, commit the JSON.

A call is described by :class:`Call`:

- ``dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (after autocast's cast);
- ``mode``: ``"fwd"`` (no gradient will be taken: ``torch.no_grad()`` or no input requiring
  one) or ``"fwd+bwd"``, as the benchmarks' modes;
- ``layout``: ``"nchw"`` or ``"channels_last"`` of the activation (``"any"`` for the
  attention, whose (B, heads, N, d) tensors have no such choice);
- ``shape``: three sizes that set the kernel's work, per op (:func:`shape_key`).

Two calls are of one *shape class* when every size is within a factor :data:`NEAR` of the
other's; the nearest measured point of that class decides. A fused backend wins when the
reference's time over its own is at least :data:`MARGIN` (measurement noise is not a win).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

DATA = Path(__file__).resolve().parent / "measured_speed.json"
# Sizes within this factor of a measured point's are of its shape class.
NEAR = 2.0
# A fused backend must beat the reference by this factor to be chosen.
MARGIN = 1.05
FUSED = ("cuda", "triton")


class Call(NamedTuple):
    """One op call as the rule sees it (plain values, so torch.compile treats it as a
    constant)."""
    op: str
    dtype: str
    mode: str
    layout: str
    shape: Tuple[int, int, int]


def shape_key(op: str, shape: Sequence[int]) -> Tuple[int, int, int]:
    """The three sizes that set an op's work, from its main input's shape.

    rpe_attention: q (B, heads, N, d) -> (B * heads, N, d). The others: x (B, C, H, W) ->
    (B, C, H * W).
    """
    if op == "rpe_attention":
        b, heads, n, d = shape
        return (b * heads, n, d)
    b, c, h, w = shape
    return (b, c, h * w)


class Point(NamedTuple):
    """One measured case: milliseconds per provider ("torch" is the reference)."""
    gpu: str
    call: Call
    ms: Dict[str, float]
    source: str


@functools.lru_cache(maxsize=None)
def measured_points(path: str = str(DATA)) -> Tuple[Point, ...]:
    """The committed measurements (empty if the file is missing)."""
    file = Path(path)
    if not file.is_file():
        return ()
    data = json.loads(file.read_text())
    return tuple(Point(p["gpu"], Call(p["op"], p["dtype"], p["mode"], p["layout"],
                                      tuple(p["shape"])), dict(p["ms"]), p["source"])
                 for p in data["points"])


def _distance(a: Sequence[int], b: Sequence[int]) -> Optional[float]:
    """Sum of |log ratios| of the sizes, or None if one differs by more than NEAR."""
    ratios = [abs(math.log(max(x, 1) / max(y, 1))) for x, y in zip(a, b)]
    if max(ratios) > math.log(NEAR) + 1e-9:
        return None
    return sum(ratios)


def nearest_point(gpu: str, call: Call, points: Iterable[Point]) -> Optional[Point]:
    """The measured point of ``call``'s shape class on ``gpu`` nearest to it, if any."""
    best, best_distance = None, math.inf
    for point in points:
        if point.gpu != gpu or point.call[:4] != call[:4]:
            continue
        distance = _distance(point.call.shape, call.shape)
        if distance is not None and distance < best_distance:
            best, best_distance = point, distance
    return best


def choose(gpu: str, call: Call, usable: Sequence[str],
           points: Optional[Iterable[Point]] = None) -> Tuple[str, str]:
    """The backend ``"auto"`` runs ``call`` with on ``gpu`` (a device name such as
    "NVIDIA H200"), among the fused backends in ``usable``, and why: ``(name, reason)``."""
    points = measured_points() if points is None else points
    what = (f"{call.op} {call.dtype} {call.mode} {call.layout} "
            f"{'x'.join(map(str, call.shape))}")
    point = nearest_point(gpu, call, points)
    if point is None:
        return "torch", (f"no measurement of {what} (or a shape within {NEAR:g}x) on {gpu}, "
                         "so the reference runs; measure with scripts/gpu_check.sh")
    reference = point.ms.get("torch")
    timed = {name: point.ms[name] for name in FUSED if name in point.ms and name in usable}
    if reference is None or not timed:
        return "torch", (f"{point.source} times no usable fused backend against the "
                         f"reference for {what}")
    name = min(timed, key=timed.get)
    times = ", ".join(f"{n} {point.ms[n] * 1e3:.0f} us" for n in ("torch",) + FUSED
                      if n in point.ms)
    if reference / timed[name] >= MARGIN:
        return name, f"measured faster than the reference on {gpu} ({times}; {point.source})"
    return "torch", (f"no fused backend measured faster than the reference on {gpu} "
                     f"({times}; {point.source})")


def summary(gpu: str, points: Optional[Iterable[Point]] = None) -> List[str]:
    """One line per measured case on ``gpu``: the op, its class and what auto runs there."""
    points = measured_points() if points is None else points
    lines = []
    for point in points:
        if point.gpu == gpu:
            name, reason = choose(gpu, point.call, FUSED, (point,))
            lines.append(f"{point.call.op} {point.call.dtype} {point.call.mode} "
                         f"{point.call.layout} {'x'.join(map(str, point.call.shape))}: "
                         f"{name}")
    return lines
