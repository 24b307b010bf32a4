"""The inputs of one op benchmark case: seeded random activations, weights and BatchNorms.

Every provider of a case gets the same :class:`Problem` (drawn once from a seeded generator of
the device); ``--layout channels_last`` lays its activation out channels_last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

import patnet_kernels as pk

Tensor = torch.Tensor


@dataclass
class Problem:
    """The inputs of one case. ``args`` are the positional arguments of the reference function
    (and, through ``Family.functional``, of the functional API); ``leaves`` the tensors that
    require a gradient in fwd+bwd mode (x and every weight)."""

    args: tuple
    leaves: List[Tensor] = field(default_factory=list)


def channels_last(problem: Problem) -> Problem:
    """The problem with its activations laid out channels_last, as a channels_last network
    passes them: the first argument and every other 4-D tensor of its shape (a residual),
    each still a leaf that requires a gradient where it did."""
    shape = problem.args[0].shape
    moved = {}

    def move(arg):
        if not (isinstance(arg, torch.Tensor) and arg.dim() == 4 and arg.shape == shape):
            return arg
        moved[id(arg)] = arg.detach().contiguous(memory_format=torch.channels_last) \
            .requires_grad_(arg.requires_grad)
        return moved[id(arg)]

    args = tuple(move(arg) for arg in problem.args)
    return Problem(args, [moved.get(id(leaf), leaf) for leaf in problem.leaves])


def param_bytes(tensors: Sequence[Optional[object]], elem: int) -> int:
    """Bytes of the parameter tensors (None entries and BatchNormParams are handled)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, pk.BatchNormParams):
            total += param_bytes([t.weight, t.bias, t.running_mean, t.running_var], elem)
        else:
            total += t.numel() * elem
    return total


def random_weight(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> Tensor:
    """Normal weights with std 1 / sqrt(fan_in): unit gain, so repeated in-place calls and
    fp16 stay finite."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    w = torch.randn(tuple(shape), generator=gen, device=device) / math.sqrt(fan_in)
    return w.to(dtype)


def random_activation(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                      gen: torch.Generator) -> Tensor:
    """Standard normal values, drawn on ``device`` (``gen`` is a generator of that device)."""
    return torch.randn(tuple(shape), generator=gen, device=device).to(dtype)


def stage_activation(shape, batch: int, dtype: torch.dtype, device: torch.device,
                     gen: torch.Generator) -> Tensor:
    """The (batch, C, H, W) input of a stage shape (a StageShape), standard normal."""
    return random_activation((batch, shape.channels, shape.height, shape.width), dtype, device,
                             gen)


def random_batch_norm(channels: int, dtype: torch.dtype, device: torch.device,
                      gen: torch.Generator, training: bool) -> pk.BatchNormParams:
    """A BatchNormParams with random affine and running statistics (as patnet.testing does);
    its weight and bias require a gradient in training mode."""
    def rand(scale, offset=0.0):
        return (torch.randn(channels, generator=gen, device=device) * scale + offset).to(dtype)
    weight, bias = rand(0.3, 1.0), rand(0.2)
    mean = rand(0.5)
    var = (torch.rand(channels, generator=gen, device=device) + 0.5).to(dtype)
    if training:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
    return pk.BatchNormParams(weight, bias, mean, var, 0.1, 1e-5)


def two_norm_problem(shape, batch: int, dtype: torch.dtype, device: torch.device, mode: str,
                     gen: torch.Generator, weight_shapes: Sequence[Sequence[int]],
                     norm_channels: Sequence[int]) -> Problem:
    """The arguments of an op called as ``op(x, weight_1, weight_2, bias, bn_1, bn_2,
    training)`` (PAT_ch, PAT_sp): the stage activation, the random weights of
    ``weight_shapes``, bias None (bias=False in the model), BatchNorms over ``norm_channels``
    with random affines and running statistics, drawn in that order; training in fwd+bwd,
    where x, the weights and the BatchNorm affines require a gradient."""
    training = mode == "fwd+bwd"
    x = stage_activation(shape, batch, dtype, device, gen)
    weights = [random_weight(s, dtype, device, gen) for s in weight_shapes]
    norms = [random_batch_norm(c, dtype, device, gen, training) for c in norm_channels]
    leaves = []
    if training:
        leaves = ([x.requires_grad_(True)] + [w.requires_grad_(True) for w in weights]
                  + [t for bn in norms for t in (bn.weight, bn.bias)])
    return Problem((x, *weights, None, *norms, training), leaves)


def two_norm_functional(op):
    """``functional(args, backend)`` of an op taking two_norm_problem's arguments."""
    def functional(args, backend: str):
        *tensors, training = args
        return op(*tensors, training=training, backend=backend)
    return functional


def random_spatial_attention(channels: int, dtype: torch.dtype, device: torch.device,
                             gen: torch.Generator) -> pk.SpatialAttentionParams:
    """PAT_sp's tensors after an MLP of ``channels`` outputs as the inference copy passes them
    (P = channels // 2 conv channels, BN_d folded into the conv: a bias; BN_c's running
    statistics)."""
    p = channels // 2
    return pk.SpatialAttentionParams(
        random_weight((1, channels - p, 1, 1), dtype, device, gen),
        random_weight((p, p, 1, 1), dtype, device, gen),
        random_activation((p,), dtype, device, gen) * 0.1,
        random_batch_norm(channels - p, dtype, device, gen, training=False))


def spatial_attention_size(channels: int) -> Tuple[int, int]:
    """(parameters, FLOPs per pixel) of PAT_sp after an MLP of ``channels`` outputs: the gate
    (Q), the conv (P^2 + P), BN_c (4Q); the gate's and the conv's multiply-adds."""
    p = channels // 2
    q = channels - p
    return 5 * q + p * p + p, 2 * (p * p + q)
