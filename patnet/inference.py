"""The inference path: ``optimize_for_inference(model)``, the fastest correct way to run a model.

It returns an eval-mode copy of a PATNet or FasterNet (the model itself is not changed) that

1. has every foldable BatchNorm folded (:func:`patnet.fuse_for_inference`);
2. runs each fused op on the backend ``backend`` names (``"auto"``: on a GPU, a fused backend
   only where measured faster than the reference for that call, see
   :mod:`patnet_kernels.auto_rule`; ``model.backend_plan(device, input_shape)`` tells which);
3. on the CPU, where the reference would run, runs every op in its eval form or as the
   reference, whichever was faster on the first call of its kind on this machine (the mixers'
   ``eval_forms`` policy and ``eval_form=True`` of the copy's own ops, see
   :mod:`patnet_kernels.eval_cpu`: the convolutions on oneDNN with their weights laid out
   once, or on F.conv2d where that was faster, :mod:`patnet_kernels.cpu_conv`; PAT_ch's
   statistics in two cheap passes instead of ``Tensor.std``, BN_b folded into one affine
   pass; PAT_sf's attention by ``scaled_dot_product_attention``; both halves written into one
   buffer; the choices: :mod:`patnet_kernels.cpu_choice`, which makes the first forward at a
   new input shape several times slower), in channels_last from the stem on
   (:func:`_writes_channels_last`);
4. runs each block's MLP as one op (:class:`InferenceMLP`, ``pk.pointwise_mlp``: both 1x1
   convs, the folded BN's bias, the activation and the block's residual in one pass, the 2C
   hidden activation kept on chip by the fused kernel, past 256 output channels written once
   by a first pass and read by a second); under ``backend="cuda"``, which has no
   kernel for it, the MLP's modules run one by one as before folding. Under
   ``backend="triton"`` a FasterNet or PAT_ch block (PATNet-T1's with its PAT_sp) runs as one
   op, ``pk.partial_block``, whose MLP kernel computes the mixer as it reads its input
   (conv3x3(X1) for its pixel tile, X2 with PAT_ch's gate applied; PAT_sp on its output before
   the residual), so neither is written: one launch per FasterNet block, three per PAT_ch
   block (statistics, gate, the kernel); and each
   PConv weight is stored in the kernels' [tap, in, out] order, so no call re-lays it out
   (again after any conversion of the copy, such as ``.to(memory_format=torch.channels_last)``:
   :class:`KeepsKernelLayouts`);
   a PAT_ch block followed by another in its stage hands it the statistics of its output's X2
   channels, taken in its MLP kernel's epilogue (:class:`InferenceStage`), so that block does
   not read X2 for them (two launches instead of three);
5. takes the stage-4 blocks' first residual sum in the mixer's output op
   (``pk.self_mixer_output(residual=True)``; on Triton one kernel writes x + [conv3x3(X1) |
   proj(attention)], the attention's output read in place: its heads merged by a view), and
   runs PAT_sf's LayerNorm and qkv projection as one op, ``pk.layer_norm_linear`` (on Triton
   one kernel that reads X2 where it lies, normalises each pixel as it reads it and writes the
   tokens' q, k, v: no copy of the slice, no normalised map written; under "cuda", which has
   no kernel for it, the modules);
6. runs the stem and the merging layers (their BatchNorm folded into the conv) as
   ``pk.patch_conv`` (under a backend with no kernel for it, ``cuda``, the conv module): on
   Triton one kernel that reads the image in its own dtype (under autocast no cast pass of
   the float32 input) and, where the next stage's first block is a PAT_ch block, takes the
   statistics of its output's X2 in its epilogue and hands them to that block
   (:class:`StageInput`), which then does not read X2 for them;
7. under ``backend="triton"`` runs in channels_last whatever the input's layout: the stem
   reads an NCHW image as it is and writes its output channels_last, so every op after it
   runs there (its kernels' fast layout: tiles spanning samples, 16-byte loads in the 3 x 3
   convs); the logits are the same, feature maps (hooks, and the outputs in features mode)
   are channels_last.
   Under "auto" on a GPU each op decides from measurements of its own layout, so the copy
   keeps the input's.

Its outputs equal the eval model's within float rounding (tests/test_inference.py checks every
variant). The copy is for inference only: it refuses ``train()``. ``compile=True`` wraps it in
:class:`patnet.wrappers.FrozenCompiledModel` (torch.compile under Inductor's freezing), and
``example_input`` in :class:`patnet.cuda_graph.GraphedModel`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import patnet_kernels as pk
from patnet_kernels.functional import autocast_aware
from patnet_kernels._types import outside_inference_mode
from patnet_kernels.triton.partial_conv import tap_major

from .cuda_graph import GraphedModel, check_example_input
from .wrappers import FrozenCompiledModel
from .fuse import fuse_for_inference
from .layers import (MLP, BasicStage, FasterNetBlock, PATChannelMixer, PatchEmbed,
                     PatchMerging, PATNetBlock, PATSelfMixer, activation_name, bn_params)
from .model import check_model, set_backend

# The backends under which the MLP runs as the fused op (the others have no kernel for it).
_MLP_BACKENDS = ("auto", "torch") + pk.registry.OPS["pointwise_mlp"].backends
# The backends that, named, run a whole FasterNet or PAT_ch block as one op (pk.partial_block).
_BLOCK_BACKENDS = pk.registry.OPS["partial_block"].backends
# The backends under which the stem and the merging layers run as the fused op.
_PATCH_BACKENDS = ("auto", "torch") + pk.registry.OPS["patch_conv"].backends
# The backends under which PAT_sf's LayerNorm and qkv projection run as the fused op.
_NORM_LINEAR_BACKENDS = ("auto", "torch") + pk.registry.OPS["layer_norm_linear"].backends
# The backends that, named, run the copy in channels_last whatever its input's layout: the stem
# writes it (its kernel reads an NCHW image as it is), as every op of the model has a kernel
# that takes it, where the tiles span samples and the 3 x 3 convs' loads are 16 bytes wide.
_CHANNELS_LAST_BACKENDS = _BLOCK_BACKENDS


def _writes_channels_last(backend: str, x: torch.Tensor) -> Optional[bool]:
    """The layout the stem and the merging layers write, which the ops after them keep: True
    (channels_last) under a backend of :data:`_CHANNELS_LAST_BACKENDS`, and on the CPU, where
    the eval forms' oneDNN convolutions read and write it fastest
    (:mod:`patnet_kernels.cpu_conv`); else None (x's: under "auto" on a GPU each op decides
    from measurements of its own layout)."""
    return True if backend in _CHANNELS_LAST_BACKENDS or x.device.type == "cpu" else None


def _lay_out_weights(model: nn.Module, backend: str) -> None:
    """Store the weights that the fused kernels read in the order they read them, so that no
    call re-lays one out (a copy kernel per weight per forward): under ``backend="triton"``
    every 3 x 3 conv weight (PConv, PAT_ch, PAT_sf) in the kernels' [tap, in, out] order, the
    stem's and the merging layers' in [ky, kx, in, out] (both ``tap_major``); under any
    backend PAT_ch's W_ch (C2, C2, 1, 2) contiguous, as its gate kernel reads it. Values and
    shapes unchanged; a weight already laid out is left as it is (no copy)."""
    for module in model.modules():
        if hasattr(module, "partial_conv3") and backend == "triton":
            weight = module.partial_conv3.weight  # (the Triton kernels read it with no copy)
            weight.data = tap_major(weight.data)
        if isinstance(module, InferencePatchLayer) and backend == "triton":
            weight = module.conv.weight  # (read along the output channels)
            weight.data = tap_major(weight.data)
        if isinstance(module, PATChannelMixer):
            module.attn.cfc1.weight.data = module.attn.cfc1.weight.data.contiguous()


class KeepsKernelLayouts(nn.Module):
    """Lays its weights out for the kernels again after every conversion of the copy
    (``Module._apply``: ``.to(...)``, ``.cuda()``, ``.half()``): ``.to(memory_format=
    torch.channels_last)``, which the usual AMP recipe applies to a whole model, re-strides
    every 4-d tensor, and each kernel would then copy its weight back on every call (PATNet-T2
    51 -> 75 launches per forward, FasterNet-T2 34 -> 47). As ``nn.RNNBase`` flattens its
    weights again after one. ``backend``: the backend the copy was made for."""

    backend = "auto"

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        _lay_out_weights(self, self.backend)
        return module


@autocast_aware
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride,
            padding, dilation, groups: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@autocast_aware
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


class InferenceConv2d(nn.Conv2d):
    """A conv of the copy that runs as a module (the head's 1 x 1 conv; under a backend with no
    kernel for an op, the layers it composes): under autocast its frozen weight and bias are
    cast once and kept while unchanged (``patnet_kernels.functional.autocast_aware``), where
    autocast casts them on every call, a kernel each. The same arithmetic as autocast's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return _conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups)


