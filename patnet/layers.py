"""Building blocks of PATNet and FasterNet (SPEC.md sections 1-5).

Module and parameter names follow the authors' code so that state_dict keys match SPEC.md
section 6. Token mixers call the functional API of :mod:`patnet_kernels` with their policy:
``backend`` (what :func:`patnet.set_backend` changes) and, for the ops with a CPU eval form,
``eval_forms`` (what :func:`patnet.optimize_for_inference` turns on); the functional API decides
what runs (``patnet_kernels.backends.choose_implementation``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import patnet_kernels as pk
from patnet_kernels import BatchNormParams
from patnet_kernels._types import outside_inference_mode
from patnet_kernels.reference.channel_attention import channel_statistics

# The stage-4 token grid of a 224 x 224 input (the network downsamples by 32): the grid whose
# bucket map PAT_sf keeps as a buffer unless told another (RPESelfAttention.set_token_grid).
DEFAULT_TOKEN_GRID = (7, 7)


def bn_params(bn: nn.Module, training: bool) -> Optional[BatchNormParams]:
    """The parameters of a BatchNorm2d for one forward, or None where it was folded away."""
    if isinstance(bn, nn.Identity):
        return None
    return BatchNormParams.of(bn, training)


def count_batches(training: bool, *bns: nn.Module) -> None:
    """After a fused op ran in training mode, count the batch in each of its BatchNorms'
    ``num_batches_tracked``, as ``nn.BatchNorm2d.forward`` does."""
    if training:
        for bn in bns:
            if isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) and bn.track_running_stats \
                    and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)


def syncs_statistics(training: bool, *bns: nn.Module) -> bool:
    """Whether one of ``bns`` is a SyncBatchNorm that averages its batch statistics over the
    ranks of a process group of more than one rank in this forward (training mode).

    A fused op computes batch statistics over its own input only, so a layer with such a
    BatchNorm runs it through the module instead. Without an initialised process group, with a
    group of one rank, or in eval, a SyncBatchNorm is a plain BatchNorm and the fused op serves.
    """
    if not training or not (dist.is_available() and dist.is_initialized()):
        return False
    return any(isinstance(bn, nn.SyncBatchNorm) and dist.get_world_size(bn.process_group) > 1
               for bn in bns)


def make_activation(name: str, inplace: bool = False) -> nn.Module:
    """'GELU' (exact, erf) or 'RELU', the two activations of the released models."""
    key = str(name).upper()
    if key == "GELU":
        return nn.GELU()
    if key == "RELU":
        return nn.ReLU(inplace=inplace)
    raise ValueError(f"unknown activation {name!r}; choose 'GELU' or 'RELU'")


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's drop_path, scaled by 1 / keep probability); inactive
    in eval or with p = 0. A block adds its branch to the residual with :meth:`add_to`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def _active(self) -> bool:
        return self.training and self.p > 0.0

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """1 (kept) or 0 per sample, shaped (B, 1, ..., 1) in x's dtype."""
        return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return x
        return x * self._keep_mask(x).div_(1.0 - self.p)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x) as one op (``torch.addcmul`` with the per-sample mask and the
        1 / keep scale: no scaled copy of x is written), residual + x where inactive."""
        if not self._active():
            return residual + x
        return torch.addcmul(residual, x, self._keep_mask(x), value=1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map (timm's LayerNorm2d)."""

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PartialConv3(nn.Module):
    """FasterNet's token mixer (PConv): [conv3x3(X1) | X2], C1 = dim // n_div."""

    # Whether the CPU eval form of its op may run where the reference would (the functional
    # API's eval_form); patnet.optimize_for_inference turns it on.
    eval_forms = False

    def __init__(self, dim: int, n_div: int, backend: str = "auto"):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pk.partial_conv3x3(x, self.partial_conv3.weight, backend=self.backend,
                                  eval_form=self.eval_forms)


