"""Print the README's model table: parameters and FLOPs of every variant, computed by the package.

    python benchmarks/model_table.py [--size 224]

FLOPs follow fvcore's convention (one multiply-add = one FLOP); the models are built on the
"meta" device, so this takes a few seconds and no memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patnet  # noqa: E402
from benchmarks.report import pretty  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args(argv)
    print(f"| model | E | depths | act | PAT_sp | parameters | FLOPs at {args.size} |")
    print("|---|---|---|---|---|---:|---:|")
    for name in patnet.list_models():
        with torch.device("meta"):
            model = patnet.create_model(name).eval()
        config = patnet.VARIANTS[name]
        sp = {True: "yes", False: "no"}.get(config.get("use_spatial_attn"), "-")
        flops = patnet.count_flops(model, (1, 3, args.size, args.size))
        print(f"| {pretty(name)} | {config['embed_dim']} | "
              f"{','.join(map(str, config['depths']))} | { {'GELU': 'GELU', 'RELU': 'ReLU'}[config['act_layer']]} | {sp} | "
              f"{patnet.count_params(model):,} | {flops / 1e9:.3f}G |")


if __name__ == "__main__":
    main()
