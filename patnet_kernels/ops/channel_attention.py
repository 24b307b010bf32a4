"""PAT_ch's ops and autograd Function, for every fused backend (the ops: ``patnet_triton::*``
from :mod:`patnet_kernels.ops.triton.channel_attention`, ``patnet_cuda::*`` from csrc/).

Y = [conv3x3(X1) | BN_b(X2 * g)], g = hsig(BN_a(W_ch . [mu, sigma])) (SPEC.md section 2).

Forward, two passes over X2 and one over X1:

1. ``channel_attention_stats(x, c1) -> (mean, std)``: per (b, c) mean and unbiased std of X2,
   (B, C2) fp32.
2. The gate on (B, C2)-sized fp32 values: the mix W_ch, BN_a, the hard-sigmoid, and BN_b
   folded into a per-(b, c) affine map X2 * a + d (:func:`gate_forward`). In training, BN_b's
   batch statistics of X2 * g come from the same per-(b, c) sums (g is constant over H and W).
   Triton runs it as one kernel (the op ``channel_attention_gate``, eval and training); the
   CUDA extension, which has no gate op, as torch ops.
3. ``channel_attention_apply(x, conv_weight, scale, shift) -> y``: [conv3x3(X1) | X2 * a + d],
   one read of X and one write of Y.

Backward, three passes: ``conv3x3_weight_grad`` (X1, dY1; the PConv op),
``channel_attention_grad_sums(x, grad_y, mean)`` (dY2, X2: per (b, c) sums of dY2 * (X2 - mean)
and of dY2, which give the gradients of a and d), then the gate's backward in closed form on
(B, C2) tensors (W_ch, BN_a, BN_b in both modes, down to the gradients of mean and std:
:func:`gate_backward`; Triton: the op ``channel_attention_gate_backward``, three small kernels),
then ``channel_attention_input_grad`` (dY, X2 -> dX): [conv3x3^T(dY1) | dY2 * a + (X2 - mean) *
slope + offset] with slope = dstd / ((HW - 1) std), offset = dmean / HW, so the gradient through
the statistics costs no pass of its own. On Triton a training step of PAT_ch is three launches
forward and six backward (the gate as torch ops would be a few dozen tiny launches each way,
launch-bound on a GPU unless the caller is compiled).

H * W = 1: std is 0 / 0 = NaN (``Tensor.std``), so Y2 is NaN (and, in training, BN_a and BN_b's
batch statistics); the conv half stays finite. The NaNs of every gradient match the reference.
Running statistics are updated in place in training as ``F.batch_norm`` does (running_var gets
the unbiased batch variance), after the autograd Function, from statistics it returns.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._types import BatchNormParams, update_running_statistics
from . import backward_without_autocast, in_input_dtypes, tensor_dtypes
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
# The gate on (B, C2)-sized fp32 values, forward and its closed-form backward: the
# ``channel_attention_gate`` and ``channel_attention_gate_backward`` ops where a backend has them
# (Triton: one and three small kernels), else these torch functions of the same signatures.
# ---------------------------------------------------------------------------------------------
def _gate_value(z: Tensor, mu_a: Tensor, inv_a: Tensor, a_weight: Optional[Tensor],
                a_bias: Optional[Tensor], has_a: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(z_n, z_hat, g): BN_a's normalised input z_hat = (z - mu_a) inv_a and output z_n (both z
    without BN_a), and the gate g = hsig(z_n)."""
    z_hat = z_n = z
    if has_a:
        z_hat = (z - mu_a) * inv_a
        z_n = z_hat if a_weight is None else z_hat * a_weight.float()
        z_n = z_n if a_bias is None else z_n + a_bias.float()
    return z_n, z_hat, F.hardsigmoid(z_n)


