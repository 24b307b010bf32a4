"""The op benchmark harness in one import (bench_partial_conv.py and the other family scripts).

The harness lives in focused modules; this module gathers their public names, under the names
they had when it held them all, for code and tests that use ``benchmarks.op_bench``:

* op_shapes  StageShape, stage_shapes: the stage shapes, read off the model code
* op_inputs  Problem, random_* and channels_last: the seeded inputs of a case
* op_family  Family, Target, MODES: what a family script declares
* op_parity  the check of every provider against the reference
* op_cases   run_case: one case, every provider checked then timed (timer.Timer)
* op_tables  format_table, summary_lines, check_targets: what is printed
* op_cli     parse_args, run: the command line

See benchmarks/README.md.
"""
from __future__ import annotations

from benchmarks.env import package_version as _version, slug as _slug
from benchmarks.op_cases import make_impl, run_case, timed_call as _timed_call
from benchmarks.op_cli import main_of, parse_args, run
from benchmarks.op_family import BASE_PROVIDERS, BEST_OF, MODES, Family, Target
from benchmarks.op_inputs import (Problem, channels_last as _channels_last, param_bytes,
                                  random_activation, random_batch_norm, random_weight)
from benchmarks.op_parity import fp32_expected as _fp32_expected, outputs as _outputs
from benchmarks.op_shapes import FULL_CONFIG, QUICK_CONFIG, StageShape, stage_shapes
from benchmarks.op_tables import check_targets, format_table, summary_lines
from benchmarks.providers import Unavailable, compile_settings as _compile_settings
from benchmarks.report import fmt as _fmt, geomean, split_list as _split
from benchmarks.timer import Timer, measure_copy_bandwidth
from benchmarks.tolerance import DTYPE_NAMES, DTYPES, MISMATCH, max_rel_error as _rel_error

__all__ = [
    "BASE_PROVIDERS", "BEST_OF", "DTYPES", "DTYPE_NAMES", "FULL_CONFIG", "MISMATCH", "MODES",
    "QUICK_CONFIG", "Family", "Problem", "StageShape", "Target", "Timer", "Unavailable",
    "check_targets", "format_table", "geomean", "main_of", "make_impl",
    "measure_copy_bandwidth", "param_bytes", "parse_args", "random_activation",
    "random_batch_norm", "random_weight", "run", "run_case", "stage_shapes", "summary_lines",
    "_channels_last", "_compile_settings", "_fmt", "_fp32_expected", "_outputs", "_rel_error",
    "_slug", "_split", "_timed_call", "_version",
]
