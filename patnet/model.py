"""PATNet and FasterNet networks, their released variants, and ``create_model``."""
from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Sequence as SequenceABC
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from patnet_kernels import (BackendUnavailableError, check_backend_name, check_backend_usable,
                            choose_backend, recording_calls, registry)
from patnet_kernels._checks import check_number

from .layers import (BasicStage, FasterNetBlock, PatchEmbed, PatchMerging, PATNetBlock,
                     make_activation)

logger = logging.getLogger("patnet")

# The released variants (SPEC.md section 5). Every key can be overridden in create_model.
_COMMON = dict(n_div=4, mlp_ratio=2.0, feature_dim=1280, num_classes=1000)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "patnet_t0": dict(embed_dim=32, depths=(1, 2, 8, 2), act_layer="GELU", drop_path_rate=0.0,
                      use_spatial_attn=False),
    "patnet_t1": dict(embed_dim=48, depths=(1, 2, 8, 2), act_layer="GELU", drop_path_rate=0.02,
                      use_spatial_attn=True),
    "patnet_t2": dict(embed_dim=64, depths=(2, 2, 6, 4), act_layer="RELU", drop_path_rate=0.05,
                      use_spatial_attn=False),
    "patnet_s": dict(embed_dim=96, depths=(2, 2, 9, 4), act_layer="RELU", drop_path_rate=0.1,
                     use_spatial_attn=False),
    "patnet_m": dict(embed_dim=128, depths=(2, 3, 16, 4), act_layer="RELU", drop_path_rate=0.2,
                     use_spatial_attn=False),
    "patnet_l": dict(embed_dim=160, depths=(2, 3, 20, 4), act_layer="RELU", drop_path_rate=0.3,
                     use_spatial_attn=False),
    "fasternet_t0": dict(embed_dim=40, depths=(1, 2, 8, 2), act_layer="GELU",
                         drop_path_rate=0.0),
    "fasternet_t1": dict(embed_dim=64, depths=(1, 2, 8, 2), act_layer="GELU",
                         drop_path_rate=0.02),
    "fasternet_t2": dict(embed_dim=96, depths=(1, 2, 8, 2), act_layer="RELU",
                         drop_path_rate=0.05),
    "fasternet_s": dict(embed_dim=128, depths=(1, 2, 13, 2), act_layer="RELU",
                        drop_path_rate=0.1),
    "fasternet_m": dict(embed_dim=144, depths=(3, 4, 18, 3), act_layer="RELU",
                        drop_path_rate=0.2),
    "fasternet_l": dict(embed_dim=192, depths=(3, 4, 18, 3), act_layer="RELU",
                        drop_path_rate=0.3),
}


