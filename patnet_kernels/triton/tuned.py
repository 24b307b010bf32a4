"""Kernel configurations measured faster than the shipped defaults on a GPU: offline tuning.

A family's ``default_config`` gives a configuration chosen from the machine code (no spills,
tensor cores) and the traffic model; a GPU sweep (``python -m benchmarks.sweep_pointwise_mlp
--json ...``) times many at each stage shape. ``python -m benchmarks.update_tuned_configs``
turns the committed sweep reports into ``tuned_configs.json`` beside this file: for each
(GPU architecture, dtype, call key) the fastest configuration where it beat the default by at
least :data:`MARGIN`. The launchers then take it on that architecture; the ahead-of-time
check compiles every configuration listed, for every architecture.

Tuned offline, not with ``triton.autotune``: no timing runs and host syncs on a first call,
nothing that changes between runs or breaks a CUDA-graph capture, and every shipped
configuration compiled and read (spills, tensor cores) in CI before it ships.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._common import INTERPRET

DATA = Path(__file__).resolve().parent / "tuned_configs.json"
# A configuration must beat the default by this factor in the sweep to be listed.
MARGIN = 1.03


def dtype_name(dtype: torch.dtype) -> str:
    """"float16", "bfloat16", "float32": a dtype as the table names it."""
    return str(dtype).rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def table(family: str) -> Dict[Tuple, Tuple[int, ...]]:
    """{(arch, dtype name, *key): configuration fields} of ``family`` in :data:`DATA`."""
    entries = json.loads(DATA.read_text()).get(family, [])
    return {(e["arch"], e["dtype"], *e["key"]): tuple(e["config"]) for e in entries}


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def lookup(family: str, dtype: torch.dtype, key: Sequence[int],
           device: Optional[torch.device]) -> Optional[Tuple[int, ...]]:
    """The tuned configuration's fields of a ``family`` call with this dtype and ``key`` on
    ``device``'s architecture, or None (none listed, no CUDA device, the interpreter)."""
    entries = table(family)
    if not entries or INTERPRET or device is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return entries.get((_arch(index), dtype_name(dtype), *key))


def listed(family: str, dtype: torch.dtype, key: Sequence[int]) -> List[Tuple[int, ...]]:
    """Every tuned configuration of this call on any architecture (the AOT check's)."""
    name = dtype_name(dtype)
    return [config for (_, d, *k), config in sorted(table(family).items())
            if d == name and tuple(k) == tuple(key)]