def gate_forward(mean: Tensor, std: Tensor, pixels: int, cfc_weight: Tensor,
                 cfc_bias: Optional[Tensor], a_weight: Optional[Tensor],
                 a_bias: Optional[Tensor], a_mean: Optional[Tensor], a_var: Optional[Tensor],
                 eps_a: float, b_weight: Optional[Tensor], b_bias: Optional[Tensor],
                 b_mean: Optional[Tensor], b_var: Optional[Tensor], eps_b: float, has_a: bool,
                 training: bool, save: bool = True
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gate: the affine map Y2 = X2 * scale + shift and what the backward needs.

    mean, std: (B, C2) fp32, the statistics of X2 (H * W = ``pixels``; the Triton op also takes
    per-chunk statistics in eval, see :func:`eval_gate`); cfc_weight (C2, C2, 1, 2), cfc_bias
    (C2,) or None; BN_a's weight, bias, running mean and variance (C2,) (or None) and eps, read
    if ``has_a`` (else BN_a is folded into W_ch); BN_b's the same; ``training``: normalise with
    the batch's statistics (the running ones are then not read); ``save``: whether a backward
    will need the moments (else a (0, C2) tensor stands for them; the op always writes them).

    Returns fp32 (scale (B, C2), shift (B, C2), z (B, C2): the mix W_ch . [mean, std] + bias,
    moments (4, C2): the mean and 1 / sqrt(var + eps) BN_a normalised with (0 and 1 without
    BN_a), then BN_b's, batch (4, C2) in training: BN_a's batch mean and unbiased variance
    (zeros without BN_a), then BN_b's (for the running statistics); (0, C2) in eval).
    BN_b's batch statistics of X2 * g come from the per-(b, c) ones (g is constant over H and
    W): mean_c = sum_b g m / B, M2_c = sum_b g^2 std^2 (HW - 1) + HW sum_b (g m - mean_c)^2,
    var = M2_c / (B HW).
    """
    batch, c2 = mean.shape
    n = pixels
    w = cfc_weight.float()
    z = mean @ w[:, :, 0, 0].t() + std @ w[:, :, 0, 1].t()
    if cfc_bias is not None:
        z = z + cfc_bias.float()
    mu_a = inv_a = None
    batch_stats = []
    if has_a:
        if training:
            mu_a = z.mean(0)
            var = (z - mu_a).square().mean(0)
            batch_stats += [mu_a, var * (batch / (batch - 1))]
        else:
            mu_a, var = a_mean.float(), a_var.float()
        inv_a = torch.rsqrt(var + eps_a)
    elif training or save:
        mu_a, inv_a = torch.zeros_like(mean[0]), torch.ones_like(mean[0])
        batch_stats += [mu_a, mu_a]
    g = _gate_value(z, mu_a, inv_a, a_weight, a_bias, has_a)[2]
    if training:
        t = g * mean  # per-(b, c) mean of X2 * g
        center = t.mean(0)
        m2 = (g * std).square().sum(0) * (n - 1) + (t - center).square().sum(0) * n
        count = batch * n
        var = m2 / count
        batch_stats += [center, m2 / (count - 1)]
    else:
        center, var = b_mean.float(), b_var.float()
    inv_b = torch.rsqrt(var + eps_b)
    k = inv_b if b_weight is None else b_weight.float() * inv_b
    beta = torch.zeros_like(center) if b_bias is None else b_bias.float()
    shift = torch.addcmul(beta, center, k, value=-1.0)  # beta - center k
    stats = torch.stack(batch_stats) if training else mean.new_empty((0, c2))
    moments = torch.stack([mu_a, inv_a, center, inv_b]) if save else mean.new_empty((0, c2))
    return g * k, shift.expand_as(z).contiguous(), z, moments, stats


def gate_backward(sum_xg: Tensor, sum_g: Tensor, mean: Tensor, std: Tensor, pixels: int,
                  z: Tensor, moments: Tensor, cfc_weight: Tensor, a_weight: Optional[Tensor],
                  a_bias: Optional[Tensor], b_weight: Optional[Tensor], has_a: bool,
                  training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gate's gradients from sum_xg = sum_hw dY2 (X2 - mean) and sum_g = sum_hw dY2, (B, C2)
    fp32, and the forward's mean, std, z and moments (:func:`gate_forward`): the gradient of a
    is sum_xg + mean * sum_g, that of d is sum_g (summed over b). Written in the centred sums
    so that a large |mean| costs no precision.

    Returns fp32 (slope, offset), each (B, C2), of the input gradient (the part through the
    statistics: (X2 - mean) * slope + offset), the gradient of cfc_weight (C2, C2, 1, 2) and
    grads (5, C2): those of W_ch's bias, BN_a's weight and bias (zeros without BN_a), BN_b's
    weight and bias.
    """
    batch = mean.shape[0]
    n = pixels
    mu_a, inv_a, center_b, inv_b = moments.unbind(0)
    z_n, z_hat, g = _gate_value(z, mu_a, inv_a, a_weight, a_bias, has_a)
    grad_d = sum_g.sum(0)
    k = inv_b if b_weight is None else b_weight.float() * inv_b
    t_c = g * mean - center_b  # per-(b, c) mean of X2 * g, minus BN_b's mean
    # dL/dk with scale = g k, shift = beta - center k: sum_b (sum_hw dY2 X2) g - grad_d center,
    # here in the centred sums (no cancellation between two large terms when |mean| >> std).
    dot = (sum_xg * g + t_c * sum_g).sum(0)
    if training:
        # var = M2 / (B n), M2 = sum_b g^2 std^2 (n - 1) + n sum_b t_c^2; center = mean_b g m.
        d_inv = dot if b_weight is None else dot * b_weight.float()
        d_m2 = d_inv * (-0.5) * inv_b.pow(3) / (batch * n)
        d_t = d_m2 * (2 * n) * t_c - grad_d * k / batch
        d_g = (sum_xg * k + mean * (sum_g * k - grad_d * k / batch)
               + d_m2 * (2 * (n - 1) * g * std.square() + (2 * n) * t_c * mean))
        d_std = d_m2 * 2 * (n - 1) * g.square() * std
        d_mean = d_t * g
    else:
        d_g = (sum_xg + mean * sum_g) * k
        d_std = d_mean = 0.0
    d_zn = torch.where((z_n > -3.0) & (z_n < 3.0), d_g / 6.0, torch.zeros_like(d_g))
    zero = torch.zeros_like(grad_d)
    grad_gamma_a = grad_beta_a = zero
    d_z = d_zn
    if has_a:
        grad_gamma_a = (d_zn * z_hat).sum(0)
        grad_beta_a = d_zn.sum(0)
        d_zh = d_zn if a_weight is None else d_zn * a_weight.float()
        if training:
            d_z = inv_a * (d_zh - d_zh.mean(0) - z_hat * (d_zh * z_hat).mean(0))
        else:
            d_z = d_zh * inv_a
    w = cfc_weight.float()
    grad_cfc = torch.stack([d_z.t() @ mean, d_z.t() @ std], dim=-1).unsqueeze(2)
    d_mean = d_mean + d_z @ w[:, :, 0, 0]
    d_std = d_std + d_z @ w[:, :, 0, 1]
    # Tensor.std's backward: d std / d x = (x - mean) / ((n - 1) std), and 0 where std = 0.
    slope = torch.where(std == 0, torch.zeros_like(d_std), d_std / ((n - 1) * std))
    offset = d_mean / n
    return slope, offset, grad_cfc, torch.stack(
        [d_z.sum(0), grad_gamma_a, grad_beta_a, dot * inv_b, grad_d])


def _gate_fake(mean, std, pixels, cfc_weight, cfc_bias, a_weight, a_bias, a_mean, a_var, eps_a,
               b_weight, b_bias, b_mean, b_var, eps_b, has_a, training):
    b, c2 = mean.shape[0], mean.shape[-1]
    return (*(mean.new_empty((b, c2)) for _ in range(3)), mean.new_empty((4, c2)),
            mean.new_empty((4 if training else 0, c2)))


def _gate_backward_fake(sum_xg, sum_g, mean, std, pixels, z, moments, cfc_weight, a_weight,
                        a_bias, b_weight, has_a, training):
    b, c2 = mean.shape
    return (mean.new_empty((b, c2)), mean.new_empty((b, c2)), mean.new_empty((c2, c2, 1, 2)),
            mean.new_empty((5, c2)))


# The gate ops' fakes, for a backend that registers them (Triton).
GATE_FAKES = {"channel_attention_gate": _gate_fake,
              "channel_attention_gate_backward": _gate_backward_fake}


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
    (same schemas), and the two gate ops of :data:`GATE_FAKES` where the backend has them (else
    the gate runs as :func:`gate_forward` / :func:`gate_backward`); returns ChannelAttention.
    """
    gate = gate_forward  # (save: whether the moments are needed)
    if hasattr(ops, "channel_attention_gate"):
        def gate(*args, save: bool):
            return ops.channel_attention_gate(*args)  # (the kernel writes them anyway)
    gate_grad = getattr(ops, "channel_attention_gate_backward", gate_backward)

    class ChannelAttention(torch.autograd.Function):
        """y, stats = f(x, conv_weight, cfc_weight, cfc_bias, BN_a tensors, BN_b tensors, ...).

        stats: in training (4, C2) fp32, the batch statistics for the running ones (BN_a mean
        and unbiased var, BN_b mean and unbiased var); a (0, C2) tensor in eval.
        """

        @staticmethod
        def forward(ctx, x: Tensor, conv_weight: Tensor, cfc_weight: Tensor,
                    cfc_bias: Optional[Tensor], a_weight: Optional[Tensor],
                    a_bias: Optional[Tensor], a_mean: Optional[Tensor], a_var: Optional[Tensor],
                    b_weight: Optional[Tensor], b_bias: Optional[Tensor],
                    b_mean: Optional[Tensor], b_var: Optional[Tensor], has_a: bool,
                    training: bool, eps_a: float, eps_b: float):
            n = x.shape[2] * x.shape[3]
            mean, std = ops.channel_attention_stats(x, conv_weight.shape[0])
            scale, shift, z, moments, stats = gate(
                mean, std, n, cfc_weight, cfc_bias, a_weight, a_bias, a_mean, a_var, eps_a,
                b_weight, b_bias, b_mean, b_var, eps_b, has_a, training,
                save=any(ctx.needs_input_grad))
            y = ops.channel_attention_apply(x, conv_weight, scale, shift)
            ctx.save_for_backward(x, conv_weight, cfc_weight, a_weight, a_bias, b_weight, mean,
                                  std, z, moments, scale)
            ctx.has_a, ctx.training = has_a, training
            ctx.dtypes = tensor_dtypes((x, conv_weight, cfc_weight, cfc_bias, a_weight, a_bias,
                                        a_mean, a_var, b_weight, b_bias))
            ctx.mark_non_differentiable(stats)
            ctx.set_materialize_grads(False)  # (no zeros made for the statistics' gradient)
            return y, stats

        @staticmethod
        @backward_without_autocast
        def backward(ctx, grad_y: Tensor, _grad_stats: Tensor):
            (x, conv_weight, cfc_weight, a_weight, a_bias, b_weight, mean, std, z, moments,
             scale) = ctx.saved_tensors
            needs = ctx.needs_input_grad
            c1 = conv_weight.shape[0]
            n = x.shape[2] * x.shape[3]
            grads = [None] * 16
            if grad_y is None:  # (y unused)
                return tuple(grads)
            if needs[1]:
                grads[1] = ops.conv3x3_weight_grad(x[:, :c1], grad_y, conv_weight)
            if needs[0] or any(needs[2:12]):
                sum_xg, sum_g = ops.channel_attention_grad_sums(x, grad_y, mean)
                slope, offset, grad_cfc, vectors = gate_grad(
                    sum_xg, sum_g, mean, std, n, z, moments, cfc_weight, a_weight, a_bias,
                    b_weight, ctx.has_a, ctx.training)
                # cfc_weight, then (5, C2): cfc_bias, a_weight, a_bias, b_weight, b_bias
                for i, grad in zip((2, 3, 4, 5, 8, 9), (grad_cfc, *vectors)):
                    grads[i] = grad
                if needs[0]:
                    grads[0] = ops.channel_attention_input_grad(
                        grad_y, x, conv_weight, scale, mean, slope, offset)
            return in_input_dtypes(grads, ctx.dtypes, needs)

    return ChannelAttention


def eval_gate(ops, mean: Tensor, std: Tensor, pixels: int, cfc_weight: Tensor,
              cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
              bn_b: BatchNormParams) -> Tuple[Tensor, Tensor]:
    """PAT_ch's eval gate as one kernel of a namespace with the ``channel_attention_gate`` op
    (Triton): from the statistics of X2 over ``pixels`` = H * W, (B, C2) fp32 mean and std, or
    per pixel chunk (B, T, C2) means and sums of squared deviations (chunks of
    :func:`patnet_kernels._types.chunk_layout`), the per-(sample, channel) affine map
    (scale, shift), each (B, C2) fp32, with Y2 = X2 * scale + shift (BN_b folded in; BN_a from
    running statistics unless folded into W_ch)."""
    a = bn_a if bn_a is not None else BatchNormParams(None, None, None, None)
    scale, shift, *_ = ops.channel_attention_gate(
        mean, std, pixels, cfc_weight, cfc_bias, a.weight, a.bias, a.running_mean,
        a.running_var, float(a.eps), bn_b.weight, bn_b.bias, bn_b.running_mean,
        bn_b.running_var, float(bn_b.eps), bn_a is not None, False)
    return scale, shift


def backend_function(ops):
    """The backend function of :func:`patnet_kernels.channel_attention` over ``ops``: the
    autograd Function (three launches in eval and training where the backend has the gate op:
    statistics, gate, apply; the running statistics then updated from the batch's)."""
    ChannelAttention = make_functions(ops)

    def channel_attention(x: Tensor, conv_weight: Tensor, cfc_weight: Tensor,
                          cfc_bias: Optional[Tensor], bn_a: Optional[BatchNormParams],
                          bn_b: BatchNormParams, training: bool) -> Tensor:
        """PAT_ch with this backend's kernels (inputs already checked by the functional API)."""
        a = bn_a if bn_a is not None else BatchNormParams(None, None, None, None)
        y, stats = ChannelAttention.apply(
            x, conv_weight, cfc_weight, cfc_bias, a.weight, a.bias, a.running_mean,
            a.running_var, bn_b.weight, bn_b.bias, bn_b.running_mean, bn_b.running_var,
            bn_a is not None, training, float(a.eps), float(bn_b.eps))
        if training:
            update_running_statistics(*([(bn_a, stats[0], stats[1])] if bn_a is not None else []),
                                      (bn_b, stats[2], stats[3]))
        return y

    return channel_attention