class _PartialNetwork(nn.Module):
    """The skeleton PATNet and FasterNet share: stem, 4 stages with merging, head.

    ``stages`` holds stage 0, merging, stage 1, merging, ... (indices 0..6). With
    ``features_only=True`` there is no head: forward returns the four stage outputs, each through
    its own BatchNorm (``norm0``, ``norm2``, ``norm4``, ``norm6``), for detection necks.
    """

    family = ""

    def __init__(self, *, embed_dim: int, depths: Sequence[int], act_layer: str = "RELU",
                 n_div: int = 4, mlp_ratio: float = 2.0, feature_dim: int = 1280,
                 num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3,
                 patch_size: int = 4, patch_size2: int = 2, features_only: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_positive(embed_dim=embed_dim, n_div=n_div, in_chans=in_chans,
                        patch_size=patch_size, patch_size2=patch_size2,
                        feature_dim=feature_dim)
        _check_options(depths, mlp_ratio, num_classes, drop_path_rate)
        depths = tuple(int(d) for d in depths)
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} leaves the MLP no hidden channel at "
                             f"embed_dim={embed_dim}")
        if embed_dim < n_div:
            raise ValueError(f"embed_dim={embed_dim} leaves no channel for the convolution "
                             f"with n_div={n_div}")
        make_activation(act_layer)  # validates the name
        check_backend_name(backend)
        self.in_chans = in_chans
        self.features_only = features_only
        self._reported_devices = set()  # where the backend plan was logged
        self.min_input_size = patch_size * patch_size2 ** (len(depths) - 1)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages: List[nn.Module] = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            first = sum(depths[:i])
            stages.append(BasicStage([
                self._make_block(i, len(depths), dim, rates[first + j], act_layer, n_div,
                                 mlp_ratio, backend)
                for j in range(depth)]))
            if i < len(depths) - 1:
                stages.append(PatchMerging(patch_size2, dim))
        self.stages = nn.Sequential(*stages)

        if features_only:
            self.out_indices = [2 * i for i in range(len(depths))]
            for i, index in enumerate(self.out_indices):
                self.add_module(f"norm{index}", nn.BatchNorm2d(embed_dim * 2 ** i))
        else:
            self.avgpool_pre_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(self.num_features, feature_dim, 1, bias=False),
                make_activation(act_layer, inplace=True))
            self.head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def _make_block(self, stage: int, num_stages: int, dim: int, drop_path: float,
                    act_layer: str, n_div: int, mlp_ratio: float, backend: str) -> nn.Module:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.compiler.is_compiling() and torch.jit.is_tracing():
            raise RuntimeError(f"torch.jit.trace cannot trace {type(self).__name__} (under it the "
                               "input's sizes are tensors, and PyTorch deprecates TorchScript); "
                               "export it with torch.export.export(model, (x,)) or compile it "
                               "with torch.compile(model)")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects images (B, {self.in_chans}, H, W), "
                             f"got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects {self.in_chans} input channels, got "
                             f"{x.shape[1]} (input shape {tuple(x.shape)}); NCHW is expected")
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(f"input {tuple(x.shape[2:])} is too small: the network downsamples "
                             f"by {self.min_input_size}, so H and W must be at least that")
        param = self.patch_embed.proj.weight
        if x.device != param.device:
            raise ValueError(f"input is on {x.device} but the model is on {param.device}; "
                             f"call model.to({str(x.device)!r}) or move the input")
        if not x.is_floating_point():
            raise TypeError(f"input is {x.dtype} but the model takes {param.dtype} images; "
                            f"convert them, e.g. x.to({param.dtype}) (8-bit pixels: divide by "
                            f"255 and normalise as the model was trained)")
        if x.dtype != param.dtype:
            raise TypeError(f"input is {x.dtype} but the model is {param.dtype}; cast one to the "
                            f"other, e.g. x.to({param.dtype}) or model.to({x.dtype})")
        min_batch = self._min_train_batch(x)
        if self.training and x.shape[0] < min_batch:
            raise ValueError(f"training mode needs a batch of at least {min_batch} here "
                             "(BatchNorm over a 1 x 1 map "
                             "needs several samples); call model.eval() for inference")

    def _min_train_batch(self, x: torch.Tensor) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """x: (B, in_chans, H, W) with H, W >= ``min_input_size`` (patch_size x patch_size2 ^
        (stages - 1): 32 for the released variants). Returns logits (B, num_classes) (with
        num_classes=0 the pooled features, (B, feature_dim)), or each stage's features
        (B, 2^i E, H / (patch_size 2^i), W / (patch_size 2^i)) in features mode."""
        self._check_input(x)
        if (not torch.compiler.is_compiling() and logger.isEnabledFor(logging.INFO)
                and x.device.type != "meta" and x.device not in self._reported_devices):
            self._reported_devices.add(x.device)
            plan = ", ".join(f"{op} -> {name}" for op, name in self.backend_plan(
                x.device, x.shape, torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type) else x.dtype).items())
            logger.info("%s on %s runs %s", type(self).__name__, x.device, plan)
        x = self.patch_embed(x)
        if self.features_only:
            outs = []
            for index, stage in enumerate(self.stages):
                x = stage(x)
                if index in self.out_indices:
                    outs.append(getattr(self, f"norm{index}")(x))
            return outs
        x = self.stages(x)
        x = self.avgpool_pre_head(x)
        return self.head(torch.flatten(x, 1))

    def backend_plan(self, device: Optional[torch.device] = None,
                     input_shape: Optional[Sequence[int]] = None,
                     dtype: Optional[torch.dtype] = None) -> Dict[str, str]:
        """Which backend runs each fused op of this model on ``device`` (default: the device
        of its parameters), e.g. ``{"channel_attention": "torch", "partial_conv3x3":
        "triton", ...}``, for an input of ``input_shape`` (default (2, in_chans, 224, 224))
        and ``dtype`` (default: the parameters'; pass the autocast dtype under autocast), in
        the model's mode (training: a gradient will be taken). Where ``"auto"`` picks
        different backends for the calls of one op (per shape, see
        ``patnet_kernels.auto_rule``) the value counts them, e.g. ``"triton x3, torch x2"``;
        :meth:`backend_calls` gives each call with its reason. The model also logs the plan
        (logger "patnet", level INFO) the first time it runs on a device."""
        plan: Dict[str, List[str]] = {}
        for op, name, _ in self.backend_calls(device, input_shape, dtype):
            plan.setdefault(op, []).append(name)
        return {op: names[0] if len(set(names)) == 1 else ", ".join(
            f"{name} x{names.count(name)}" for name in sorted(set(names), key=names.index))
            for op, names in plan.items()}

    def backend_calls(self, device: Optional[torch.device] = None,
                      input_shape: Optional[Sequence[int]] = None,
                      dtype: Optional[torch.dtype] = None) -> List[Tuple[str, str, str]]:
        """Each fused op call of a forward, in order, as ``(op, backend, reason)`` (arguments
        as :meth:`backend_plan`): the calls are found by a forward on the meta device (no
        memory, no kernel) and each is decided as its layer asks
        (``patnet_kernels.choose_backend``; ``"auto"`` on a GPU per call)."""
        device = self.patch_embed.proj.weight.device if device is None else torch.device(device)
        return [(op, *choose_backend(backend, device, op, refused, call))
                for op, backend, refused, call in self.recorded_calls(input_shape, dtype)]

    def recorded_calls(self, input_shape: Optional[Sequence[int]] = None,
                       dtype: Optional[torch.dtype] = None) -> List[tuple]:
        """The op calls of one forward, as ``patnet_kernels.recording_calls`` records them,
        from a forward on the meta device (arguments as :meth:`backend_plan`)."""
        weight = self.patch_embed.proj.weight
        shape = tuple(input_shape or (2, self.patch_embed.proj.in_channels, 224, 224))
        dtype = dtype or weight.dtype  # (the ops' dtype: autocast's, where it casts)
        meta = {}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            meta[name] = torch.empty_like(t, device="meta",
                                          dtype=dtype if t.is_floating_point() else t.dtype)
            meta[name].requires_grad_(t.requires_grad and self.training)
        with recording_calls() as recorded, torch.set_grad_enabled(self.training):
            torch.func.functional_call(self, meta, (torch.empty(shape, dtype=dtype,
                                                                device="meta"),))
        return recorded

    def train(self, mode: bool = True):
        if mode and getattr(self, "fused_for_inference", False):
            raise RuntimeError("this model was folded for inference (BatchNorms merged into "
                               "convolutions) and cannot be trained; train the unfolded model")
        return super().train(mode)