class InferenceLinear(nn.Linear):
    """The classifier (and PAT_sf's linear layers where they run as modules), its frozen weight
    and bias cast once under autocast, as :class:`InferenceConv2d`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)


def _spatial_params(module: nn.Module) -> pk.SpatialAttentionParams:
    """The tensors of a PAT_sp module (its BatchNorms' running statistics; BN_d folded into the
    conv in the inference copy) as the fused MLP and block ops take them."""
    return pk.SpatialAttentionParams(module.conv_attn.weight, module.conv.weight,
                                     module.conv.bias, bn_params(module.norm, False),
                                     bn_params(module.norm2, False))


class InferenceMLP(MLP):
    """The folded MLP [conv1x1 + bias, Identity (its folded BN), act, conv1x1[, PAT_sp]] as one
    op, ``pk.pointwise_mlp`` (PAT_sp, where there is one, in the same op: its ``spatial``),
    with the block's residual added in its epilogue. Same children, so the same state_dict
    keys. Under a backend with no kernel for it (``cuda``) the modules run one by one, as
    before folding."""

    backend = "auto"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        first, _, activation, second, *spatial = self
        if self.backend in _MLP_BACKENDS:  # (PATNet-T1: with PAT_sp, in the same kernel)
            return pk.pointwise_mlp(
                x, first.weight, first.bias, second.weight, second.bias, residual=residual,
                activation=activation_name(activation),
                spatial=_spatial_params(spatial[0]) if spatial else None, backend=self.backend,
                eval_form=True)
        y = second(activation(first(x)))
        if not spatial:
            return y if residual is None else y.add_(residual)
        (module,) = spatial  # (PAT_sp's op adding the residual)
        return module(y, residual=residual)

    def after_mixer(self, mixer: nn.Module, x: torch.Tensor, statistics=None,
                    return_statistics: bool = False):
        """x + MLP(mixer(x)) (with PAT_sp: x + PAT_sp(MLP(mixer(x)))) for a PConv or PAT_ch
        mixer: mixer and MLP as one op, ``pk.partial_block`` (the mixer's output never
        written; with PAT_sp, its ``spatial`` form: PAT_sp in the same kernel), where the
        backend is one named for it, or "auto" where a measurement on this GPU shows the block
        op faster than the reference; else the mixer's op, then this MLP's (and PAT_sp's),
        each decided per call (so "auto" on the CPU, and ``backend_calls`` under "auto",
        compose). PAT_ch only: ``statistics`` of x's X2 from the previous block (or None)
        and, with ``return_statistics``, (y, the statistics of y for the next block, or None
        where there are none: the block composed), see ``pk.partial_block``."""
        fused = (self.backend in _BLOCK_BACKENDS
                 or self.backend == "auto" and pk.backends.auto_runs_fused("partial_block", x))
        if not fused:
            y = self(mixer(x), residual=x)
            return (y, None) if return_statistics else y
        first, _, activation, second, *spatial = self
        gate = {}
        if isinstance(mixer, PATChannelMixer):
            attn = mixer.attn
            gate = dict(cfc_weight=attn.cfc1.weight, cfc_bias=attn.cfc1.bias,
                        bn_a=bn_params(attn.bn, False), bn_b=bn_params(mixer.norm, False),
                        statistics=statistics, return_statistics=return_statistics)
        if spatial:  # (PATNet-T1: x + PAT_sp(MLP(mixer(x))), PAT_sp in the same kernel)
            gate["spatial"] = _spatial_params(spatial[0])
        # (with return_statistics, the pair (y, statistics))
        return pk.partial_block(x, mixer.partial_conv3.weight, first.weight, first.bias,
                                second.weight, second.bias,
                                activation=activation_name(activation), backend=self.backend,
                                **gate)


class InferenceFasterNetBlock(FasterNetBlock):
    """X + MLP(PConv(X)), as one op where it can (:meth:`InferenceMLP.after_mixer`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.after_mixer(self.spatial_mixing, x)


class InferencePATNetBlock(PATNetBlock):
    """Stages 1-3: X + MLP(PAT_ch(X)), as one op where it can (:meth:`InferenceMLP.after_mixer`).
    Stage 4: the first residual sum taken by the mixer's output op (on Triton in its kernel),
    the second in the MLP's epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_attention:
            x = self.spatial_mixing(x, residual=True)
            return self.mlp(x, residual=x)
        return self.mlp.after_mixer(self.spatial_mixing, x)

    def with_statistics(self, x: torch.Tensor, statistics, return_statistics: bool):
        """A PAT_ch block given its X2 statistics from the block before (or None): (y, the
        statistics of y for the next, or None)."""
        if return_statistics:
            return self.mlp.after_mixer(self.spatial_mixing, x, statistics, True)
        return self.mlp.after_mixer(self.spatial_mixing, x, statistics), None


class InferencePATSelfMixer(PATSelfMixer):
    """PAT_sf with its LayerNorm and qkv projection as one op, ``pk.layer_norm_linear`` (under
    a backend with no kernel for it, ``cuda``, the modules, as before)."""

    def forward(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        if self.backend not in _NORM_LINEAR_BACKENDS:
            return super().forward(x, residual)
        # (the LayerNorm's affine is folded into qkv: fuse_for_inference)
        qkv = pk.layer_norm_linear(x[:, self.dim_conv3:], self.attn.qkv.weight,
                                   self.attn.qkv.bias, eps=self.norm.eps, backend=self.backend,
                                   eval_form=True)
        return self.output(x, self.attn.attend(qkv, x.shape[2], x.shape[3]), residual)


def _reads_statistics(block: nn.Module) -> bool:
    return isinstance(block, InferencePATNetBlock) and not block.self_attention


class StageInput(NamedTuple):
    """A stage's input with the statistics of its X2 for its first block (a PAT_ch block), as
    the stem or the merging layer before it took them (``pk.patch_conv``'s)."""
    x: torch.Tensor
    statistics: Tuple[torch.Tensor, torch.Tensor]


class InferencePatchLayer(KeepsKernelLayouts):
    """The stem or a merging layer with its BatchNorm folded: ``pk.patch_conv`` (its conv's
    weight and bias), returning a :class:`StageInput` with the statistics the next stage's
    first block reads where ``statistics_of`` (that block's C1) is set; the conv module
    under a backend with no kernel for it. Same children as the layer, so the same
    state_dict keys."""

    statistics_of: Optional[int] = None

    @property
    def conv(self) -> nn.Conv2d:
        """The layer's conv (its BatchNorm folded into it)."""
        return self.proj if isinstance(self, PatchEmbed) else self.reduction

    def forward(self, x: torch.Tensor):
        conv = self.conv
        if self.backend not in _PATCH_BACKENDS:
            return conv(x)
        out = pk.patch_conv(x, conv.weight, conv.bias, statistics_of=self.statistics_of,
                            channels_last=_writes_channels_last(self.backend, x),
                            backend=self.backend, eval_form=True)
        return out if self.statistics_of is None else StageInput(*out)


class InferencePatchEmbed(InferencePatchLayer, PatchEmbed):
    pass


class InferencePatchMerging(InferencePatchLayer, PatchMerging):
    pass


class InferenceStage(KeepsKernelLayouts, BasicStage):
    """The blocks in order; each PAT_ch block followed by another hands it the statistics of
    its output's X2 channels (taken in its MLP kernel's epilogue on Triton), so that block does
    not read X2 again for them; the first takes those of a :class:`StageInput`."""

    def forward(self, x) -> torch.Tensor:
        blocks, statistics = list(self.blocks), None
        if isinstance(x, StageInput):
            x, statistics = x
        for block, following in zip(blocks, blocks[1:] + [None]):
            if _reads_statistics(block):
                x, statistics = block.with_statistics(x, statistics,
                                                      _reads_statistics(following))
            else:
                x, statistics = block(x), None
        return x


_INFERENCE_CLASSES = {FasterNetBlock: InferenceFasterNetBlock,
                      PATNetBlock: InferencePATNetBlock, BasicStage: InferenceStage,
                      PatchEmbed: InferencePatchEmbed, PatchMerging: InferencePatchMerging,
                      PATSelfMixer: InferencePATSelfMixer, nn.Conv2d: InferenceConv2d,
                      nn.Linear: InferenceLinear}


def _hand_statistics(model: nn.Module) -> None:
    """Set ``statistics_of`` on the stem and each merging layer whose next stage starts with a
    PAT_ch block (which then reads their statistics, not its X2)."""
    layers = [getattr(model, "patch_embed", None)] + list(getattr(model, "stages", ()))
    for layer, following in zip(layers, layers[1:]):
        if isinstance(layer, InferencePatchLayer) and isinstance(following, InferenceStage) \
                and len(following.blocks) and _reads_statistics(following.blocks[0]):
            layer.statistics_of = following.blocks[0].spatial_mixing.dim_conv3


@torch.no_grad()
def optimize_for_inference(model: nn.Module, backend: str = "auto",
                           example_input: Optional[torch.Tensor] = None,
                           compile: bool = False) -> nn.Module:
    """An eval-mode copy of a PATNet or FasterNet for the fastest inference (see module doc).

    model: a PATNet or FasterNet (trained or not, any device and dtype; already folded is fine).
    backend: "auto" (default: per call, a fused backend only where measured faster than the
    reference on this kind of GPU, else the reference), "torch", "triton" or "cuda" for every
    fused op. example_input: a CUDA tensor shaped like every input to come: the copy's forward
    is then captured once as a CUDA graph and replayed per call
    (:class:`patnet.cuda_graph.GraphedModel`; build it under the autocast you will call it in).
    compile: the copy compiled by torch.compile under Inductor's freezing
    (:class:`patnet.wrappers.FrozenCompiledModel`: the fastest path measured on the CPU; the
    first call per input shape compiles; not with ``example_input``).
    Returns the copy; ``model`` is unchanged. The copy's parameters do not require gradients.
    """
    check_model(model, "optimize_for_inference")
    pk.check_backend_name(backend)  # (these before any copy is made)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if example_input is not None:
        check_example_input(example_input)
        if compile:
            raise ValueError("compile=True and example_input are two ways of running the copy "
                             "(torch.compile, a CUDA graph); choose one")
    with outside_inference_mode():  # (the copy is used in any mode afterwards)
        optimized = _optimized_copy(model, backend)
    if example_input is not None:
        return GraphedModel(optimized, example_input)
    return FrozenCompiledModel(optimized) if compile else optimized


def _optimized_copy(model: nn.Module, backend: str) -> nn.Module:
    optimized = fuse_for_inference(model)
    optimized.requires_grad_(False)
    set_backend(optimized, backend)
    for module in list(optimized.modules()):
        inference_class = _INFERENCE_CLASSES.get(type(module))
        if inference_class is not None:
            module.__class__ = inference_class
        if isinstance(module, (InferenceFasterNetBlock, InferencePATNetBlock)):
            module.mlp.__class__ = InferenceMLP
            module.mlp.backend = backend
        if isinstance(module, KeepsKernelLayouts):
            module.backend = backend
        if hasattr(module, "eval_forms"):
            module.eval_forms = True
    _lay_out_weights(optimized, backend)
    if backend in _BLOCK_BACKENDS:  # (its blocks run as one op and take statistics)
        _hand_statistics(optimized)
    optimized.optimized_for_inference = True
    return optimized
