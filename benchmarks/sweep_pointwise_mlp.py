"""Time many configurations of the MLP kernel in one run: the tuning sweep of a GPU session.

    python -m benchmarks.sweep_pointwise_mlp [--op mlp|block] [--dtypes float16] [--batch 256]
        [--layout channels_last|nchw] [--shapes patnet_t2.s1,fasternet_t2] [--grid small|full]
        [--json out.json] [--compile-workers N] [--budget SECONDS] [--quick]

``--op mlp`` (default): for each stage shape of ``bench_pointwise_mlp`` (PATNet-T2 and
FasterNet-T2, hidden 2C, ReLU, the block's residual) the kernel as ``pk.pointwise_mlp`` runs
it. ``--op block``: for each shape of ``bench_partial_block`` the kernel as a whole block runs
it, computing conv3x3(X1) for its tile and, for PAT_ch shapes, applying a per-(sample, channel)
affine map to X2 (random: the gate's values do not change the kernel's cost), and for
PATNet-T1's shapes running PAT_sp on the MLP's output before the residual. ``--layout``: the
activations (and the MLP op's residual) in channels_last (default: the layout the models run
under AMP, where the tiles span samples, PAT_ch's included, ``pointwise_mlp.tile_grid``) or
NCHW.

Two phases (``sweep_common``). Compiling a configuration of this kernel takes seconds of one
CPU, more than timing it: first every configuration of every shape is run once in
``--compile-workers`` processes side by side (spawned, each on the GPU with the timing run's
inputs, so that each compiles into Triton's disk cache), then, alone on the machine, each is launched once, checked
against the reference in fp32 on the same inputs, and timed with the op benchmarks' timer
(GPU: ``do_bench``, L2 flushed before every call). ``--budget``: the compile phase ends at half
of it, and no configuration starts timing past it (the rest are recorded as skipped, and the
exit status is 2). Prints per shape the configurations from fastest, the untuned default
(``default_config``) marked ``*``, with GB/s of the op's floor bytes (read X, write Y, the
weights), GB/s of the weights its programs read (each pixel tile its own copy, from L2 after
the first: :func:`benchmarks.traffic.mlp_tile_work`; near the GPU's L2 rate,
``machine_rates.py``, L2 binds the configuration), the TFLOP/s it performs (its tiles'
multiply-adds, rows past a map's last pixel included: against the matmul rate) and the share
of the fastest; a
configuration that does not compile or launch (shared memory, registers) reads ``error``.
JSON: every row, rewritten after every shape. On the CPU (``--quick``): the Triton
interpreter, shrunk shapes, two configurations: a smoke run. A report committed under
benchmarks/results/ is what ``python -m benchmarks.update_tuned_configs`` turns into the
configurations the launcher takes on that GPU architecture
(patnet_kernels/triton/tuned_configs.json).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import env, sweep_common  # noqa: E402

if not torch.cuda.is_available():  # (before anything imports triton: its interpreter, --quick)
    env.use_cpu_emulation(cuda=False)

from benchmarks import bench_partial_block, bench_pointwise_mlp, traffic  # noqa: E402
from benchmarks.op_inputs import Problem, channels_last  # noqa: E402
from benchmarks.report import matching_shapes, split_list, write_json  # noqa: E402
from benchmarks.timer import Timer  # noqa: E402
from benchmarks.tolerance import MISMATCH  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def grid(kind: str, out_channels: int, spatial: bool = False):
    """The configurations of a sweep (``pointwise_mlp.Config``; a conv head's input-channel
    step stays 32): "small" (16: the pixel tile, the hidden chunk, the output block, warps;
    8 up to 128 output channels, whose one block holds them all) or "full" (216); output
    blocks above the next power of two of C_out are left out (pure waste). From 256 output channels, without PAT_sp (``spatial``), the one-pass form (past
    256 each program a block of the outputs, recomputing the hidden activation) is timed beside
    the two-pass form (``two_pass``, the default past 256: each configuration of output blocks
    up to 128, and 256-pixel tiles of 64 outputs, which read each weight half as often per
    pixel as 128, a quarter as often as the one-pass form's 64: the traffic model's weight
    reads) and past 256 a second accumulator (``pointwise_mlp.wide_block_n2``: each
    configuration of 256-channel output blocks): at 256 "small" 26, "full" 372; at 768
    "small" 34, "full" 444."""
    from patnet_kernels.triton._common import block
    from patnet_kernels.triton.pointwise_mlp import Config, wide_block_n2

    widest = block(out_channels, high=256)
    if kind == "small":  # (output blocks of 128 and 256, or the whole output where narrower)
        blocks = tuple(dict.fromkeys(min(n, widest) for n in (128, 256)))
        space = itertools.product((64, 128), (64,), (64, 128), blocks, (4, 8), (3,))
    else:
        space = itertools.product((32, 64, 128), (32, 64), (64, 128), (64, 128, 256), (4, 8),
                                  (2, 3, 4))
    configs = [Config(*c) for c in space if c[3] <= widest]
    if spatial or out_channels < 256:
        return configs
    two_pass = [c._replace(two_pass=True) for c in configs if c.block_n <= 128]
    # (a pass's program holds block_n of its outputs at a time: 256 pixels fit in 8 warps at
    # 64 on sm_90, 205-246 registers, no spill; at 128 they spill, and on sm_80 at 64)
    big_tiles = [c._replace(two_pass=True, block_p=256, block_n=64) for c in configs
                 if c.block_p == 128 and c.warps == 8]
    second = wide_block_n2(out_channels, 256)
    wide = [c._replace(block_n2=second) for c in configs if c.block_n == 256 and second]
    return list(dict.fromkeys(configs + two_pass + big_tiles + wide))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_pointwise_mlp",
        description="Time many configurations of the MLP kernel (pk.pointwise_mlp) per stage "
                    "shape, checked against the reference.")
    parser.add_argument("--op", default="mlp", choices=["mlp", "block"],
                        help="the kernel as the MLP op runs it, or as a whole block (conv "
                             "head, PAT_ch's affine)")
    parser.add_argument("--dtypes", default="float16", help="comma list of float16, bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"],
                        help="the activations' layout (default channels_last, as the models "
                             "run under AMP)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of substrings of shape names, e.g. patnet_t2.s1")
    parser.add_argument("--grid", default="small", choices=["small", "full"])
    sweep_common.add_options(parser, "two configurations")
    args = parser.parse_args(argv)
    sweep_common.check_options(parser, args)
    return args


def _kernel_spatial(kernels, spatial):
    """PAT_sp's tensors (a SpatialAttentionParams, BN_d folded) as the kernel's launcher takes
    them."""
    p = spatial.conv_weight.shape[0]
    q = spatial.gate_weight.shape[1]
    bn_c = spatial.bn_c
    return kernels.SpatialAttention(
        spatial.gate_weight.reshape(q).contiguous(), spatial.conv_weight.reshape(p, p).contiguous(),
        spatial.conv_bias, tuple(t.float() for t in (bn_c.running_mean, bn_c.running_var,
                                                      bn_c.weight, bn_c.bias)),
        bn_c.eps, None, 0.0)


def _float(spatial):
    """PAT_sp's tensors in fp32 (the reference's)."""
    return spatial.with_weights(lambda t: None if t is None else t.float())._replace(
        bn_c=spatial.bn_c._replace(**{k: getattr(spatial.bn_c, k).float() for k in (
            "weight", "bias", "running_mean", "running_var")}))


class Case:
    """One shape's kernel call with a given configuration, its fp32 reference and the
    shipped configuration."""

    def __init__(self, op: str, shape, batch: int, dtype, device, gen, layout: str):
        from patnet_kernels.reference import pointwise_mlp as mlp_reference
        from patnet_kernels.triton import partial_conv, pointwise_mlp as kernels, tuned

        family = bench_partial_block.FAMILY if op == "block" else bench_pointwise_mlp.FAMILY
        args = family.build(shape, batch, dtype, device, "fwd", gen).args
        if layout == "channels_last":  # (the activation, and the MLP op's residual)
            args = channels_last(Problem(args)).args
        self.nbytes = family.bytes_moved(shape, batch, args[0].element_size(), "fwd")
        if op == "block":
            x, conv, cfc_weight, _, _, _, w1, b1, w2, _, activation, *rest = args
            c1 = conv.shape[0]
            taps = partial_conv.forward_taps(conv)
            scale = shift = None
            if cfc_weight is not None:
                scale, shift = (torch.rand(x.shape[0], x.shape[1] - c1, device=device,
                                           generator=gen) + 0.5 for _ in range(2))
            f32 = x.float()
            m2 = f32[:, c1:] if scale is None else f32[:, c1:] * scale[..., None, None] + \
                shift[..., None, None]
            m = torch.cat([torch.nn.functional.conv2d(f32[:, :c1], conv.float(), padding=1),
                           m2], 1)
            residual, extra = x, dict(conv_taps=taps, scale=scale, shift=shift)
        else:
            x, w1, b1, w2, _, residual, activation, *rest = args
            c1, extra, m = 0, {}, x.float()
        spatial = rest[-1] if rest else None  # (PATNet-T1's PAT_sp after the MLP)
        self.spatial_half = spatial_weights = 0  # (PAT_sp's wider half, max(Q, P))
        if spatial is not None:
            p = spatial.conv_weight.shape[0]
            self.spatial_half = max(x.shape[1] - p, p)
            extra["spatial"] = _kernel_spatial(kernels, spatial)
            spatial_weights = extra["spatial"].gate.numel() + extra["spatial"].weight.numel()
            spatial = _float(spatial)
        self.exact = mlp_reference(m, w1.float(), b1.float(), w2.float(), None,
                                   residual.float(), activation, spatial)
        mats = (w1.reshape(w1.shape[0], -1).contiguous(), w2.reshape(w2.shape[0], -1).contiguous())
        y = torch.empty_like(x)
        # (the call's key in patnet_kernels/triton/tuned_configs.json; the untuned default)
        self.key = (x.shape[1], w1.shape[0], w2.shape[0], c1, self.spatial_half)
        self.shipped = kernels.default_config(*self.key[:3], dtype, *self.key[3:])
        self.tuned = [kernels.Config(*fields) for fields in tuned.listed(
            "pointwise_mlp", dtype, self.key)]
        affine = extra.get("scale") is not None
        # (a PAT_ch block followed by another, as most are, takes the statistics of its
        # output's X2 in its epilogue: timed in that form, their chunks per configuration)
        statistics = {}

        def statistics_of(config):
            if not affine:
                return None
            chunks = kernels.stats_chunks(x, *mats, c1, self.spatial_half, config, residual)
            if chunks not in statistics:
                statistics[chunks] = tuple(torch.empty(
                    (x.shape[0], chunks, mats[1].shape[0] - c1), device=device,
                    dtype=torch.float32) for _ in range(2))
            return statistics[chunks]

        self.call = lambda config: kernels.pointwise_mlp(
            x, mats[0], b1, mats[1], None, residual, activation, y, config=config,
            statistics=statistics_of(config), stats_first=c1, **extra)

        def clear_outputs():
            """Before a configuration's check: NaN in every output, so that one that leaves
            some of it unwritten fails instead of showing the previous configuration's."""
            for out in (y, *(t for pair in statistics.values() for t in pair)):
                out.fill_(float("nan"))

        self.clear_outputs = clear_outputs
        # (every statistics chunk written: their values are the kernel tests' to check)
        self.statistics_written = lambda config: affine is False or all(
            bool(t.isfinite().all()) for t in statistics_of(config))
        # (its programs' tiles, traffic's rule: the weight bytes they read, from L2 after the
        # first read, and the multiply-adds they perform)
        self.tile_work = lambda config: traffic.mlp_tile_work(
            x, residual, y, *mats, 9 * c1 * c1, spatial_weights, affine, affine, config)