class PATNet(_PartialNetwork):
    """PATNet (PartialNet): PAT_ch blocks in stages 1-3, PAT_sf blocks in stage 4.

    Extra options: ``use_spatial_attn`` (PAT_sp after every MLP), ``num_heads`` of PAT_sf,
    ``attn_drop`` / ``proj_drop``, the attention's two dropout rates (0.1 in the authors' code).
    """

    family = "patnet"

    def __init__(self, *, use_spatial_attn: bool = False, num_heads: int = 4,
                 attn_drop: float = 0.1, proj_drop: float = 0.1, **kwargs):
        _check_positive(num_heads=num_heads)
        self.use_spatial_attn = use_spatial_attn
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop
        super().__init__(**kwargs)

    def _make_block(self, stage, num_stages, dim, drop_path, act_layer, n_div, mlp_ratio,
                    backend):
        return PATNetBlock(dim, n_div, mlp_ratio, drop_path, act_layer,
                           self_attention=stage == num_stages - 1,
                           spatial_attn=self.use_spatial_attn, num_heads=self.num_heads,
                           attn_drop=self.attn_drop, proj_drop=self.proj_drop, backend=backend)

    def _min_train_batch(self, x):
        return 2  # BN_a of PAT_ch normalises a 1 x 1 map over the batch


