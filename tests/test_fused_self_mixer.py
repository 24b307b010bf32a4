"""The PAT_sf output op (self_mixer_output) of each fused backend (Triton, CUDA) against the
reference."""
from __future__ import annotations

import pytest
import torch

import patnet_kernels as pk

from conftest import DEVICE, assert_same_arithmetic, assert_within_budget, fused_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(b, c, c1, h, w, dtype, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c2 = c - c1
    t = [torch.randn(b, c, h, w, generator=gen, dtype=torch.float64),
         torch.randn(c1, c1, 3, 3, generator=gen, dtype=torch.float64) / (3 * c1 ** 0.5),
         torch.randn(b, h * w, c2, generator=gen, dtype=torch.float64),
         torch.randn(c2, c2, generator=gen, dtype=torch.float64) / c2 ** 0.5,
         torch.randn(c2, generator=gen, dtype=torch.float64),
         torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)]
    t = [v.to(DEVICE, dtype) for v in t]
    if channels_last:
        t[0], t[5] = (v.to(memory_format=torch.channels_last) for v in (t[0], t[5]))
    return t


def _run(inputs, backend, dropout_p=0.0, bias=True, seed=1, residual=False):
    x, conv_w, tokens, proj_w, proj_b, grad = inputs
    leaves = [v.detach().clone().requires_grad_() for v in (x, conv_w, tokens, proj_w, proj_b)]
    torch.manual_seed(seed)
    y = pk.self_mixer_output(leaves[0], leaves[1], leaves[2], leaves[3],
                             leaves[4] if bias else None, dropout_p=dropout_p, backend=backend,
                             residual=residual)
    y.backward(grad)
    return [y.detach()] + [v.grad for v in leaves[:4 + bias]]


NAMES = ("y", "grad_x", "grad_conv_weight", "grad_tokens", "grad_proj_weight", "grad_proj_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, channels_last, bias, residual", [
    ((2, 20, 5, 7, 7), False, True, False), ((1, 12, 3, 1, 1), True, True, True),
    ((3, 36, 9, 5, 9), True, False, False), ((1, 24, 6, 2, 13), False, True, True),
    ((2, 100, 20, 9, 9), True, True, True)],  # (several pixel tiles and channel blocks)
    ids=["2x20x7x7", "1x12x1x1-nhwc-residual", "3x36x5x9-nhwc-nobias", "1x24x2x13-residual",
         "2x100x9x9-nhwc-residual"])
def test_matches_float64_reference(shape, channels_last, bias, residual, dtype, fused_backend):
    """Output and every gradient; with ``residual`` (x + the output, the inference path's
    first residual sum) the tokens are also given in a transposed layout (any strides)."""
    inputs = _inputs(*shape, dtype, channels_last)
    if residual:
        inputs[2] = inputs[2].transpose(1, 2).contiguous().transpose(1, 2)
    ours = _run(inputs, fused_backend, bias=bias, residual=residual)
    exact = _run([v.double() for v in inputs], "torch", bias=bias, residual=residual)
    in_dtype = _run(inputs, "torch", bias=bias, residual=residual)
    for name, o, e, r in zip(NAMES, ours, exact, in_dtype):
        assert o.dtype == dtype, name
        assert_within_budget(name, o, e, r, dtype)
    assert ours[0].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiles_spanning_samples_agree(dtype):
    """Triton's kernel in channels_last takes the samples as rows of one (3 samples of 5 x 9 =
    45 tokens: no sample's last tile of 64 partly empty), each conv window in its own sample: the same output as tiles of
    one sample each (NCHW), row for row, with the residual and the dropout multiplier; tokens
    not one sample after another keep tiles of one sample."""
    from patnet_kernels.triton import partial_conv as kernels

    x, conv_w, tokens, proj_w, proj_b, _ = _inputs(3, 36, 9, 5, 9, dtype, False)
    keep = (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) * 2).to(
        DEVICE, dtype)
    taps = kernels.forward_taps(conv_w)

    def run(x):
        return kernels.self_mixer_output(x, taps, tokens, proj_w, proj_b, keep,
                                         torch.empty_like(x), residual=True)

    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert kernels.self_mixer_rows(nhwc, tokens, nhwc) == (1, 135)
    assert kernels.self_mixer_rows(x, tokens, x) == (3, 45)
    assert kernels.self_mixer_rows(nhwc, tokens.transpose(1, 2).contiguous().transpose(1, 2),
                                   nhwc) == (3, 45)
    assert_same_arithmetic(run(nhwc), run(x))


def test_dropout_mask_is_the_functional_apis(fused_backend):
    """Every backend draws the same mask from the same generator state, as F.dropout would."""
    inputs = _inputs(2, 16, 4, 5, 5, torch.float32, False)
    ours = _run(inputs, fused_backend, dropout_p=0.3, seed=7)
    ref = _run(inputs, "torch", dropout_p=0.3, seed=7)
    for name, o, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(o == 0, r == 0), name
    y2 = ours[0][:, 4:]
    dropped = (y2 == 0).double().mean().item()
    assert 0.2 < dropped < 0.4


def test_opcheck_and_compile(fused_backend):
    x, conv_w, tokens, proj_w, proj_b, grad = _inputs(2, 12, 3, 4, 5, torch.float32, True)
    keep = torch.ones_like(tokens) * 2
    ops = fused_ops(fused_backend)
    torch.library.opcheck(ops.self_mixer_output.default,
                          (x, conv_w, tokens, proj_w, proj_b, keep, False))
    torch.library.opcheck(ops.self_mixer_output.default,
                          (x, conv_w, tokens, proj_w, None, None, True))
    torch.library.opcheck(ops.self_mixer_output_backward.default,
                          (grad, x, conv_w, tokens, proj_w, keep))

    def fn(x, conv_w, tokens, proj_w, proj_b):
        return pk.self_mixer_output(x, conv_w, tokens, proj_w, proj_b,
                                    backend=fused_backend) * 2

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [v.clone().requires_grad_() for v in (x, conv_w, tokens, proj_w, proj_b)]
        f(*leaves).backward(grad)
        results.append([f(*leaves).detach()] + [v.grad for v in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


def test_bad_input(fused_backend):
    x, conv_w, tokens, proj_w, proj_b, _ = _inputs(2, 12, 3, 4, 5, torch.float32, False)
    with pytest.raises(ValueError, match="tokens"):
        pk.self_mixer_output(x, conv_w, tokens[:, :-1], proj_w, proj_b, backend=fused_backend)
    with pytest.raises(ValueError, match="proj_weight"):
        pk.self_mixer_output(x, conv_w, tokens, proj_w[:, :-1], proj_b, backend=fused_backend)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        pk.self_mixer_output(x, conv_w, tokens.double(), proj_w, proj_b, backend=fused_backend)
    with pytest.raises(TypeError, match=f"backend='{fused_backend}' runs float32, float16 and "
                                        "bfloat16, got torch.float64"):
        pk.self_mixer_output(*(v.double() for v in (x, conv_w, tokens, proj_w, proj_b)),
                             backend=fused_backend)
    with pytest.raises(ValueError, match="dropout_p"):
        pk.self_mixer_output(x, conv_w, tokens, proj_w, proj_b, dropout_p=1.0,
                             backend=fused_backend)
