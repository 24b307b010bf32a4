"""A model's forward captured once as a CUDA graph and replayed: one launch of the whole graph
per call instead of one per kernel, for a fixed input (shape, dtype, strides, device) and a
fixed autocast state. What ``patnet.optimize_for_inference(model, example_input=x)`` returns;
it pays where launches, not memory traffic, bound a forward (small batches).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from patnet_kernels._types import outside_inference_mode

from .wrappers import ModelWrapper


def _autocast_state() -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def check_example_input(example_input: Any) -> None:
    """Refuse an example input no CUDA graph can be captured for, saying what to do."""
    if not isinstance(example_input, torch.Tensor) or example_input.device.type != "cuda":
        where = (example_input.device if isinstance(example_input, torch.Tensor)
                 else type(example_input).__name__)
        raise ValueError(f"example_input must be a CUDA tensor (a CUDA graph captures CUDA "
                         f"work), got {where}; leave it out to run without a graph")


class GraphedModel(ModelWrapper):
    """``model`` (an inference model) replayed as one CUDA graph for inputs like
    ``example_input``; other attributes (``backend_plan``, ...) are the model's.

    The graph is captured under the autocast state of the construction (build it inside the
    ``torch.autocast`` you will call it in). Each call copies its input into the captured
    input, replays the graph and returns a copy of the captured output; an input of another
    shape, dtype, layout or device, or another autocast state, raises ValueError. The graph
    reads the weights as captured (under autocast, their casts made then): after changing the
    model's weights, build it again. ``warmup``: forwards run before the capture, off it
    (Triton compiles, cuDNN picks its algorithms, the backends decide).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, warmup: int = 3):
        super().__init__()
        check_example_input(example_input)
        weights = next(model.parameters(), None)
        if weights is None:
            raise ValueError("the model has no parameters: nothing to capture as a CUDA graph "
                             "(pass a PATNet or FasterNet, e.g. its optimize_for_inference copy)")
        if weights.device != example_input.device:
            raise ValueError(f"example_input is on {example_input.device} but the model on "
                             f"{weights.device}; move them to one device")
        self.model = model
        self._autocast = _autocast_state()
        # (the captured input and output are ordinary tensors, also when built under
        # torch.inference_mode: each call copies into the input, in whatever mode it runs)
        with outside_inference_mode(), torch.no_grad():
            self._input = example_input.detach().clone()  # (same strides: channels_last kept)
            # Warm up off the capture (Triton compiles, cuDNN picks its algorithms, the
            # backends decide and cache), on a side stream as CUDA graph capture requires.
            stream = torch.cuda.Stream(device=example_input.device)
            stream.wait_stream(torch.cuda.current_stream(example_input.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    model(self._input)
            torch.cuda.current_stream(example_input.device).wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._output = model(self._input)

    def forward(self, x: torch.Tensor) -> Any:
        expected = self._input
        if not isinstance(x, torch.Tensor) or (x.shape, x.dtype, x.device, x.stride()) != (
                expected.shape, expected.dtype, expected.device, expected.stride()):
            got = (f"{tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}"
                   if isinstance(x, torch.Tensor) else type(x).__name__)
            raise ValueError(f"this CUDA graph was captured for {tuple(expected.shape)} "
                             f"{expected.dtype} strides {expected.stride()} on "
                             f"{expected.device}, got {got}; optimize_for_inference again "
                             "with an example of this input")
        if _autocast_state() != self._autocast:
            raise ValueError(f"this CUDA graph was captured with CUDA autocast (enabled, dtype) "
                             f"= {self._autocast}, called with {_autocast_state()}; build it "
                             "inside the torch.autocast you call it in")
        with torch.no_grad():
            self._input.copy_(x)
        self._graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self._output)