class FasterNet(_PartialNetwork):
    """FasterNet, the baseline: PConv blocks in every stage."""

    family = "fasternet"

    def _make_block(self, stage, num_stages, dim, drop_path, act_layer, n_div, mlp_ratio,
                    backend):
        return FasterNetBlock(dim, n_div, mlp_ratio, drop_path, act_layer, backend)

    def _min_train_batch(self, x):
        last = self.min_input_size
        return 2 if (x.shape[2] // last) * (x.shape[3] // last) == 1 else 1


def _check_positive(**values: int) -> None:
    """Each value must be an int (not a bool, a float or a string) of at least 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_options(depths: object, mlp_ratio: object, num_classes: object,
                   drop_path_rate: object) -> None:
    """The options of a model that are not positive integers, checked before it is built."""
    if isinstance(depths, (str, bytes)) or not isinstance(depths, SequenceABC) or not depths:
        raise ValueError(f"depths must be a sequence of blocks per stage, e.g. (2, 2, 6, 4), "
                         f"got {depths!r}")
    for depth in depths:
        _check_positive(**{"each of depths": depth})
    check_number("mlp_ratio", mlp_ratio, 0.0)  # (0 leaves no hidden channel: checked after)
    check_number("drop_path_rate", drop_path_rate, 0.0, 1.0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier, the "
                         f"model returns its pooled features), got {num_classes!r}")


def _init_weights(m: nn.Module) -> None:
    """Truncated normal (std 0.02) for conv and linear weights, zero biases; LayerNorm 1/0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_FAMILIES = {"patnet": PATNet, "fasternet": FasterNet}


def list_models() -> List[str]:
    """The names ``create_model`` accepts: patnet_t0 ... patnet_l, fasternet_t0 ... fasternet_l."""
    return list(VARIANTS)


def _option_names(family: str) -> List[str]:
    import inspect
    names = set()
    for cls in _FAMILIES[family].__mro__:
        if "__init__" in vars(cls) and issubclass(cls, nn.Module) and cls is not nn.Module:
            names |= {p for p in inspect.signature(cls.__init__).parameters
                      if p not in ("self", "kwargs")}
    return sorted(names - {"backend"})


def create_model(name: str, pretrained_path: Optional[str] = None, backend: str = "auto",
                 **overrides: Any) -> nn.Module:
    """Build a released variant, optionally load a checkpoint, with any hyper-parameter overridden.

    name: one of :func:`list_models`. pretrained_path: a checkpoint of this package or of the
    authors' code (a state_dict, or a dict holding it under "state_dict" or "model"), loaded with
    strict=True. backend: "auto" | "torch" | "triton" | "cuda" for every fused layer.
    overrides: embed_dim, depths, act_layer ("GELU"/"RELU"), n_div, mlp_ratio, feature_dim,
    num_classes (0: no classifier), drop_path_rate, in_chans, patch_size, patch_size2,
    features_only, and for PATNet use_spatial_attn, num_heads, attn_drop, proj_drop; a bad
    type or range raises ValueError before anything is built. A ``family`` key (as in the
    reference configs) must agree with the name.
    """
    key = str(name).lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    family = key.split("_")[0]
    given_family = overrides.pop("family", family)
    if given_family != family:
        raise ValueError(f"family={given_family!r} contradicts the model name {name!r}")
    valid = _option_names(family)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"{name} has no option {', '.join(unknown)}; valid options: "
                        f"{', '.join(valid)}")
    check_backend_usable(backend)
    config = {**_COMMON, **copy.deepcopy(VARIANTS[key]), **overrides}
    model = _FAMILIES[family](backend=backend, **config)
    _check_ops_served(model, backend)
    model.variant = key
    if pretrained_path is not None:
        load_checkpoint(model, pretrained_path)
    return model