class GaussianChannelGate(nn.Module):
    """The parameters of PAT_ch's gate g = hsig(BN_a(W_ch . [mu, sigma])) (the authors' SRM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.cfc1 = nn.Conv2d(channels, channels, kernel_size=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(channels)


class PATChannelMixer(nn.Module):
    """PAT_ch, the token mixer of stages 1-3: [conv3x3(X1) | BN_b(X2 * g)] (SPEC.md section 2).

    Runs as one fused op (``pk.channel_attention``), except in training when BN_a or BN_b is a
    SyncBatchNorm syncing over several ranks (:func:`syncs_statistics`): then the gate and BN_b
    are composed from the modules, and only the conv half is fused.
    """

    # Whether the CPU eval forms of its ops may run where the reference would (the functional
    # API's eval_form); patnet.optimize_for_inference turns it on.
    eval_forms = False

    def __init__(self, dim: int, n_div: int, backend: str = "auto"):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)
        self.attn = GaussianChannelGate(self.dim_untouched)
        self.norm = nn.BatchNorm2d(self.dim_untouched)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if syncs_statistics(self.training, self.attn.bn, self.norm):
            return self._forward_syncing(x)
        y = pk.channel_attention(
            x, self.partial_conv3.weight, self.attn.cfc1.weight, self.attn.cfc1.bias,
            bn_params(self.attn.bn, self.training), bn_params(self.norm, self.training),
            training=self.training, backend=self.backend, eval_form=self.eval_forms)
        count_batches(self.training, self.attn.bn, self.norm)
        return y

    def _forward_syncing(self, x: torch.Tensor) -> torch.Tensor:
        """The op of ``patnet_kernels.reference.channel_attention`` with the BatchNorm modules
        called (a SyncBatchNorm gathers its statistics over the ranks and counts its batch)."""
        c1 = self.dim_conv3
        y1 = pk.partial_conv3x3(x[:, :c1], self.partial_conv3.weight, backend=self.backend)
        x2 = x[:, c1:]
        b, c2 = x2.shape[:2]
        mean, std = channel_statistics(x2)  # each (B, C2)
        u = torch.stack([mean, std], dim=-1).view(b, c2, 1, 2)
        g = F.hardsigmoid(self.attn.bn(self.attn.cfc1(u)))  # (B, C2, 1, 1)
        return torch.cat([y1, self.norm(x2 * g)], dim=1)


class RelativePositionBias(nn.Module):
    """The learned iRPE table (heads x 81), zero-initialised ("bias" mode on keys)."""

    def __init__(self, num_heads: int, num_buckets: int = pk.reference.NUM_BUCKETS):
        super().__init__()
        self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))


class RPESelfAttention(nn.Module):
    """Multi-head self-attention with an iRPE bias over the pixels of a (B, C, H, W) map.

    Returns the heads' output merged to (B, N, C) tokens *before* the output projection
    ``proj``: :class:`PATSelfMixer` applies the projection while writing the mixer's output
    (``patnet_kernels.self_mixer_output``).

    The iRPE bucket ids of one token grid, ``token_grid = (H, W)`` (7 x 7, the grid of a
    224 x 224 input, unless given), are kept as the non-persistent buffer ``bucket_ids``
    (N x N int64, N = H * W): not in the state_dict, but moved by ``.to(device)``, copied by
    ``copy.deepcopy`` and broadcast by DistributedDataParallel like any buffer. An input of that
    grid uses the buffer, with its id range known on the host (no device sync to check it);
    an input of another grid takes the map of ``patnet_kernels.rpe_buckets`` (cached per
    shape and device), so every input size works. :meth:`set_token_grid` changes the grid.
    """

    # Whether the CPU eval forms of its ops may run where the reference would (the functional
    # API's eval_form); patnet.optimize_for_inference turns it on.
    eval_forms = False

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1,
                 proj_drop: float = 0.1, backend: str = "auto",
                 token_grid: Tuple[int, int] = DEFAULT_TOKEN_GRID):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the attention width C2 = {dim} is not divisible by "
                             f"num_heads = {num_heads}; choose heads that divide it")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_k = RelativePositionBias(num_heads)
        self.backend = backend
        self.set_token_grid(*token_grid)

    def set_token_grid(self, height: int, width: int) -> None:
        """Keep the bucket map of a height x width token grid as ``bucket_ids``, on the device
        of the module's parameters (``token_grid`` and ``bucket_range`` follow it).

        For the stage-4 attention of PATNet the grid is (H // 32, W // 32) for H x W images.
        Call it on every rank alike, before wrapping the model in DistributedDataParallel or
        compiling it (both take the module's buffers as they find them then).
        """
        ids = pk.rpe_buckets(height, width)  # CPU, cached: copied, never shared with the cache
        self.token_grid = (height, width)
        self.bucket_range = (int(ids.min()), int(ids.max()))
        with outside_inference_mode():  # (a buffer that training reads, wherever set)
            self.register_buffer(
                "bucket_ids", ids.to(self.rpe_k.lookup_table_bias.device, copy=True),
                persistent=False)

    def buckets(self, height: int, width: int, device: torch.device):
        """The (N, N) bucket ids of a height x width token grid on ``device``, and their
        (min, max) where known on the host (else None: ``pk.rpe_attention`` checks them)."""
        if (height, width) == self.token_grid:
            return self.bucket_ids, self.bucket_range
        return pk.rpe_buckets(height, width, device), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, N, C) tokens, N = H * W in row-major order, not projected."""
        b, c, h, w = x.shape
        return self.attend(self.qkv(x.reshape(b, c, h * w).transpose(1, 2)), h, w)

    def attend(self, qkv: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The attention of the projected tokens qkv (B, N, 3C) of a height x width grid
        (``self.qkv``'s output) -> (B, N, C), the heads merged, not projected."""
        b, n, _ = qkv.shape
        c = qkv.shape[2] // 3
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        bucket, bucket_range = self.buckets(height, width, qkv.device)
        out = pk.rpe_attention(q, k, v, self.rpe_k.lookup_table_bias, bucket, scale=self.scale,
                               dropout_p=self.attn_drop if self.training else 0.0,
                               backend=self.backend, bucket_range=bucket_range,
                               eval_form=self.eval_forms)
        return out.transpose(1, 2).reshape(b, n, c)


def set_token_grid(model: nn.Module, height: int, width: int) -> nn.Module:
    """Call :meth:`RPESelfAttention.set_token_grid` on every PAT_sf attention of ``model``
    (for PATNet on H x W images: height = H // 32, width = W // 32); returns the model."""
    for module in model.modules():
        if isinstance(module, RPESelfAttention):
            module.set_token_grid(height, width)
    return model


class PATSelfMixer(nn.Module):
    """PAT_sf, the token mixer of stage 4: [conv3x3(X1) | Attn(LN(X2))] (SPEC.md section 4)."""

    # Whether the CPU eval forms of its ops may run where the reference would (the functional
    # API's eval_form); patnet.optimize_for_inference turns it on.
    eval_forms = False

    def __init__(self, dim: int, n_div: int, num_heads: int, attn_drop: float,
                 proj_drop: float, backend: str = "auto"):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)
        self.attn = RPESelfAttention(self.dim_untouched, num_heads, attn_drop, proj_drop,
                                     backend)
        self.norm = LayerNorm2d(self.dim_untouched)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """PAT_sf(x), or with ``residual`` x + PAT_sf(x) (on Triton in the same pass)."""
        tokens = self.attn(self.norm(x[:, self.dim_conv3:]))  # (B, N, C2), not yet projected
        return self.output(x, tokens, residual)

    def output(self, x: torch.Tensor, tokens: torch.Tensor, residual: bool) -> torch.Tensor:
        """[conv3x3(X1) | proj(tokens)] (B, C, H, W), with ``residual`` plus x: the mixer's
        output from the attention's (B, N, C2) tokens, not yet projected."""
        return pk.self_mixer_output(
            x, self.partial_conv3.weight, tokens, self.attn.proj.weight, self.attn.proj.bias,
            dropout_p=self.attn.proj_drop.p if self.training else 0.0, backend=self.backend,
            eval_form=self.eval_forms, residual=residual)


class PartialSpatialAttention(nn.Module):
    """PAT_sp, appended to the MLP: [BN_c(Ma * s) | conv1x1(BN_d(Mb))] (SPEC.md section 3).

    Runs as one fused op (``pk.spatial_attention``), except in training when BN_c or BN_d is a
    SyncBatchNorm syncing over several ranks (:func:`syncs_statistics`): then it is composed
    from the modules.
    """

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        self.dim_conv = int(0.5 * dim)  # P
        self.dim_untouched = dim - self.dim_conv  # Q
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, 1, bias=False)
        self.conv_attn = nn.Conv2d(self.dim_untouched, 1, 1, bias=False)
        self.norm = nn.BatchNorm2d(self.dim_untouched)
        self.norm2 = nn.BatchNorm2d(self.dim_conv)
        self.backend = backend

    def forward(self, m: torch.Tensor, residual: Optional[torch.Tensor] = None,
                statistics_of: Optional[int] = None):
        """m: (B, C, H, W) -> (B, C, H, W); with ``residual`` (B, C, H, W) that plus it (on
        Triton in the same kernel); with ``statistics_of`` (the inference path's) the pair
        (y, statistics of y[:, statistics_of:]), see ``pk.spatial_attention``."""
        if syncs_statistics(self.training, self.norm, self.norm2):
            y = self._forward_syncing(m)
            y = y if residual is None else y + residual
            return y if statistics_of is None else (y, None)
        out = pk.spatial_attention(
            m, self.conv_attn.weight, self.conv.weight, self.conv.bias,
            bn_params(self.norm, self.training), bn_params(self.norm2, self.training),
            training=self.training, residual=residual, statistics_of=statistics_of,
            backend=self.backend)
        count_batches(self.training, self.norm, self.norm2)
        return out

    def _forward_syncing(self, m: torch.Tensor) -> torch.Tensor:
        """The op of ``patnet_kernels.reference.spatial_attention`` with the BatchNorm modules
        called (a SyncBatchNorm gathers its statistics over the ranks and counts its batch)."""
        ma, mb = m[:, :self.dim_untouched], m[:, self.dim_untouched:]
        s = F.hardsigmoid(self.conv_attn(ma))  # (B, 1, H, W)
        return torch.cat([self.norm(ma * s), self.conv(self.norm2(mb))], dim=1)


def activation_name(module: nn.Module) -> str:
    """The name the fused ops give the MLP's activation module (the models' two)."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu"
    raise ValueError(f"the MLP's activation {module} has no fused form (ReLU and the exact "
                     "GELU have); run the model with backend='torch'")


# The backends under which the MLP's BatchNorm and activation run as one op
# (pk.batch_norm_act; "auto" decides per call); under the others its modules run one by one.
_BN_ACT_BACKENDS = ("auto",) + pk.registry.OPS["batch_norm_act"].backends


class MLP(nn.Sequential):
    """conv1x1 C -> hidden, BN, act, conv1x1 hidden -> C[, PAT_sp] (indices 0..4 as the authors).

    The BatchNorm and the activation run as one op, ``pk.batch_norm_act`` (its output written
    once, the BN's never), under "auto" and the backends with a kernel for it; under the others
    (``torch``: the authors' modules one by one), with a SyncBatchNorm syncing over several
    ranks, or once the BN is folded, the modules run in order. There a ReLU runs in place on
    the BatchNorm's output, as the authors' ``nn.ReLU(inplace=True)`` (no second hidden-width
    tensor per block; autograd keeps what it needs: BatchNorm's backward reads its input,
    ReLU's its output). GELU has no in-place form.
    """

    backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, norm, activation, second, *spatial = self
        if (self.backend not in _BN_ACT_BACKENDS or isinstance(norm, nn.Identity)
                or syncs_statistics(self.training, norm)):
            return super().forward(x)
        y = second(pk.batch_norm_act(first(x), bn_params(norm, self.training),
                                     activation_name(activation), training=self.training,
                                     backend=self.backend))
        count_batches(self.training, norm)
        for module in spatial:
            y = module(y)
        return y


def make_mlp(dim: int, mlp_ratio: float, act_layer: str, spatial_attn: bool,
             backend: str) -> MLP:
    """The block's :class:`MLP` on ``backend``."""
    hidden = int(dim * mlp_ratio)
    layers: List[nn.Module] = [
        nn.Conv2d(dim, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        make_activation(act_layer, inplace=True),
        nn.Conv2d(hidden, dim, 1, bias=False),
    ]
    if spatial_attn:
        layers.append(PartialSpatialAttention(dim, backend))
    mlp = MLP(*layers)
    mlp.backend = backend
    return mlp


class FasterNetBlock(nn.Module):
    """X + DropPath(MLP(PConv(X))). ``mlp`` is registered first, as in the authors' code."""

    def __init__(self, dim: int, n_div: int, mlp_ratio: float, drop_path: float,
                 act_layer: str, backend: str = "auto"):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.mlp = make_mlp(dim, mlp_ratio, act_layer, False, backend)
        self.spatial_mixing = PartialConv3(dim, n_div, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path.add_to(x, self.mlp(self.spatial_mixing(x)))


class PATNetBlock(nn.Module):
    """Stages 1-3: X + DropPath(MLP(PAT_ch(X))). Stage 4: U = X + PAT_sf(X); U + DropPath(MLP(U))."""

    def __init__(self, dim: int, n_div: int, mlp_ratio: float, drop_path: float,
                 act_layer: str, self_attention: bool, spatial_attn: bool, num_heads: int,
                 attn_drop: float, proj_drop: float, backend: str = "auto"):
        super().__init__()
        self.self_attention = self_attention
        self.drop_path = DropPath(drop_path)
        if self_attention:
            self.spatial_mixing = PATSelfMixer(dim, n_div, num_heads, attn_drop, proj_drop,
                                               backend)
        else:
            self.spatial_mixing = PATChannelMixer(dim, n_div, backend)
        self.mlp = make_mlp(dim, mlp_ratio, act_layer, spatial_attn, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_attention:
            x = self.spatial_mixing(x, residual=True)  # (x + PAT_sf(x): one op)
            return self.drop_path.add_to(x, self.mlp(x))
        return self.drop_path.add_to(x, self.mlp(self.spatial_mixing(x)))


class BasicStage(nn.Module):
    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PatchEmbed(nn.Module):
    """Stem: conv 4x4 stride 4, in_chans -> E, then BN."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=False)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PatchMerging(nn.Module):
    """Between stages: conv 2x2 stride 2, C -> 2C, then BN."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, patch_size, patch_size, bias=False)
        self.norm = nn.BatchNorm2d(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))
