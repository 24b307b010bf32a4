"""What every Triton kernel family shares: interpreter detection, block sizes, AOT specs."""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is defined (at import of the kernel modules).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(t: torch.Tensor) -> None:
    """Refuse a tensor the kernels in this mode cannot reach, saying what to do (the last guard
    of a registered op called directly; the functional API has chosen the backend by then)."""
    if INTERPRET and t.device.type != "cpu":
        raise RuntimeError(f"Triton was imported with TRITON_INTERPRET=1, so its kernels run on "
                           f"CPU tensors only, got a {t.device} tensor; unset TRITON_INTERPRET "
                           "before the first import of triton to run on the GPU")
    if not INTERPRET and t.device.type != "cuda":
        raise RuntimeError(f"Triton kernels need CUDA tensors, got a {t.device} tensor; use "
                           "backend='torch' on the CPU (or set TRITON_INTERPRET=1 before the "
                           "first import of triton to test the kernels on the CPU)")


def on_tensor_device(op_body: Callable) -> Callable:
    """Decorate a registered op's body: check its first argument (a tensor) with
    :func:`check_kernel_device` and run the body with that tensor's CUDA device current, since
    Triton launches on the current device (on cuda:1 while cuda:0 is current: the wrong GPU);
    the device guard only where another device is current (its Python: ~10 calls an op)."""

    @functools.wraps(op_body)
    def run(tensor, *args, **kwargs):
        check_kernel_device(tensor)
        if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return op_body(tensor, *args, **kwargs)
        return op_body(tensor, *args, **kwargs)

    # torch.library reads the schema off the signature: give it the body's, with the
    # annotations evaluated in the body's module (they may be strings there).
    run.__signature__ = inspect.signature(op_body, eval_str=True)
    return run


def upcast_dot(dtype: torch.dtype, interpret: bool = INTERPRET) -> bool:
    """Whether a kernel should convert its tl.dot operands to fp32 (with IEEE precision).

    fp32 inputs always (no TF32: the budget is the reference's own fp32 error). Under the
    interpreter also fp16/bf16, whose arithmetic it emulates wrongly (Triton issue #11584).
    """
    return interpret or dtype == torch.float32


def block(n: int, low: int = 16, high: int = 1 << 30) -> int:
    """The power of two >= n, clamped to [low, high] (tl.dot needs every dimension >= 16)."""
    return max(low, min(high, 1 << (max(int(n), 1) - 1).bit_length()))


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b (fp32 accumulator): with UPCAST in fp32 with IEEE precision (no TF32; see
    :func:`upcast_dot`), else on the operands as loaded (fp16 / bf16: tensor cores)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def hardsigmoid(z):
    """clamp(z + 3, 0, 6) / 6, as torch.nn.functional.hardsigmoid."""
    return tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0


# CUDA launches at most 65535 programs along a grid's axes 1 and 2 (2^31 - 1 along axis 0), so
# the kernels never put the batch there: each sample's programs follow one another along axis 0
# (:func:`program_of_sample`), and a launch takes any batch (B * heads > 65535 is 16384 images
# at PAT_sf's 4 heads).
MAX_GRID_YZ = 65535


@triton.jit
def program_of_sample(count):
    """(this program's index among its sample's ``count`` programs, the sample, int64) of a grid
    whose axis 0 holds ``count`` programs per sample, the samples one after another: the order
    a grid (count, B) runs in, with the batch off axis 1 (see MAX_GRID_YZ)."""
    pid = tl.program_id(0)
    return pid % count, (pid // count).to(tl.int64)


@triton.jit
def hardsigmoid_grad(z):
    """d hardsigmoid / dz: 1/6 strictly inside (-3, 3), else 0 (as PyTorch's backward)."""
    return tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)


@dataclass
class AotKernel:
    """One kernel as shipped: argument types and constexprs for an ahead-of-time compile.

    ``signature`` maps every argument name to a Triton type string ("*fp16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives each constexpr's value for this configuration.

    ``launches`` names the kinds of real launch and, for each, the integer arguments that equal
    1 in it (the innermost stride of each tensor in that layout, a flag set): a launch makes
    those constexprs, and marks its 16-byte-aligned pointers and its integers that are multiples
    of 16 ``tt.divisibility = 16``, which changes vectorisation, pipelining and shared memory.
    The AOT check compiles every kind so specialised (see ``aot.specialise``).
    """
    name: str
    fn: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    options: Dict[str, object] = field(default_factory=dict)
    launches: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_signature(fn: Callable, pointers: Dict[str, str], scalars: Dict[str, str] = None
                  ) -> Dict[str, str]:
    """A full signature for ``fn``: the given pointer and scalar types, "i32" for every other
    non-constexpr argument and "constexpr" for the constexprs."""
    scalars = scalars or {}
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name) or scalars.get(name) or "i32"
    return sig