def model_from_config(config: Dict[str, Any], backend: str = "auto") -> nn.Module:
    """A model from a config dict such as the ``config`` of the authors' reference vectors:
    ``family`` ("patnet", the default, or "fasternet") and any options :func:`create_model`
    takes; an option the config leaves out is that family's T0 value (``patnet_t0``'s
    depths, for example).

    Keys that only PATNet has (num_heads, use_spatial_attn, ...) are ignored for FasterNet,
    whose configs in the authors' harness carry them too.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of model options, got {type(config).__name__}")
    if "name" in config:
        raise ValueError(f"config names a variant ({config['name']!r}): build it with "
                         f"patnet.create_model({config['name']!r}, **options) instead")
    family = config.get("family", "patnet")
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose 'patnet' or 'fasternet'")
    valid = set(_option_names(family)) | {"family"}
    patnet_only = set(_option_names("patnet")) - valid
    options = {k: v for k, v in config.items() if k not in patnet_only}
    return create_model(f"{family}_t0", backend=backend, **options)


def _check_ops_served(model: nn.Module, backend: str) -> None:
    """Refuse a fused backend named for ``model`` that lacks a kernel one of its layers needs
    (patnet_kernels.registry: e.g. the CUDA backend has none for PAT_sp)."""
    if backend not in registry.FUSED_BACKENDS:
        return
    missing = dict.fromkeys(op for op, *_ in model.recorded_calls()
                            if backend not in registry.OPS[op].backends)
    if missing:
        names = ", ".join(f"{registry.OPS[op].title} ({op})" for op in missing)
        others = [b for b in registry.FUSED_BACKENDS if b != backend
                  and all(b in registry.OPS[op].backends for op in missing)]
        way_out = f"backend={others[0]!r} or 'auto'" if others else "backend='auto'"
        raise BackendUnavailableError(f"backend={backend!r} has no kernel for {names}, which "
                                      f"this model uses; use {way_out}")


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict (or a dict holding one under "state_dict"/"model") with strict=True."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    model.load_state_dict(state, strict=True)


def check_model(model: object, taker: str) -> None:
    """Raise a TypeError unless ``model`` is a PATNet or FasterNet, the argument of ``taker``."""
    if not isinstance(model, _PartialNetwork):
        raise TypeError(f"{taker} takes a PATNet or FasterNet (e.g. "
                        f"patnet.create_model('patnet_t2')), got {type(model).__name__}")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every fused layer of ``model`` (a PATNet or FasterNet, or an inference copy of
    one) to ``backend``; returns the model. Refused (the model unchanged) where a layer would
    call an op the backend has no kernel for; a layer that composes other ops where the
    backend lacks its fused one (the MLP's) is served."""
    check_model(model, "set_backend")
    check_backend_usable(backend)
    layers = [module for module in model.modules() if hasattr(module, "backend")]
    previous = [module.backend for module in layers]
    for module in layers:
        module.backend = backend
    try:  # (the calls the layers make under the new backend)
        _check_ops_served(model, backend)
    except BaseException:
        for module, name in zip(layers, previous):
            module.backend = name
        raise
    return model
