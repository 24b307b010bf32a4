"""Input validation shared by every backend: checked once, before anything is computed."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._types import BatchNormParams

# Activation dtypes whose BatchNorm tensors may stay float32 (mixed precision, autocast).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object) -> None:
    """t must be a torch.Tensor (not None, a list, a number)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_activation(name: str, x: torch.Tensor, layout: str = "(B, C, H, W)") -> None:
    """x must be a floating tensor with one dimension per name in ``layout``, none of them
    empty but the batch (a layout starting with B may have B = 0)."""
    if not isinstance(x, torch.Tensor):
        check_tensor(name, x)
    if x.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must be {layout}, got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")
    batched = layout.startswith("(B,")
    if 0 in (x.shape[1:] if batched else x.shape):
        raise ValueError(f"{name} must be {layout} with no empty dimension"
                         f"{' but the batch' if batched else ''}, got shape {tuple(x.shape)}")


def check_flag(name: str, value: object) -> None:
    """value must be True or False (not a string or a tensor, whose truth would be taken)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_number(name: str, value: object, low: float, high: float = float("inf"),
                 high_open: bool = True) -> None:
    """value must be a real number (not a bool; a NumPy scalar is one) in [low, high) (or
    [low, high])."""
    # (float and int named before the ABC, whose check is Python code: the common cases first)
    if isinstance(value, bool) or not isinstance(value, (float, int, numbers.Real)) or not (
            low <= value and (value < high or not high_open and value <= high)):
        bound = (f">= {low:g}" if high == float("inf")
                 else f"in [{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"{name} must be a{' finite' if high == float('inf') else ''} number "
                         f"{bound}, got {value!r}")


def check_statistics_of(statistics_of: object, channels: int) -> None:
    """``statistics_of`` of an op whose output of ``channels`` channels can give the next PAT_ch
    block its X2's statistics: None, or that block's C1, an int (not a bool) in [0, channels)."""
    if statistics_of is not None and (isinstance(statistics_of, bool)
                                      or not isinstance(statistics_of, int)
                                      or not 0 <= statistics_of < channels):
        raise ValueError(f"statistics_of must be the next PAT_ch block's C1 (the first channel "
                         f"of the statistics), an int in [0, {channels}), got {statistics_of!r}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], why: str = "") -> None:
    if isinstance(t, torch.Tensor) and t.shape == tuple(shape):
        return
    check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        hint = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Every tensor in ``others`` must share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            check_tensor(name, t)
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "move them to one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} is {t.dtype} but {ref_name} is {ref.dtype}; "
                            "cast them to one dtype")


def check_same_or_float32(ref_name: str, ref: torch.Tensor,
                          **others: Optional[torch.Tensor]) -> None:
    """Every tensor in ``others`` on ``ref``'s device and in its dtype, or float32 beside
    float16 / bfloat16 ``ref`` (a parameter the op reads in float32: under autocast it is not
    cast, see :func:`patnet_kernels.functional.autocast_aware`)."""
    half = ref.dtype in (torch.float16, torch.bfloat16)
    for name, t in others.items():
        if t is None:
            continue
        check_tensor(name, t)
        if half and t.dtype == torch.float32:
            check_device(ref_name, ref, **{name: t})
            continue
        check_same(ref_name, ref, **{name: t})


def check_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):
            check_tensor(name, t)
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "move them to one device")


def check_conv_weight(name: str, weight: torch.Tensor, channels: int, kernel: int,
                      min_rest: int = 0, split: str = "C1") -> int:
    """weight must be (C1, C1, k, k) with 1 <= C1 <= channels - min_rest; returns C1.

    ``min_rest`` is how many channels the other half of the split needs (1 where an attention
    runs on the rest, 0 for the plain passthrough of PConv); ``split``: what the op's
    docstring calls C1 (PAT_sp: P).
    """
    check_tensor(name, weight)
    if weight.dim() != 4 or weight.shape[0] != weight.shape[1] \
            or tuple(weight.shape[2:]) != (kernel, kernel):
        raise ValueError(f"{name} must be ({split}, {split}, {kernel}, {kernel}), got "
                         f"{tuple(weight.shape)}")
    c1 = weight.shape[0]
    if not 1 <= c1 <= channels - min_rest:
        rest = " and leave at least one channel for the other half" if min_rest else ""
        raise ValueError(f"{name} covers {split}={c1} channels but the input has C={channels}; "
                         f"the channel split needs {split} >= 1{rest} "
                         f"({split} <= {channels - min_rest})")
    return c1


def check_batch_norm(name: str, bn: Optional[BatchNormParams], channels: int, ref: torch.Tensor,
                     training: bool, optional: bool = False) -> None:
    """A BatchNormParams over ``channels`` channels on ref's device, usable in this mode."""
    if bn is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(bn, BatchNormParams):
        raise TypeError(f"{name} must be a patnet_kernels.BatchNormParams, got "
                        f"{type(bn).__name__}")
    dtypes = set()
    for field, t in zip(("weight", "bias", "running_mean", "running_var"), bn[:4]):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (channels,) or t.device != ref.device:
            check_shape(f"{name}.{field}", t, (channels,),
                        f"one value per channel of {channels}")
            check_device("input", ref, **{f"{name}.{field}": t})
        if t.dtype != ref.dtype and not (t.dtype == torch.float32 and ref.dtype in LOW_PRECISION):
            raise TypeError(f"{name}.{field} is {t.dtype} but the input is {ref.dtype}; a "
                            "BatchNorm's tensors must be the input's dtype, or float32 for a "
                            "float16/bfloat16 input (as under torch.autocast)")
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise TypeError(f"{name}'s tensors mix dtypes ({', '.join(sorted(map(str, dtypes)))}); "
                        "cast them to one")
    check_number(f"{name}.eps", bn.eps, 0.0)
    check_number(f"{name}.momentum", bn.momentum, 0.0, 1.0, high_open=False)
    if not training and (bn.running_mean is None or bn.running_var is None):
        raise ValueError(f"{name} has no running statistics: in eval (and in an inference op) "
                         "a BatchNorm normalises with them; give its running_mean and "
                         "running_var, or run the op with training=True where it has one")


def check_batch_values(values: int, shape: Sequence[int]) -> None:
    """A BatchNorm in training needs more than one value per channel (``F.batch_norm``'s error,
    for every backend alike): ``values`` per channel in an input of ``shape``."""
    if values <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")