def _shapes(op: str, quick: bool, wanted: Optional[str]):
    family = bench_partial_block.FAMILY if op == "block" else bench_pointwise_mlp.FAMILY
    return matching_shapes(family.shapes(quick), wanted)


def _configs(case: "Case", kind: str, channels: int, quick: bool) -> list:
    """The configurations timed for one case, the default and those already tuned first."""
    if quick:  # (the default and one with half its pixel tile)
        return [case.shipped, case.shipped._replace(block_p=max(16, case.shipped.block_p // 2))]
    configs = grid(kind, channels, bool(case.spatial_half))
    if case.spatial_half:  # (PAT_sp: one program holds both halves, block(max(Q, P)))
        configs = [c._replace(block_n=case.shipped.block_n) for c in configs]
    return list(dict.fromkeys([case.shipped] + case.tuned + configs))


def _compile_job(op: str, quick: bool, shape_name: str, batch: int, dtype_name: str,
                 layout: str, configs: list) -> List[Optional[str]]:
    """In a worker process: each configuration's call once on ``shape_name``'s case (the
    inputs, and so the kernels' specialisation, of the timing run), which compiles it into
    Triton's disk cache; per configuration None or its error."""
    from patnet_kernels.triton.pointwise_mlp import Config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = next(s for s in _shapes(op, quick, None) if s.name == shape_name)
    gen = torch.Generator(device=device).manual_seed(0)
    case = Case(op, shape, batch, DTYPES[dtype_name], device, gen, layout)
    return sweep_common.run_each(lambda fields: case.call(Config(**fields)), configs, device)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    run = sweep_common.Run("sweep_pointwise_mlp", args)
    if run.refused():
        return 2
    device = run.device
    batch = 2 if args.quick else args.batch
    shapes = _shapes(args.op, args.quick, args.shapes)
    timer = Timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, warmup=1, runs=2)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for dtype_name in split_list(args.dtypes):
        for shape in shapes:
            case = Case(args.op, shape, batch, DTYPES[dtype_name], device, gen, args.layout)
            cases.append((dtype_name, shape, case,
                          _configs(case, args.grid, shape.channels, args.quick)))
    chunk = 4  # (configurations per job: each job builds its case's inputs once)
    run.precompile(_compile_job, [
        (args.op, args.quick, shape.name, batch, dtype_name, args.layout,
         [c._asdict() for c in configs[i:i + chunk]])
        for dtype_name, shape, _, configs in cases for i in range(0, len(configs), chunk)])
    rows, failures, report = [], 0, None
    if args.json:
        report = {"benchmark": "sweep_pointwise_mlp", "op": args.op, "layout": args.layout,
                  **env.run_info(device), "arch": run.arch(), "grid": args.grid,
                  "timing": timer.method, "budget_s": args.budget, "rows": rows}
    for dtype_name, shape, case, configs in cases:
        print(f"{shape.name} B={batch} C={shape.channels} {shape.height}x{shape.width} "
              f"{dtype_name}, {args.layout}, {args.op}: {len(configs)} configurations "
              f"({run.elapsed()})", flush=True)
        found = []
        for config in configs:
            row = dict(op=args.op, shape=shape.name, dtype=dtype_name, batch=batch,
                       key=list(case.key), config=config._asdict(),
                       shipped=config == case.shipped)
            skip = run.out_of_time()
            if skip:
                found.append(dict(row, status="skipped", reason=skip))
                continue
            try:
                case.clear_outputs()
                error = (case.call(config).float() - case.exact).abs().max().item() / \
                    case.exact.abs().max().item()
                if not case.statistics_written(config):
                    raise RuntimeError("statistics chunks left unwritten")
                if not error <= MISMATCH[DTYPES[dtype_name]]:
                    raise RuntimeError(f"max rel error {error:.2g} vs the reference")
                row.update(status="ok", max_rel_error=error,
                           **timer(lambda config=config: case.call(config)))
                row["gbps"] = case.nbytes / (row["ms"] * 1e-3) / 1e9
                work = case.tile_work(config)
                row["weight_gbps"] = traffic.weight_reads(work) / (row["ms"] * 1e-3) / 1e9
                row["tflops"] = 2 * traffic.performed_macs(work) / (row["ms"] * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001 - one failing config must not end it
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                failures += row["shipped"]
            found.append(row)
        _print_shape(found)
        rows.extend(found)
        if report is not None:
            write_json(Path(args.json), report)
    return run.finish(rows, failures)


def _print_shape(rows: List[dict]) -> None:
    timed = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["ms"])
    best = timed[0]["ms"] if timed else None
    for r in timed + [r for r in rows if r["status"] != "ok"]:
        c = r["config"]
        second = (f"+{c['block_n2']}" if c.get("block_n2") else "") + (
            " 2-pass" if c.get("two_pass") else "")
        name = (f"P{c['block_p']} K{c['block_k']} H{c['block_h']} N{c['block_n']}{second} "
                f"w{c['warps']} s{c['stages']}")
        mark = "*" if r["shipped"] else " "
        if r["status"] == "ok":
            print(f"  {mark} {name:<28} {r['ms'] * 1e3:10.1f} us {r['gbps']:9.1f} GB/s "
                  f"{r['weight_gbps']:9.1f} GB/s of weights {r['tflops']:7.1f} TFLOP/s "
                  f"{100 * best / r['ms']:6.1f}% of best")
        else:
            print(f"  {mark} {name:<28} {r['status']}: {r['reason']}")


if __name__ == "__main__":
    sys.exit(main())
