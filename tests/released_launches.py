"""Which Triton kernel configurations the released models launch on a GPU that the ahead-of-time
check (``python -m patnet_kernels.triton.aot``) does not compile.

    python tests/released_launches.py [--models patnet_t0,fasternet_t0] [--size 224]
                                      [--without NAME]

Must run without TRITON_INTERPRET: the launchers then choose their tiles as on a GPU. Each
model's inference copy (``optimize_for_inference(backend="triton")``) and training step
(``backend="triton"``, forward and backward) run on CPU tensors with every Triton launch
recorded and not run (its outputs stay as allocated: nothing on these paths branches on
values), in fp32, under fp16 autocast and as a bf16 model (:data:`PRECISIONS`), NCHW and
channels_last, batch 2 at ``--size``. A launch is covered when some kernel of its family's
``aot_kernels()`` has its constexprs, num_warps, num_stages and pointer dtypes, and a kind of
launch whose arguments equal to 1 are the launch's (in a training step only those that are
not strides: see :func:`_covers`). Prints one line per configuration not covered (with the
first mode that launched it) and ``covered: N launches, M configurations missing``; exits 1
if any is missing. tests/test_triton_aot.py runs it.

Without a GPU the launchers' GPU-only queries are answered as on an H100 (132
multiprocessors, device 0: :mod:`benchmarks.gpu_launches`): they set grid sizes and reduction
splits, and a launch with one split is a kind of its own, compiled. The aten convolutions and
matrix products are not computed (``GemmsShapesOnly``): at 224 x 224 they took most of the
time.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Dict, FrozenSet, List, Tuple

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: under the interpreter the launchers choose other tiles")

import triton.runtime.jit as jit  # noqa: E402

import patnet  # noqa: E402
from benchmarks.gpu_launches import launch_as_on_a_gpu, run_model  # noqa: E402
from patnet_kernels import registry  # noqa: E402
from patnet_kernels.triton import _common  # noqa: E402

DTYPES = {**_common.TRITON_DTYPE, torch.int32: "i32", torch.int64: "i64", torch.int8: "i8",
          torch.uint8: "u8"}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
# (name, autocast dtype, model dtype): fp32; fp16 autocast; the model in bf16 (which makes
# its BatchNorms' vectors bf16 too). The launchers choose no tile by which half dtype it is,
# so each half dtype is taken once.
PRECISIONS = (("fp32", None, torch.float32), ("fp16 autocast", torch.float16, torch.float32),
              ("bf16 model", None, torch.bfloat16))


def _record(launches: List[Tuple]) -> None:
    """Append (kernel, {argument: value}) of every Triton launch to ``launches``, not run."""
    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, {**dict(zip(self.arg_names, args)), **kwargs}))
    jit.JITFunction.run = run


def _constexprs(fn, bound: Dict) -> Dict:
    return {name: bound.get(name, param.default) for name, param in zip(fn.arg_names, fn.params)
            if param.is_constexpr}


def _unit_integers(fn, bound: Dict) -> FrozenSet[str]:
    """The integer arguments equal to 1, which the launch makes constexprs (not bools)."""
    return frozenset(name for name, param in zip(fn.arg_names, fn.params)
                     if not param.is_constexpr and type(bound.get(name)) is int
                     and bound[name] == 1)


def _covers(kernel, bound: Dict, training: bool) -> bool:
    """Whether ``kernel`` (an AOT configuration) compiles this launch: its constexprs,
    num_warps, num_stages and pointer dtypes, and a kind of launch (``AotKernel.launches``)
    with the launch's unit integers. In a training step the unit strides are left out: which
    gradients come channels_last follows the aten ops' backward, which lay them out
    differently on the CPU and on a GPU (a runtime stride: one more compile, not other
    tiles)."""
    if (kernel.num_warps, kernel.num_stages) != (bound.get("num_warps", 4),
                                                 bound.get("num_stages", 3)):
        return False
    if kernel.constexprs != _constexprs(kernel.fn, bound):
        return False
    if not all("*" + DTYPES[value.dtype] == kernel.signature[name]
               for name, value in bound.items() if isinstance(value, torch.Tensor)):
        return False
    ones = _unit_integers(kernel.fn, bound)
    kinds = [frozenset(kind) for kind in kernel.launches.values()] or [frozenset()]
    if training:
        ones, kinds = _flags(ones), [_flags(kind) for kind in kinds]
    return ones in kinds


_STRIDE = re.compile(r"(_s[a-z]|^s[a-z]_[a-z])$")  # (x_sc, w_si; the attention's sq_d)


def _flags(names: FrozenSet[str]) -> FrozenSet[str]:
    return frozenset(name for name in names if not _STRIDE.search(name))


def _modes(model_name: str):
    """(label, model, training, memory format, autocast dtype, input dtype) of each mode, the
    model built once per kind (inference copy, training model) and cast in place."""
    torch.manual_seed(0)
    train = patnet.create_model(model_name, backend="triton").train()
    torch.manual_seed(0)
    infer = patnet.optimize_for_inference(patnet.create_model(model_name).eval(),
                                          backend="triton")
    for kind, model, training in (("inference", infer, False), ("training", train, True)):
        for precision, amp, dtype in PRECISIONS:
            for layout, fmt in LAYOUTS.items():
                model = model.to(dtype=dtype, memory_format=fmt)
                yield (f"{model_name} {kind} {layout} {precision}", model, training, fmt, amp,
                       dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(patnet.list_models()),
                        help="comma-separated model names (default: every released one)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--without", default="", metavar="NAME",
                        help="leave this AOT configuration out of the lists (to see that the "
                             "check notices)")
    args = parser.parse_args(argv)
    launch_as_on_a_gpu()
    shipped = {}
    for family in registry.families("triton"):
        module = __import__(f"patnet_kernels.triton.{family}", fromlist=["aot_kernels"])
        for kernel in module.aot_kernels():
            if kernel.name != args.without:
                shipped.setdefault(kernel.fn, []).append(kernel)
    launches: List[Tuple] = []
    _record(launches)
    missing, total = {}, 0
    for name in args.models.split(","):
        for label, model, training, fmt, amp, dtype in _modes(name):
            x = torch.randn(2, 3, args.size, args.size, dtype=dtype).contiguous(
                memory_format=fmt)
            run_model(model, x, training, amp)
            for fn, bound in launches:
                if not any(_covers(k, bound, training) for k in shipped.get(fn, [])):
                    pointers = sorted({DTYPES[v.dtype] for v in bound.values()
                                       if isinstance(v, torch.Tensor)})
                    ones = _unit_integers(fn, bound)
                    key = (fn.__name__, tuple(sorted(_constexprs(fn, bound).items())),
                           bound.get("num_warps", 4), bound.get("num_stages", 3),
                           tuple(pointers), tuple(sorted(_flags(ones) if training else ones)))
                    missing.setdefault(key, label)
            total += len(launches)
            launches.clear()
    for (fn, constexprs, warps, stages, pointers, ones), label in missing.items():
        print(f"not compiled ahead of time: {fn} {dict(constexprs)} num_warps={warps} "
              f"num_stages={stages} pointers {'/'.join(pointers)}, equal to 1: "
              f"{', '.join(ones) or 'none'} (first in {label})")
    print(f"covered: {total} launches, {len(missing)} configurations missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
