"""The fused PConv (partial_conv3x3) of each fused backend (Triton, CUDA) against the float64
reference, in and out of place.

On the CPU, Triton runs under its interpreter (TRITON_INTERPRET=1) and the CUDA kernels through
their CPU emulation (PATNET_CUDA_EMULATE=1), both set by conftest; on a GPU they run compiled.
Shapes are small but odd: H, W in {1, 2, 7, 13}, C1 not a multiple of 16, batch 1.
"""
from __future__ import annotations

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import reference as ref

from conftest import DEVICE, assert_within_budget, fused_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, C, C1, H, W)
SHAPES = [(2, 20, 5, 7, 13), (1, 8, 2, 1, 1), (3, 72, 18, 13, 7), (1, 64, 16, 2, 2),
          (2, 40, 10, 13, 13)]


def _inputs(shape, dtype, channels_last, seed=0):
    b, c, c1, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c1, c1, 3, 3, generator=gen, dtype=torch.float64) / (3 * c1 ** 0.5)
    grad = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    x, weight, grad = (t.to(DEVICE, dtype) for t in (x, weight, grad))
    if channels_last:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    return x, weight, grad


def _run(x, weight, grad, backend, inplace):
    """Output, dX, dW of partial_conv3x3; x is copied first (the op may write into it)."""
    xin = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    y = pk.partial_conv3x3(xin * 1, w, inplace=inplace, backend=backend)  # *1: a non-leaf
    y.backward(grad)
    return y.detach(), xin.grad, w.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, channels_last, inplace, fused_backend):
    x, weight, grad = _inputs(shape, dtype, channels_last)
    ours = _run(x, weight, grad, fused_backend, inplace)
    exact = _run(x.double(), weight.double(), grad.double(), "torch", False)
    in_dtype = _run(x, weight, grad, "torch", False)
    for name, o, e, r in zip(("y", "grad_x", "grad_weight"), ours, exact, in_dtype):
        assert o.dtype == dtype
        assert_within_budget(name, o, e, r, dtype)
    # The passthrough channels are copied, not computed: bit-identical.
    c1 = weight.shape[0]
    assert torch.equal(ours[0][:, c1:], x[:, c1:])
    assert torch.equal(ours[1][:, c1:], grad[:, c1:])
    if not inplace:
        assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last
                                     else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_inplace_rewrites_only_x1(channels_last, fused_backend):
    x, weight, _ = _inputs((2, 40, 10, 13, 7), torch.float32, channels_last, seed=1)
    before = x.clone()
    storage = x.untyped_storage().data_ptr()
    out_of_place = pk.partial_conv3x3(x, weight, backend=fused_backend)
    result = pk.partial_conv3x3(x, weight, inplace=True, backend=fused_backend)
    assert result is x and x.untyped_storage().data_ptr() == storage
    assert torch.equal(x[:, 10:], before[:, 10:])  # passthrough untouched, bit for bit
    assert torch.equal(x, out_of_place)  # same kernel, same sums: identical
    assert not torch.equal(x[:, :10], before[:, :10])


def test_inplace_across_tile_borders(fused_backend):
    """A map much larger than one program's pixel tile: halos cross program borders."""
    x, weight, _ = _inputs((1, 8, 2, 40, 37), torch.float32, False, seed=2)
    expected = ref.partial_conv3x3(x.double(), weight.double())
    pk.partial_conv3x3(x, weight, inplace=True, backend=fused_backend)
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)


def test_inplace_keeps_autograd_honest(fused_backend):
    """The weight gradient uses the original X1, and a tensor another op saved is protected."""
    x, weight, grad = _inputs((2, 12, 3, 7, 7), torch.float32, False, seed=3)
    w = weight.clone().requires_grad_()
    leaf = x.clone().requires_grad_()
    shortcut = leaf * 1
    y = pk.partial_conv3x3(shortcut, w, inplace=True, backend=fused_backend)
    assert y is shortcut
    y.backward(grad)
    w_ref = weight.clone().requires_grad_()
    ref.partial_conv3x3(x, w_ref).backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    # sigmoid saves its output; rewriting that output in place must fail in backward.
    saved = torch.sigmoid(x.clone().requires_grad_())
    pk.partial_conv3x3(saved, weight, inplace=True, backend=fused_backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("op, args", [
    ("partial_conv3x3", lambda x, w: (x, w)),
    ("partial_conv3x3_", lambda x, w: (x.clone(), w)),
    ("partial_conv3x3_input_grad", lambda x, w: (x, w)),
    ("conv3x3_weight_grad", lambda x, w: (x[:, :w.shape[0]], x, w)),
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(op, args, channels_last, fused_backend):
    x, weight, _ = _inputs((2, 12, 3, 5, 6), torch.float32, channels_last, seed=4)
    torch.library.opcheck(getattr(fused_ops(fused_backend), op).default, args(x, weight))


@pytest.mark.parametrize("weight_layout", [torch.contiguous_format, torch.channels_last],
                         ids=["weight_nchw", "weight_nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_in_the_weights_layout(weight_layout, dtype, fused_backend):
    """conv3x3_weight_grad returns dW shaped, typed and strided as the weight (in a
    channels_last model the weights are channels_last: autograd then accumulates it into
    weight.grad without a copy), whatever the activations' layout; its values those of the
    contiguous weight's."""
    x, weight, _ = _inputs((2, 12, 3, 5, 6), dtype, True, seed=6)
    x1, grad_y = x[:, :3], torch.randn_like(x)
    op = fused_ops(fused_backend).conv3x3_weight_grad
    expected = op(x1, grad_y, weight)
    laid_out = weight.contiguous(memory_format=weight_layout)
    grad = op(x1, grad_y, laid_out)
    assert grad.dtype == dtype and grad.stride() == laid_out.stride()
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_compile_fullgraph_matches_eager(fused_backend):
    x, weight, grad = _inputs((2, 16, 4, 7, 9), torch.float32, False, seed=5)

    def step(x, w):
        return pk.partial_conv3x3(x, w, backend=fused_backend).relu() + x

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, wi.grad))
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    # In place without autograd compiles too (the mutation is functionalized).
    inplace = torch.compile(lambda x, w: pk.partial_conv3x3(x, w, inplace=True,
                                                            backend=fused_backend),
                            fullgraph=True)
    xc = x.clone()
    inplace(xc, weight)
    torch.testing.assert_close(xc, pk.partial_conv3x3(x, weight, backend=fused_backend))
