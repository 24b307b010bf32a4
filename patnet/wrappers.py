"""What ``patnet.optimize_for_inference`` may wrap its copy in: a model compiled by
torch.compile under Inductor's freezing (``compile=True``); the CUDA graph of
:mod:`patnet.cuda_graph` (``example_input=``) shares :class:`ModelWrapper` with it."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class ModelWrapper(nn.Module):
    """A module that runs ``self.model`` its own way; every other attribute (``backend_plan``,
    ``optimized_for_inference``, ...) is the model's."""

    model: nn.Module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


class FrozenCompiledModel(ModelWrapper):
    """``model`` (an inference copy) compiled by ``torch.compile`` (Inductor) under its
    ``freezing``: the weights folded into the compiled code as constants, and on the CPU every
    convolution on oneDNN with its weight laid out once, the elementwise work between them
    fused, no Python between the ops; with ``cpp_wrapper`` (None, the default: for CPU inputs)
    Inductor's C++ wrapper, the compiled graph's calls issued from C++ rather than from
    generated Python (``python -m benchmarks.compiled_cpu`` measures what it gains).

    Freezing is an Inductor setting read on every call, so each call runs with it (and the
    wrapper's) set, only for that call (other compiled code keeps the process's settings), and
    under ``torch.no_grad()`` unless grad mode is on and x requires a gradient (Inductor
    freezes only graphs that take none; such a call runs compiled, unfrozen). Each input shape is
    compiled for on its first call (seconds to a minute), as a static shape: Inductor's
    dynamic-shape code for oneDNN's convolutions fails its own stride checks (torch 2.13);
    past dynamo's recompile limit (8 by default) a new shape runs uncompiled. The compiled
    code reads the weights as they were then: after changing the model's weights, build it
    again.
    """

    def __init__(self, model: nn.Module, cpp_wrapper: Optional[bool] = None):
        super().__init__()
        if cpp_wrapper is not None and not isinstance(cpp_wrapper, bool):
            raise TypeError(f"cpp_wrapper must be None, True or False, got {cpp_wrapper!r}")
        self.model = model
        self.cpp_wrapper = cpp_wrapper
        # The compiled model per value of cpp_wrapper. (Not a submodule: the state_dict holds
        # the model's tensors once, under "model.")
        object.__setattr__(self, "_compiled", {})

    def _compiled_for(self, cpp_wrapper: bool):
        """The model compiled with these settings. They are also the compile's options, so
        that dynamo does not hand this wrapper code compiled for the same model by another
        ``torch.compile`` call with other settings (it shares its cache between calls whose
        backends compare equal)."""
        compiled = self._compiled.get(cpp_wrapper)
        if compiled is None:
            compiled = torch.compile(self.model, dynamic=False,
                                     options={"freezing": True, "cpp_wrapper": cpp_wrapper})
            self._compiled[cpp_wrapper] = compiled
        return compiled

    def forward(self, x: torch.Tensor) -> Any:
        import torch._inductor.config as inductor_config

        tensor = isinstance(x, torch.Tensor)
        grad = torch.is_grad_enabled() and tensor and x.requires_grad
        cpp_wrapper = self.cpp_wrapper
        if cpp_wrapper is None:
            cpp_wrapper = tensor and x.device.type == "cpu"
        with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), \
                torch.set_grad_enabled(grad):
            return self._compiled_for(cpp_wrapper)(x)
