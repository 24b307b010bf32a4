"""PATNet and FasterNet models built on the fused ops of :mod:`patnet_kernels`.

    model = patnet.create_model("patnet_t2", backend="auto")
    fused = patnet.fuse_for_inference(model)
    fastest = patnet.optimize_for_inference(model)   # folded, fused kernels and MLPs
"""
from .flops import count_flops, count_params
from .fuse import fuse_for_inference
from .inference import optimize_for_inference
from .model import (VARIANTS, FasterNet, PATNet, create_model, list_models, load_checkpoint,
                    model_from_config, set_backend)

__all__ = [
    "VARIANTS", "FasterNet", "PATNet", "count_flops", "count_params", "create_model",
    "fuse_for_inference", "list_models", "load_checkpoint", "model_from_config",
    "optimize_for_inference", "set_backend",
]