def activation_launches(*tensors: str, pixel: str = "sw", **more: Sequence[str]
                        ) -> Dict[str, Tuple[str, ...]]:
    """``AotKernel.launches`` of a kernel over (B, C, H, W) activations whose stride arguments
    are named ``<tensor>_sb``, ``<tensor>_sc``, ...: NCHW, where each tensor's innermost stride
    ``<tensor>_<pixel>`` is 1 (``pixel="sp"`` for a flattened pixel stride), and channels_last,
    where its ``<tensor>_sc`` is 1. Each keyword adds a kind per layout with more arguments
    equal to 1: ``fwd=("w_sk",), bwd=("w_sn",)`` gives "NCHW, fwd", "NCHW, bwd",
    "channels_last, fwd" and "channels_last, bwd"."""
    base = {"NCHW": tuple(f"{t}_{pixel}" for t in tensors),
            "channels_last": tuple(f"{t}_sc" for t in tensors)}
    if not more:
        return base
    return {f"{layout}, {kind}": ones + tuple(extra)
            for layout, ones in base.items() for kind, extra in more.items()}


# (Kernel helpers appended below, not inserted above: a jit function's line numbers are part
# of the cache key of every kernel that calls it, so inserting would recompile them all.)
@triton.jit
def tile_moments(x, ok):
    """(count, mean, sum of squared deviations from the mean) of each column of the 2-D ``x``
    over its rows where ``ok``: three vectors, fp32 (a column with no entry: 0, 0, 0)."""
    count = tl.sum(ok.to(tl.float32), 0)
    mean = tl.sum(tl.where(ok, x, 0.0), 0) / tl.maximum(count, 1.0)
    centred = tl.where(ok, x - mean[None, :], 0.0)
    return count, mean, tl.sum(centred * centred, 0)


@triton.jit
def merge_moments(seen, mean, m2, count, other_mean, other_m2):
    """(count, mean, sum of squared deviations) of two disjoint sets given each one's, merged
    with Chan et al.'s formula (no E[x^2] - E[x]^2 cancellation)."""
    total = seen + count
    delta = other_mean - mean
    share = count / tl.maximum(total, 1.0)
    return total, mean + delta * share, m2 + other_m2 + delta * delta * (seen * share)


@triton.jit
def store_tile_moments(v, p_ok, offs_c, c_ok, mean_ptr, m2_ptr, row, FIRST, C):
    """Store the mean and sum of squared deviations over the valid pixels (``p_ok``) of each
    column of ``v`` (pixels x channels ``offs_c``, fp32) whose channel is in [FIRST, C), at
    ``row`` of (rows, C - FIRST) fp32 tensors: one pixel tile's statistics of a map's channels
    [FIRST, C) (a PAT_ch block's chunked statistics)."""
    keep = c_ok & (offs_c >= FIRST)
    _, mean, m2 = tile_moments(v, p_ok[:, None] & keep[None, :])
    at = row * (C - FIRST) + offs_c - FIRST
    tl.store(mean_ptr + at, mean, mask=keep)
    tl.store(m2_ptr + at, m2, mask=keep)


@triton.jit
def batch_norm_tile(x, offs_c, c_ok, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps):
    """(x - mean) * weight / sqrt(var + eps) + bias over the columns of ``x`` (pixels x channels
    ``offs_c``, fp32): a BatchNorm of given statistics on a tile, each vector (C,) fp32 (a
    column outside ``c_ok``: 0)."""
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    scale = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0) * tl.rsqrt(
        tl.load(var_ptr + offs_c, mask=c_ok, other=1.0) + eps)
    shift = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0)
    return (x - mean[None, :]) * scale[None, :] + shift[None, :]


# (imported here, below the jit functions: a line added above them changes their cache keys)
from .._types import pixel_stride  # noqa: E402


