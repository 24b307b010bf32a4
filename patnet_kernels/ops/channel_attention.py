"""PAT_ch's ops and autograd Function, for every fused backend (the ops: ``patnet_triton::*``
from :mod:`patnet_kernels.ops.triton.channel_attention`, ``patnet_cuda::*`` from csrc/).

Y = [conv3x3(X1) | BN_b(X2 * g)], g = hsig(BN_a(W_ch . [mu, sigma])) (SPEC.md section 2).

Forward, two passes over X2 and one over X1:

1. ``channel_attention_stats(x, c1) -> (mean, std)``: per (b, c) mean and unbiased std of X2,
   (B, C2) fp32.
2. The gate, in fp32 torch on (B, C2)-sized tensors: the mix W_ch, BN_a, the hard-sigmoid, and
   BN_b folded into a per-(b, c) affine map X2 * a + d. In training, BN_b's batch statistics of
   X2 * g come from the same per-(b, c) sums (g is constant over H and W):
   mean_c = sum_b g m / B, M2_c = sum_b g^2 M2_bc + HW sum_b (g m - mean_c)^2, var = M2_c / (B HW).
3. ``channel_attention_apply(x, conv_weight, scale, shift) -> y``: [conv3x3(X1) | X2 * a + d],
   one read of X and one write of Y.

Backward, three passes: ``conv3x3_weight_grad`` (X1, dY1; the PConv op),
``channel_attention_grad_sums(x, grad_y, mean)`` (dY2, X2: per (b, c) sums of dY2 * (X2 - mean)
and of dY2, which give the gradients of a and d), then the gate's backward in closed form on
(B, C2) tensors (W_ch, BN_a, BN_b in both modes, down to the gradients of mean and std), then
``channel_attention_input_grad`` (dY, X2 -> dX): [conv3x3^T(dY1) | dY2 * a + (X2 - mean) * slope
+ offset] with slope = dstd / ((HW - 1) std), offset = dmean / HW, so the gradient through the
statistics costs no pass of its own. The gate is a few dozen tiny torch ops each way: on a GPU
they are launch-bound unless the caller is compiled (inductor fuses them). In eval without
autograd the Triton backend runs it as one kernel instead (``channel_attention_gate``, see
:func:`backend_function`): statistics, gate, apply.

H * W = 1: std is 0 / 0 = NaN (``Tensor.std``), so Y2 is NaN (and, in training, BN_a and BN_b's
batch statistics); the conv half stays finite. The NaNs of every gradient match the reference.
Running statistics are updated in place in training as ``F.batch_norm`` does (running_var gets
the unbiased batch variance), after the autograd Function, from statistics it returns.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .._types import BatchNormParams
from ._layout import empty_activation

Tensor = torch.Tensor


def _coef_shape(x: Tensor, c1: int):
    """(B, C2): one value per sample and channel of X2."""
    return (x.shape[0], x.shape[1] - c1)


def _stats_fake(x, c1):
    shape = _coef_shape(x, c1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _apply_fake(x, conv_weight, scale, shift):
    return empty_activation(x, x.shape)


def _grad_sums_fake(x, grad_y, mean):
    return torch.empty_like(mean, dtype=torch.float32, memory_format=torch.contiguous_format), \
        torch.empty_like(mean, dtype=torch.float32, memory_format=torch.contiguous_format)


def _input_grad_fake(grad_y, x, conv_weight, scale, center, slope, offset):
    return empty_activation(x, x.shape)


# ---------------------------------------------------------------------------------------------
# The gate: (B, C2)-sized fp32 math, forward and its closed-form backward.
# ---------------------------------------------------------------------------------------------
# Intermediates of the forward the backward needs, saved in this order (None where absent).
_SAVED = ("z_hat", "inv_a", "z_n", "g", "inv_b", "center_b", "gamma_a", "gamma_b", "scale")


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _gate_forward(mean: Tensor, std: Tensor, n: int, cfc_weight: Tensor,
                  cfc_bias: Optional[Tensor], bn_a: Optional[tuple], bn_b: tuple,
                  training: bool) -> Dict[str, Optional[Tensor]]:
    """scale a (B, C2) and shift d (C2,) of Y2 = X2 * a + d, and what the backward needs.

    bn_a / bn_b: (weight, bias, running_mean, running_var, eps) in fp32, or bn_a None. In
    training also the batch statistics for the running ones: "stats" (4, C2) = BN_a mean,
    BN_a unbiased var, BN_b mean, BN_b unbiased var.
    """
    batch = mean.shape[0]
    w = cfc_weight.float()
    z = mean @ w[:, :, 0, 0].t() + std @ w[:, :, 0, 1].t()
    if cfc_bias is not None:
        z = z + cfc_bias.float()
    out: Dict[str, Optional[Tensor]] = dict.fromkeys(_SAVED)
    stats = [torch.zeros_like(mean[0])] * 2
    if bn_a is not None:
        gamma, beta, running_mean, running_var, eps = bn_a
        if training:
            mu = z.mean(0)
            var = (z - mu).square().mean(0)
            stats = [mu, var * (batch / (batch - 1))]
        else:
            mu, var = running_mean, running_var
        inv = torch.rsqrt(var + eps)
        z_hat = (z - mu) * inv
        z_n = z_hat if gamma is None else z_hat * gamma
        z_n = z_n if beta is None else z_n + beta
        out.update(z_hat=z_hat, inv_a=inv, gamma_a=gamma)
    else:
        z_n = z
    g = torch.clamp(z_n + 3.0, 0.0, 6.0) / 6.0  # F.hardsigmoid
    gamma, beta, running_mean, running_var, eps = bn_b
    if training:
        t = g * mean  # per-(b, c) mean of X2 * g
        center = t.mean(0)
        m2 = (g * std).square().sum(0) * (n - 1) + (t - center).square().sum(0) * n
        count = batch * n
        var = m2 / count
        stats += [center, m2 / (count - 1)]
    else:
        center, var = running_mean, running_var
    inv = torch.rsqrt(var + eps)
    k = inv if gamma is None else gamma * inv
    scale = g * k
    shift = -center * k
    shift = shift if beta is None else shift + beta
    out.update(z_n=z_n, g=g, inv_b=inv, center_b=center, gamma_b=gamma, scale=scale,
               shift=shift, stats=torch.stack(stats) if training else None)
    return out


def _gate_backward(sum_xg: Tensor, sum_g: Tensor, mean: Tensor, std: Tensor, n: int,
                   cfc_weight: Tensor, has_bias: bool, has_a: bool, training: bool,
                   s: Dict[str, Optional[Tensor]]):
    """Gradients of the gate from sum_xg = sum_hw dY2 (X2 - mean) and sum_g = sum_hw dY2,
    (B, C2) fp32: the gradient of a is sum_xg + mean * sum_g, that of d is sum_g (summed over b).
    Written in the centred sums so that a large |mean| costs no precision.

    Returns fp32 (slope, offset) of the input gradient and the gradients of cfc_weight,
    cfc_bias, BN_a weight, BN_a bias, BN_b weight, BN_b bias (None where absent).
    """
    batch = mean.shape[0]
    g, inv_b, center_b = s["g"], s["inv_b"], s["center_b"]
    gamma_b = s["gamma_b"]
    grad_d = sum_g.sum(0)
    k = inv_b if gamma_b is None else gamma_b * inv_b
    t_c = g * mean - center_b  # per-(b, c) mean of X2 * g, minus BN_b's mean
    # dL/dk with scale = g k, shift = beta - center k: sum_b (sum_hw dY2 X2) g - grad_d center,
    # here in the centred sums (no cancellation between two large terms when |mean| >> std).
    dot = (sum_xg * g + t_c * sum_g).sum(0)
    grad_gamma_b = dot * inv_b
    grad_beta_b = grad_d
    if training:
        # var = M2 / (B n), M2 = sum_b g^2 std^2 (n - 1) + n sum_b t_c^2; center = mean_b g m.
        d_inv = dot if gamma_b is None else dot * gamma_b
        d_m2 = d_inv * (-0.5) * inv_b.pow(3) / (batch * n)
        d_t = d_m2 * (2 * n) * t_c - grad_d * k / batch
        d_g = (sum_xg * k + mean * (sum_g * k - grad_d * k / batch)
               + d_m2 * (2 * (n - 1) * g * std.square() + (2 * n) * t_c * mean))
        d_std = d_m2 * 2 * (n - 1) * g.square() * std
        d_mean = d_t * g
    else:
        d_g = (sum_xg + mean * sum_g) * k
        d_std = d_mean = None
    z_n = s["z_n"]
    d_zn = torch.where((z_n > -3.0) & (z_n < 3.0), d_g / 6.0, torch.zeros_like(d_g))
    grad_gamma_a = grad_beta_a = None
    if has_a:
        z_hat, inv_a, gamma_a = s["z_hat"], s["inv_a"], s["gamma_a"]
        grad_gamma_a = (d_zn * z_hat).sum(0)
        grad_beta_a = d_zn.sum(0)
        d_zh = d_zn if gamma_a is None else d_zn * gamma_a
        if training:
            d_z = inv_a * (d_zh - d_zh.mean(0) - z_hat * (d_zh * z_hat).mean(0))
        else:
            d_z = d_zh * inv_a
    else:
        d_z = d_zn
    w = cfc_weight.float()
    grad_cfc = torch.stack([d_z.t() @ mean, d_z.t() @ std], dim=-1).unsqueeze(2)
    grad_bias = d_z.sum(0) if has_bias else None
    d_mean = d_z @ w[:, :, 0, 0] if d_mean is None else d_mean + d_z @ w[:, :, 0, 0]
    d_std = d_z @ w[:, :, 0, 1] if d_std is None else d_std + d_z @ w[:, :, 0, 1]
    # Tensor.std's backward: d std / d x = (x - mean) / ((n - 1) std), and 0 where std = 0.
    slope = torch.where(std == 0, torch.zeros_like(d_std), d_std / ((n - 1) * std))
    offset = d_mean / n
    return (slope, offset, grad_cfc, grad_bias, grad_gamma_a, grad_beta_a, grad_gamma_b,
            grad_beta_b)



# Each op's fake (shapes, dtypes and strides of its outputs), shared by every backend that
# registers the op under its own namespace.
FAKES = {
    "channel_attention_stats": _stats_fake,
    "channel_attention_apply": _apply_fake,
    "channel_attention_grad_sums": _grad_sums_fake,
    "channel_attention_input_grad": _input_grad_fake,
}


def make_functions(ops):
    """The autograd Function of PAT_ch over the ops of one backend namespace.

    ``ops`` is a ``torch.ops`` namespace with the four ops above and ``conv3x3_weight_grad``
    (same schemas); returns ChannelAttention.
    """

    class ChannelAttention(torch.autograd.Function):
        """y, stats = f(x, conv_weight, cfc_weight, cfc_bias, BN_a tensors, BN_b tensors, ...).

        stats: in training (4, C2) fp32, the batch statistics for the running ones (BN_a mean
        and unbiased var, BN_b mean and unbiased var); an empty tensor in eval.
        """

        @staticmethod
        def forward(ctx, x: Tensor, conv_weight: Tensor, cfc_weight: Tensor,
                    cfc_bias: Optional[Tensor], a_weight: Optional[Tensor],
                    a_bias: Optional[Tensor], a_mean: Optional[Tensor], a_var: Optional[Tensor],
                    b_weight: Optional[Tensor], b_bias: Optional[Tensor],
                    b_mean: Optional[Tensor], b_var: Optional[Tensor], has_a: bool,
                    training: bool, eps_a: float, eps_b: float):
            c1 = conv_weight.shape[0]
            n = x.shape[2] * x.shape[3]
            mean, std = ops.channel_attention_stats(x, c1)
            bn_a = ((_f32(a_weight), _f32(a_bias), _f32(a_mean), _f32(a_var), eps_a)
                    if has_a else None)
            bn_b = (_f32(b_weight), _f32(b_bias), _f32(b_mean), _f32(b_var), eps_b)
            s = _gate_forward(mean, std, n, cfc_weight, cfc_bias, bn_a, bn_b, training)
            scale = s["scale"]
            shift = s["shift"].expand_as(scale).contiguous()
            y = ops.channel_attention_apply(x, conv_weight, scale, shift)
            ctx.save_for_backward(x, conv_weight, cfc_weight, mean, std,
                                  *[s[key] for key in _SAVED])
            ctx.has_a, ctx.training = has_a, training
            ctx.has_bias = cfc_bias is not None
            stats = s["stats"] if training else mean.new_empty((0,))
            ctx.mark_non_differentiable(stats)
            return y, stats

        @staticmethod
        def backward(ctx, grad_y: Tensor, _grad_stats: Tensor):
            x, conv_weight, cfc_weight, mean, std, *rest = ctx.saved_tensors
            s = dict(zip(_SAVED, rest))
            needs = ctx.needs_input_grad
            c1 = conv_weight.shape[0]
            n = x.shape[2] * x.shape[3]
            grads = [None] * 16
            if needs[1]:
                grads[1] = ops.conv3x3_weight_grad(x[:, :c1], grad_y)
            if needs[0] or any(needs[2:12]):
                sum_xg, sum_g = ops.channel_attention_grad_sums(x, grad_y, mean)
                slope, offset, *param_grads = _gate_backward(
                    sum_xg, sum_g, mean, std, n, cfc_weight, ctx.has_bias, ctx.has_a,
                    ctx.training, s)
                # cfc_weight, cfc_bias, a_weight, a_bias, b_weight, b_bias
                for i, grad in zip((2, 3, 4, 5, 8, 9), param_grads):
                    grads[i] = grad
                if needs[0]:
                    grads[0] = ops.channel_attention_input_grad(
                        grad_y, x, conv_weight, s["scale"], mean, slope, offset)
            # Every tensor input shares x's dtype (checked by the functional API).
            return tuple(grad.to(x.dtype) if grad is not None and need else None
                         for grad, need in zip(grads, needs))

    return ChannelAttention


def eval_gate(ops, mean: Tensor, std: Tensor, pixels: int, cfc_weight: Tensor,
              cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
              bn_b: BatchNormParams) -> Tuple[Tensor, Tensor]:
    """PAT_ch's eval gate as one kernel of a namespace with the ``channel_attention_gate`` op
    (Triton): from the statistics of X2, (B, C2) fp32 mean and std (``pixels`` 0), or per pixel
    chunk (B, T, C2) means and sums of squared deviations over ``pixels`` = H * W, the
    per-(sample, channel) affine map (scale, shift), each (B, C2) fp32, with Y2 = X2 * scale +
    shift (BN_b folded in; BN_a from running statistics unless folded into W_ch)."""
    a = bn_a if bn_a is not None else BatchNormParams(None, None, None, None)
    return ops.channel_attention_gate(mean, std, pixels, cfc_weight, cfc_bias, a.weight, a.bias,
                                      a.running_mean, a.running_var, float(a.eps), bn_b.weight,
                                      bn_b.bias, bn_b.running_mean, bn_b.running_var,
                                      float(bn_b.eps), bn_a is not None)


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.channel_attention` over ``ops``.

    In eval with no gradient to take, where the backend has the ``channel_attention_gate`` op
    (Triton; not the CUDA extension), the gate runs as that one kernel between the statistics
    and the apply pass (three launches in all), not as the autograd Function's torch ops.
    """
    ChannelAttention = make_functions(ops)
    has_gate = hasattr(ops, "channel_attention_gate")

    def channel_attention(x: Tensor, conv_weight: Tensor, cfc_weight: Tensor,
                          cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
                          bn_b: BatchNormParams, training: bool) -> Tensor:
        """PAT_ch with this backend's kernels (inputs already checked by the functional API)."""
        a = bn_a if bn_a is not None else BatchNormParams(None, None, None, None)
        if has_gate and not training and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad
                for t in (x, conv_weight, cfc_weight, cfc_bias, *a[:2], *bn_b[:2]))):
            mean, std = ops.channel_attention_stats(x, conv_weight.shape[0])
            scale, shift = eval_gate(ops, mean, std, 0, cfc_weight, cfc_bias, bn_a, bn_b)
            return ops.channel_attention_apply(x, conv_weight, scale, shift)
        y, stats = ChannelAttention.apply(
            x, conv_weight, cfc_weight, cfc_bias, a.weight, a.bias, a.running_mean,
            a.running_var, bn_b.weight, bn_b.bias, bn_b.running_mean, bn_b.running_var,
            bn_a is not None, training, float(a.eps), float(bn_b.eps))
        if training:
            if bn_a is not None:
                bn_a.update_running(stats[0], stats[1])
            bn_b.update_running(stats[2], stats[3])
        return y

    return channel_attention
