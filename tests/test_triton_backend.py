"""The Triton backend's availability and its errors: what a user is told, and when."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels.backends import resolve_backend

from conftest import REPO


# conftest's changes to Triton's interpreter (a GPU compiles the kernels instead)
INTERPRETER_ONLY = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                      reason="tests conftest's changes to Triton's interpreter")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_cuda_tensor_without_usable_triton_is_refused():
    with pytest.raises(pk.BackendUnavailableError, match="TRITON_INTERPRET=1 is set"):
        resolve_backend("triton", torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_cpu_tensor_without_interpreter_says_how_to_test():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, patnet_kernels as pk\n"
            "x = torch.randn(1, 8, 4, 4); w = torch.randn(2, 2, 3, 3)\n"
            "try:\n    pk.partial_conv3x3(x, w, backend='triton')\n"
            "except pk.BackendUnavailableError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    assert "refused:" in out and "TRITON_INTERPRET=1" in out, out


def test_ops_run_on_their_tensors_cuda_device(monkeypatch):
    """A registered op's body runs with its first tensor's CUDA device current: through the
    device guard where another device is current, straight where it is current already (no GPU
    needed: the device queries and the guard are stand-ins)."""
    from types import SimpleNamespace

    from patnet_kernels.triton import _common

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_common, "check_kernel_device", lambda tensor: None)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    body = _common.on_tensor_device(lambda tensor, value: (tensor.device, value))
    on_second = SimpleNamespace(device=torch.device("cuda", 1))
    assert body(on_second, 5) == (torch.device("cuda", 1), 5)
    assert entered == [torch.device("cuda", 1)]
    entered.clear()
    assert body(SimpleNamespace(device=torch.device("cuda", 0)), 6)[1] == 6
    assert body(SimpleNamespace(device=torch.device("cpu")), 7)[1] == 7
    assert entered == []


def test_auto_never_picks_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert pk.info()["backends"]["triton"]["available"] == (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def test_bad_input_is_refused_before_any_kernel_runs():
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(ValueError, match="weight"):
        pk.partial_conv3x3(x, torch.randn(2, 3, 3, 3), backend="triton")
    with pytest.raises((TypeError, ValueError), match="dtype"):
        pk.partial_conv3x3(x, torch.randn(2, 2, 3, 3, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="channels"):
        pk.partial_conv3x3(x, torch.randn(9, 9, 3, 3), backend="triton")


@INTERPRETER_ONLY
def test_interpreter_rounds_float32_to_bfloat16_as_a_gpu_does():
    """conftest makes Triton's interpreter round float32 to bfloat16 to nearest, ties to even,
    as a GPU and torch do (it rounds toward zero): kernel outputs stored in bfloat16 are then
    the GPU's, and the tests' bfloat16 budgets judge the kernels, not that truncation."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_as(x_ptr, y_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(y_ptr.dtype.element_ty))

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    x[:3] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, float("nan")])  # (ties, NaN)
    y = torch.empty(4096, dtype=torch.bfloat16)
    store_as[(1,)](x, y, N=4096)
    assert torch.equal(y[3:], x[3:].to(torch.bfloat16))
    assert y[:2].tolist() == x[:2].to(torch.bfloat16).tolist() == [1.0, 1.015625]
    assert torch.isnan(y[2])


@INTERPRETER_ONLY
def test_interpreter_computes_the_same_without_its_repeated_work(monkeypatch):
    """conftest takes repeated work out of Triton's interpreter (``INTERPRETER_ORIGINALS``:
    the builtins listed once, the dtype table cached, erf over the array, the unread overflow
    check off). With the interpreter's originals put back, the same kernels give the same
    bits: the MLP kernel with GELU (erf, a @triton.jit helper for tl.dot, int32 index math) in
    float32 and bfloat16, and PAT_ch forward and backward."""
    from triton.runtime import interpreter

    from conftest import INTERPRETER_ORIGINALS

    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 24, 5, 7, generator=gen), torch.randn(2, 24, 5, 7, generator=gen)
    w1, w2 = torch.randn(48, 24, 1, 1, generator=gen), torch.randn(24, 48, 1, 1, generator=gen)
    b1 = torch.randn(48, generator=gen)
    conv_weight = torch.randn(6, 6, 3, 3, generator=gen) / 5
    cfc_weight = torch.randn(18, 18, 1, 2, generator=gen) / 5
    bn_b = pk.BatchNormParams(torch.rand(18, generator=gen) + 0.5, torch.randn(18, generator=gen),
                              torch.randn(18, generator=gen), torch.rand(18, generator=gen) + 0.5)

    def run():
        outputs = []
        for dtype in (torch.float32, torch.bfloat16):
            cast = [t.to(dtype) for t in (x, w1, b1, w2, residual)]
            outputs.append(pk.pointwise_mlp(*cast[:3], cast[3], None, residual=cast[4],
                                            activation="gelu", backend="triton"))
        xi = x.clone().requires_grad_()
        y = pk.channel_attention(xi, conv_weight, cfc_weight, None, None, bn_b,
                                 backend="triton")
        y.backward(residual)
        return outputs + [y.detach(), xi.grad]

    assert INTERPRETER_ORIGINALS and not interpreter.interpreter_builder.options.sanitize_overflow
    faster = run()
    for owner, name, original in INTERPRETER_ORIGINALS:
        monkeypatch.setattr(owner, name, original)
    as_triton_has_it = run()
    for index, (ours, theirs) in enumerate(zip(faster, as_triton_has_it)):
        assert torch.equal(ours, theirs), f"output {index}"