def pixel_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, channel, pixel) strides of a (B, C, H, W) tensor whose (h, w) flatten to one
    pixel stride (see :func:`patnet_kernels._types.pixel_stride`; the ops copy others first)."""
    sp = pixel_stride(t)
    if sp is None:
        raise ValueError(f"the pixels of a tensor with strides {t.stride()} do not flatten to "
                         "one stride; copy it to NCHW or channels_last first")
    return t.stride(0), t.stride(1), sp


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of two positive ints, for the launchers' grids (``triton.cdiv`` is a
    constexpr function: about 2 us a call from Python, dozens of calls per model forward)."""
    return -(-a // b)


def samples_as_rows(*tensors: torch.Tensor) -> bool:
    """Whether a kernel over the pixels of these (B, C, H, W) tensors may take their B samples
    as B * H rows of one sample, so that its pixel tiles span samples (none lost to a sample's
    last, partial tile: 49 pixels at 7 x 7 fill 77% of a 64-pixel tile): each one's samples
    follow one another at its pixel stride (channels_last and its channel slices, not NCHW),
    and every offset fits in int32. Only for kernels that treat each pixel alone (no
    neighbours, nothing per sample)."""
    for t in tensors:
        sp = pixel_stride(t)
        if (t.shape[0] < 2 or sp is None or t.stride(0) != t.shape[2] * t.shape[3] * sp
                or sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                >= 2 ** 31):
            return False
    return True



@triton.jit
def merge_rows(count, mean, m2):
    """(count, mean, sum of squared deviations) of the union of disjoint sets along axis 0 of
    ``count``, ``mean``, ``m2`` (each set's, same shape, 2-D or 3-D; a set of count 0 adds
    nothing: give masked ones count 0 and mean 0): fp32, axis 0 reduced. The sets are merged
    at once (their means weighted by count, then the spread of those means about the result),
    so a reduction over many rows loads a block of them per step, not one row per memory round
    trip."""
    total = tl.sum(count, 0)
    center = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
    spread = mean - tl.expand_dims(center, 0)
    return total, center, tl.sum(m2 + count * spread * spread, 0)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def reduction_splits(work_items: int, programs_per_split: int, per_multiprocessor: int) -> int:
    """How many splits a reduction over ``work_items`` (samples, pixel tiles) takes, each
    writing its own partial that a later step sums in a fixed order (deterministic, no atomics):
    about ``per_multiprocessor`` programs per multiprocessor of the current GPU, a split being
    ``programs_per_split`` programs. 2 under the interpreter (at batch 2 and 3 alike: the
    traffic model's per-image bytes are their difference)."""
    if INTERPRET:
        return min(work_items, 2)
    sms = _multiprocessors(torch.cuda.current_device())
    return max(1, min(work_items, cdiv(per_multiprocessor * sms, programs_per_split)))


def distinct_configurations(kernels: Iterable[AotKernel]) -> List[AotKernel]:
    """``kernels`` (a family's ``aot_kernels()`` list) with exact repeats dropped, so that each
    configuration is compiled once; raises ValueError where two different configurations
    share a name (the AOT report, ``KNOWN_SPILLS`` and the tests know a configuration by its
    name: a repeat dropped by name alone would leave the other one never compiled)."""
    by_name: Dict[str, Tuple] = {}
    distinct = []
    for kernel in kernels:
        identity = (kernel.fn, sorted(kernel.constexprs.items()),
                    sorted(kernel.signature.items()), kernel.num_warps, kernel.num_stages,
                    sorted(kernel.options.items()), sorted(kernel.launches.items()))
        known = by_name.setdefault(kernel.name, identity)
        if known is identity:
            distinct.append(kernel)
        elif known != identity:
            raise ValueError(f"two different kernel configurations are both named "
                             f"{kernel.name!r}: {known[1:]} and {identity[1:]}; put what "
                             "tells them apart into the name")
    return distinct


# The released models (SPEC.md section 5), as the families' AOT lists need them: stem width E
# (stage widths E, 2E, 4E, 8E) and the MLPs' activation. tests/test_triton_aot.py checks that
# every kernel configuration these models launch on a GPU is on the lists.
RELEASED_FASTERNET = ((40, "gelu"), (64, "gelu"), (96, "relu"), (128, "relu"), (144, "relu"),
                      (192, "relu"))
RELEASED_PATNET = ((32, "gelu"), (64, "relu"), (96, "relu"), (128, "relu"), (160, "relu"))
RELEASED_PATNET_T1 = (48, "gelu")  # (PAT_sp in its blocks)
RELEASED_STAGE_WIDTHS = tuple(sorted({
    e << stage for e, _ in RELEASED_FASTERNET + RELEASED_PATNET + (RELEASED_PATNET_T1,)
    for stage in range(4)}))
