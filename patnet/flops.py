"""Parameter and FLOP counts by fvcore's convention (one multiply-add counts as one FLOP).

Counted as fvcore's ``FlopCountAnalysis`` counts them: convolutions and matrix products
(multiply-adds, biases not counted), BatchNorm (eval: 2 per element with affine, 1 without;
training: 5 / 4), LayerNorm (5 per element with affine, 4 without) and adaptive average pooling
(1 per input element). Element-wise ops, softmax, means and stds are not counted, as in fvcore.
Fused attention (``scaled_dot_product_attention``'s kernels), which the authors' code does not
call, counts as its two matrix products. :func:`op_macs` counts one op (the traffic model's
roofline uses it), the convolutions' backward too (one forward convolution per gradient asked).
The model runs on the "meta" device when built there, so counting a large model costs nothing.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _numel(t) -> int:
    return math.prod(t.shape)


def _batch_norm(training_arg: int):
    def count(args, out) -> int:
        x, weight = args[0], args[1]
        training = bool(args[training_arg]) if training_arg is not None else False
        if training:
            return _numel(x) * (5 if weight is not None else 4)
        return _numel(x) * (2 if weight is not None else 1)
    return count


def _convolution(args, out) -> int:
    weight = args[1]
    return _numel(out) * math.prod(weight.shape[1:])


def _convolution_backward(args, out) -> int:
    """One forward convolution's multiply-adds per gradient asked (input, weight; the bias's
    is a sum): args (grad_output, input, weight, ..., output_mask)."""
    grad_output, weight, output_mask = args[0], args[2], args[10]
    return _numel(grad_output) * math.prod(weight.shape[1:]) * sum(map(bool, output_mask[:2]))


def _mm(args, out) -> int:
    a, b = args[-2], args[-1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(args, out) -> int:
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _attention(args, out) -> int:
    q, k, v = args[0], args[1], args[2]  # (..., N, d), (..., N_k, d), (..., N_k, d_v)
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def layer_norm_macs(values: int, affine: bool) -> int:
    """A LayerNorm over ``values`` values: 4 per value, 5 with its affine (fvcore's count)."""
    return values * (5 if affine else 4)


def _layer_norm(args, out) -> int:
    return layer_norm_macs(_numel(args[0]), len(args) > 2 and args[2] is not None)


_COUNTERS = {
    aten.convolution.default: _convolution,
    aten.convolution_backward.default: _convolution_backward,
    aten.mm.default: _mm,
    aten.addmm.default: lambda args, out: _mm(args[1:], out),
    aten.bmm.default: _bmm,
    aten.native_batch_norm.default: _batch_norm(5),
    aten._native_batch_norm_legit.default: _batch_norm(5),
    aten._native_batch_norm_legit.no_stats: _batch_norm(3),
    aten._native_batch_norm_legit_no_training.default: _batch_norm(None),
    aten.native_layer_norm.default: _layer_norm,
    aten.baddbmm.default: lambda args, out: _bmm(args[1:], out),
    **{getattr(aten, name).default: _attention for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
       if hasattr(aten, name)},
}


# The matrix products' and convolutions' other overloads (``out=``: CUDA's PAT_sf projection)
# take the same leading arguments.
_BY_PACKET = {op.overloadpacket: _COUNTERS[op] for op in (
    aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.baddbmm.default)}


def op_macs(func, args, out) -> int:
    """Multiply-adds of one call of the aten op ``func`` (an OpOverload) by the counters above;
    0 for the ops they do not count."""
    counter = _COUNTERS.get(func) or _BY_PACKET.get(func.overloadpacket)
    return counter(args, out) if counter is not None else 0


class _FlopCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += op_macs(func, args, out)
        return out


def count_flops(model: nn.Module, input_size: Tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """FLOPs (multiply-adds) of one forward of ``model`` on a zero input of ``input_size``.

    Runs the model as it is (its mode and device: use eval mode for inference FLOPs) under
    ``torch.no_grad``.
    """
    param = next(model.parameters())
    x = torch.zeros(input_size, dtype=param.dtype, device=param.device)
    counter = _FlopCounter()
    pooled = []

    def count_pool(module, inputs, output):
        pooled.append(_numel(inputs[0]))

    hooks = [m.register_forward_hook(count_pool) for m in model.modules()
             if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d))]
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.total + sum(pooled)