def _launch_grids(name: str, batch: int, mode: str) -> list:
    """(kernel, grid as 3 axes) of every Triton launch of one training step (``mode`` "train",
    "train-atomic": with the attention's atomic backward allowed) or one inference forward
    ("eval") of ``name`` at 64 x 64 on the Triton backend, fp32 NCHW ("-amp": bf16 autocast,
    channels_last), the kernels not run (their outputs are garbage; nothing branches on
    them)."""
    from benchmarks import traffic
    from conftest import DEVICE
    from patnet_kernels.ops.rpe_attention import allow_atomic_backward, use_atomics

    train = mode.startswith("train")
    amp = mode.endswith("-amp")
    layout = torch.channels_last if amp else torch.contiguous_format
    model = traffic.build(name, "triton", train=train, device=DEVICE).to(memory_format=layout)
    x = torch.randn(batch, 3, 64, 64, device=DEVICE).contiguous(memory_format=layout)
    names, grids = [], []
    atomics = use_atomics()
    allow_atomic_backward(mode == "train-atomic")
    try:
        with traffic.triton_launches(names, run_kernels=False, grids=grids), \
                torch.autocast(DEVICE.type, torch.bfloat16, enabled=amp):
            if train:
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        allow_atomic_backward(atomics)
    return [(kernel, grid + (1,) * (3 - len(grid))) for kernel, grid in zip(names, grids)]


@pytest.mark.parametrize("mode", ["train", "train-atomic", "train-amp", "eval", "eval-amp"])
@pytest.mark.parametrize("name", ["patnet_t0", "patnet_t1", "fasternet_t0"])
def test_only_grid_axis_0_grows_with_the_batch(name, mode):
    """CUDA launches at most 65535 programs along a grid's axes 1 and 2
    (``_common.MAX_GRID_YZ``; 2^31 - 1 along axis 0), and the interpreter checks no limit: a
    kernel with the batch on axis 1 fails on a GPU alone, past 65535 images, or 16384 where
    PAT_sf's attention put B * heads there. So the batch goes on axis 0 in every launch of a
    training step and of the inference path (fp32 NCHW, and bf16 autocast in channels_last,
    where some kernels take the samples as rows of one): from 2 to 5 images, each launch's
    axes 1 and 2 stay as they are."""
    from conftest import require_fused_backend
    from patnet_kernels.triton._common import MAX_GRID_YZ

    require_fused_backend("triton")
    small, large = (_launch_grids(name, batch, mode) for batch in (2, 5))
    assert [k for k, _ in small] == [k for k, _ in large] and small
    grown = [(k, a, b) for (k, a), (_, b) in zip(small, large) if a[1:] != b[1:]]
    assert not grown, f"launches whose grid axis 1 or 2 grows with the batch: {grown}"
    assert all(max(g[1:]) <= MAX_GRID_YZ for _, g in large)
    assert any(b[0] > a[0] for (_, a), (_, b) in zip(small, large))


def test_dropout_mask_grid_keeps_the_batch_on_axis_0():
    """The attention's dropout mask kernel (``dropout_keep_mask``, the tests' view of the
    kernels' mask) with B * heads on axis 0, the mask the same per head at any batch."""
    from benchmarks import traffic
    from conftest import DEVICE, require_fused_backend

    require_fused_backend("triton")
    from patnet_kernels.triton.rpe_attention import SEED_LOW, dropout_keep_mask

    grids = {}
    for batch in (1, 3):
        names, grids[batch] = [], []
        with traffic.triton_launches(names, grids=grids[batch]):
            mask = dropout_keep_mask(SEED_LOW + 7, batch, 2, 9, 0.5, device=DEVICE)
        if batch == 1:
            first = mask
    assert grids[1][0][1:] == grids[3][0][1:] and grids[3][0][0] == 3 * grids[1][0][0]
    assert torch.equal(mask[:1], first) and not torch.equal(mask[1], mask[0])
