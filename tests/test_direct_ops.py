"""The Triton ops' direct calls (patnet_kernels.ops.DirectOps): a registered op runs its Python
body itself only where PyTorch's dispatcher would add nothing, and gives the same result."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from patnet_kernels import registry
from patnet_kernels.ops import PYTHON_BODIES, DirectOps, calls_body_directly

from conftest import DEVICE, require_fused_backend


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _mlp_args():
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(shape, generator=gen).to(DEVICE)
                 for shape in ((2, 16, 4, 4), (32, 16, 1, 1), (16, 32, 1, 1)))
    return (x, None, None, None, w1, None, w2, None, None, "relu")


def test_when_the_body_runs_itself():
    x = torch.randn(2, 3)
    assert calls_body_directly((x, None, 3, 0.5, "relu", [x, x], torch.float32))
    leaf = x.clone().requires_grad_()
    assert not calls_body_directly((leaf,))  # (autograd would see the op)
    with torch.no_grad():
        assert calls_body_directly((leaf,))
    assert not calls_body_directly((x.as_subclass(type("Sub", (torch.Tensor,), {})),))
    assert not calls_body_directly((object(),))  # (an fx Proxy, a SymInt, ...)
    with _Seen():
        assert not calls_body_directly((x,))
    with torch.profiler.profile():
        assert not calls_body_directly((x,))
    seen = []
    torch.vmap(lambda row: seen.append(calls_body_directly((row,))) or row)(x)
    assert seen == [False]


def test_direct_call_equals_the_registered_op_and_modes_still_see_it():
    require_fused_backend("triton")
    import patnet_kernels.ops.triton.partial_conv  # noqa: F401 (registers its ops)
    import patnet_kernels.ops.triton.pointwise_mlp  # noqa: F401

    ops = DirectOps("patnet_triton")
    # A mutating op is always the registered op (its version-counter bump).
    assert PYTHON_BODIES["patnet_triton::partial_conv3x3_"] is None
    assert ops.partial_conv3x3_ is torch.ops.patnet_triton.partial_conv3x3_
    args = _mlp_args()
    direct = ops.pointwise_mlp(*args)
    assert torch.equal(direct, torch.ops.patnet_triton.pointwise_mlp(*args))
    with _Seen() as seen:
        ops.pointwise_mlp(*args)
    assert "patnet_triton.pointwise_mlp.default" in seen.ops


def test_the_backend_functions_get_direct_ops():
    require_fused_backend("triton")
    registry.load("pointwise_mlp", "triton")
    fn = registry.implementation("pointwise_mlp", "triton")
    ops = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, DirectOps))
    assert ops.pointwise_mlp is not torch.ops.patnet_triton.pointwise_mlp
