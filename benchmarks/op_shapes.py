"""Stage shapes of the op benchmarks, read off the model code.

A family's shapes are the inputs of its op in each stage of a real network: the network is
built on the "meta" device (no memory, no compute) and forward pre-hooks record what each
module of the family receives during a forward of one 224 x 224 image; ``--quick`` uses the
same networks shrunk (QUICK_CONFIG).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import patnet
from patnet.layers import BasicStage

# The stage shapes of the real networks at 224 x 224; --quick uses the same networks shrunk
# (embed_dim 8, one block per stage, 32 x 32 input: stage maps 8, 4, 2, 1).
FULL_CONFIG: Dict[str, object] = {"input_size": 224}
QUICK_CONFIG: Dict[str, object] = {"input_size": 32, "embed_dim": 8, "depths": (1, 1, 1, 1)}


@dataclass(frozen=True)
class StageShape:
    """The input of one op in one stage of a network: (C, H, W) at batch 1 and the split."""

    model: str        # e.g. "patnet_t2"
    stage: int        # 1..4
    channels: int     # C
    height: int
    width: int
    split: int        # C1 (conv channels) for PConv / PAT_ch, P (conv channels) for PAT_sp,
                      # heads for the attention of PAT_sf
    blocks: int       # how many blocks of the network run the op at this shape
    tag: str = ""     # tells apart shapes of one stage read at different input sizes

    @property
    def name(self) -> str:
        return f"{self.model}.s{self.stage}" + (f".{self.tag}" if self.tag else "")


def meta_network(model_name: str, quick: bool = False, **overrides) -> Tuple[nn.Module, int]:
    """The network on the "meta" device (no memory, no compute), in eval mode, and its input
    size: the real one at 224 x 224, or with ``quick`` the shrunk one of QUICK_CONFIG."""
    config = dict(QUICK_CONFIG if quick else FULL_CONFIG)
    size = config.pop("input_size")
    config.update(overrides)
    with torch.device("meta"):
        return patnet.create_model(model_name, backend="torch", **config).eval(), size


def stage_shapes(model_name: str, module_types: tuple, split_of: Callable[[object], int],
                 quick: bool = False, input_hw: Optional[Tuple[int, int]] = None,
                 tag: str = "", stages: Optional[Sequence[int]] = None,
                 **overrides) -> List[StageShape]:
    """The shapes at which ``model_name`` calls the modules of ``module_types``.

    Builds the network on the "meta" device (no memory, no compute) and records, with forward
    pre-hooks, the input of each such module during a forward of one 224 x 224 image (with
    ``quick``, the shrunk network of QUICK_CONFIG; ``input_hw`` = (height, width) sets another
    input size, e.g. a detection image). ``split_of(module)`` gives the channel split (or what
    the family keeps in ``split``). Returns one StageShape per distinct (stage, shape, split),
    in stage order, named with ``tag`` if given; ``stages`` keeps only those stages.
    """
    model, size = meta_network(model_name, quick, **overrides)
    height, width = input_hw if input_hw is not None else (size, size)
    found: Dict[tuple, int] = {}
    handles = []
    stage = 0
    for child in model.stages:
        if not isinstance(child, BasicStage):  # the merging layers between stages
            continue
        stage += 1
        for module in child.modules():
            if isinstance(module, module_types):
                def hook(mod, inputs, stage=stage):
                    _, c, h, w = inputs[0].shape
                    key = (stage, int(c), int(h), int(w), int(split_of(mod)))
                    found[key] = found.get(key, 0) + 1
                handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.empty(1, model.in_chans, height, width, device="meta"))
    for handle in handles:
        handle.remove()
    return [StageShape(model_name, s, c, h, w, split, n, tag)
            for (s, c, h, w, split), n in sorted(found.items())
            if stages is None or s in stages]
