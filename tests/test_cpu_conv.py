"""The CPU eval forms' convolution (``patnet_kernels.cpu_conv.conv2d``): oneDNN where it can run
(the suite's fixed path; with the timing on, oneDNN or F.conv2d, whichever was faster), its
weight reordered once per frozen parameter and input shape (a few shapes kept) and re-made
when the parameter changes;
F.conv2d otherwise (float64, oneDNN disabled or missing, a torch.compile trace), each equal to
F.conv2d; and the inference copy on the CPU running through it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import patnet
import patnet_kernels as pk
from patnet_kernels import cpu_choice, cpu_conv

from conftest import frozen, rel_error, slowed

ONEDNN = "mkldnn::_convolution_pointwise"
# The (padding, stride) of a 3 x 3 conv's and a 1 x 1 conv's reordered weights' tags.
THREE_BY_THREE, ONE_BY_ONE = ((1, 1), (1, 1)), ((0, 0), (1, 1))


def _kept(weight, conv, x):
    """The reordered form of a frozen ``weight`` kept for inputs of x's shape, or None."""
    return cpu_conv._REORDERED.kept(weight, (*conv, x.shape))


needs_onednn = pytest.mark.skipif(cpu_conv.onednn_refusal() is not None,
                                  reason=f"oneDNN cannot run here: {cpu_conv.onednn_refusal()}")


def _ops_run(fn) -> set:
    """The names of the ops ``fn()`` runs (torch.profiler)."""
    return {name for name, _ in _ops_and_shapes(fn)}


def _ops_and_shapes(fn) -> list:
    """(name, input shapes) of each op ``fn()`` runs (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(event.name, event.input_shapes) for event in prof.events()]



@needs_onednn
@pytest.mark.parametrize("k, stride, padding, activation", [
    (1, 1, 0, None), (1, 1, 0, "relu"), (1, 1, 0, "gelu"), (3, 1, 1, None), (4, 4, 0, None),
    (2, 2, 0, None)])
def test_onednn_convolution_equals_conv2d(k, stride, padding, activation):
    """float32 on oneDNN, NCHW, channels_last and a channel slice of a map, a frozen weight
    (reordered once) and a plain one: F.conv2d's values and activation, float32 rounding."""
    gen = torch.Generator().manual_seed(k + stride)
    x = torch.randn(2, 24, 16, 12, generator=gen)
    weight = torch.randn(16, 8, k, k, generator=gen) * 0.2
    bias = torch.randn(16, generator=gen)
    for source in (x, x.to(memory_format=torch.channels_last)):
        inp = source[:, 8:16]  # (a slice: copied to a dense map for oneDNN)
        want = F.conv2d(inp.double(), weight.double(), bias.double(), stride, padding)
        want = {None: want, "relu": F.relu(want), "gelu": F.gelu(want)}[activation]
        for w in (weight, frozen(weight.clone())):
            ran = _ops_run(lambda: cpu_conv.conv2d(inp, w, bias, stride, padding, activation))
            assert ONEDNN in ran
            got = cpu_conv.conv2d(inp, w, bias, stride, padding, activation)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert rel_error(got, want) < 1e-6


def test_linear_weight_is_a_one_by_one_convolution():
    """A (C_OUT, C_IN) weight is a 1 x 1 convolution on either path; a single output channel
    (PAT_sp's gate) runs F.conv2d."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 5, generator=gen)
    weight, bias = torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen)
    want = F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    for w in (weight, frozen(weight.clone())):
        assert rel_error(cpu_conv.conv2d(x, w, bias), want) < 1e-6
        assert rel_error(cpu_conv.conv2d(x.double(), w.double(), bias.double()), want) < 1e-6
    gate = frozen(torch.randn(1, 6, 1, 1, generator=gen))  # (one output channel: F.conv2d)
    assert ONEDNN not in _ops_run(lambda: cpu_conv.conv2d(x, gate))
    assert rel_error(cpu_conv.conv2d(x, gate), F.conv2d(x, gate)) < 1e-6


@needs_onednn
@pytest.mark.parametrize("slower", ["oneDNN", "F.conv2d"])
def test_measured_choice_keeps_the_faster_convolution(monkeypatch, slower):
    """With the timing on, a kind of conv's first call times F.conv2d against oneDNN and keeps
    the faster (here the other one made slower): later calls of that kind run it alone, a call
    of another kind is timed again; either equals F.conv2d's values, in the input's
    channels_last layout."""
    monkeypatch.setattr(cpu_choice, "CONVOLUTIONS", cpu_choice.MeasuredChoice(
        "convolutions", cpu_choice.CONVOLUTIONS.labels))
    name = {"oneDNN": "_conv2d_onednn", "F.conv2d": "_conv2d_torch"}[slower]
    real = getattr(cpu_conv, name)
    monkeypatch.setattr(cpu_conv, name, slowed(real))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = frozen(torch.randn(16, 16, 3, 3, generator=gen) * 0.1)
    kept = "F.conv2d" if slower == "oneDNN" else "oneDNN"
    with cpu_choice.measuring_as(True):
        got = cpu_conv.conv2d(x, weight, None, 1, 1, "relu")
        assert cpu_choice.CONVOLUTIONS.summary() == {"F.conv2d": int(kept == "F.conv2d"),
                                                      "oneDNN": int(kept == "oneDNN")}
        ran = _ops_run(lambda: cpu_conv.conv2d(x, weight, None, 1, 1, "relu"))
        assert (ONEDNN in ran) == (kept == "oneDNN")
        assert ("aten::convolution" in ran) == (kept == "F.conv2d")
        cpu_conv.conv2d(x[:, :, 1:], weight, None, 1, 1, "relu")  # (another kind: timed)
        assert sum(cpu_choice.CONVOLUTIONS.summary().values()) == 2
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(got, F.relu(F.conv2d(x.double(), weight.double(), None, 1, 1))) < 1e-6


@needs_onednn
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_residual_sum_is_onednn_post_op(layout):
    """conv2d(..., add=r) on oneDNN: a channels_last r added in the conv's own pass (no
    separate add), any other layout after it; either equals F.conv2d's output plus r, for a
    frozen weight and a plain one, and the timed choice runs F.conv2d and an add. With an
    activation it refuses the sum (oneDNN would add before the activation)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    r = torch.randn(1, 16, 6, 7, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(16, 24, 1, 1, generator=gen) * 0.2
    bias = torch.randn(16, generator=gen)
    want = F.conv2d(x.double(), weight.double(), bias.double()) + r.double()
    for w in (frozen(weight.clone()), weight):
        ran = _ops_run(lambda: cpu_conv.conv2d(x, w, bias, add=r))
        assert ONEDNN in ran and ("aten::add_" in ran) == (layout != torch.channels_last)
        assert rel_error(cpu_conv.conv2d(x, w, bias, add=r), want) < 1e-6
    args = (x, weight, bias, (1, 1), (0, 0), None, r)
    assert rel_error(cpu_conv._conv2d_torch(*args), want) < 1e-6
    with pytest.raises(ValueError, match="without an activation"):
        cpu_conv.conv2d(x, weight, bias, activation="relu", add=r)


@needs_onednn
def test_frozen_weight_is_reordered_once_and_again_when_it_changes():
    """A frozen parameter's oneDNN layout is kept while the parameter (version counter,
    storage) stays the same: one reorder for many calls; an in-place update of the weight
    (load_state_dict) makes a new one, so the output always follows the weight. A weight that
    requires a gradient, or a plain tensor, is not kept."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(1, 8, 6, 6)
    first = cpu_conv.conv2d(x, conv.weight, padding=1)
    kept = _kept(conv.weight, THREE_BY_THREE, x)
    assert kept is not None
    assert torch.equal(cpu_conv.conv2d(x, conv.weight, padding=1), first)
    assert _kept(conv.weight, THREE_BY_THREE, x) is kept
    new_weight = torch.randn(8, 8, 3, 3)
    conv.load_state_dict({"weight": new_weight})  # (in place: same parameter)
    after = cpu_conv.conv2d(x, conv.weight, padding=1)
    assert _kept(conv.weight, THREE_BY_THREE, x) is not kept
    assert rel_error(after, F.conv2d(x, new_weight, padding=1)) < 1e-6
    trained = torch.nn.Parameter(torch.randn(4, 8, 1, 1))
    with torch.no_grad():
        cpu_conv.conv2d(x, trained)
        cpu_conv.conv2d(x, trained.detach())
    assert cpu_conv._REORDERED.kept(trained, (*ONE_BY_ONE, x.shape)) is None


@needs_onednn
def test_frozen_weight_keeps_a_layout_per_input_shape():
    """oneDNN lays a weight out for the input shape it is reordered for (one laid out for
    another shape can run 2-50x slower): an input of another shape (batch, size) gets its
    own, kept beside the first, each used again by its shape; a shape past SHAPES_KEPT drops
    the one kept first. Every output equals F.conv2d's."""
    weight = frozen(torch.randn(16, 16, 3, 3))
    inputs = [torch.randn(batch, 16, 8, 8).contiguous(memory_format=torch.channels_last)
              for batch in range(1, cpu_conv.SHAPES_KEPT + 2)]

    def run(x):
        assert rel_error(cpu_conv.conv2d(x, weight, padding=1),
                         F.conv2d(x, weight, padding=1)) < 1e-6
        return _kept(weight, THREE_BY_THREE, x)

    kept = [run(x) for x in inputs[:-1]]
    assert all(k is not None for k in kept) and len({id(k) for k in kept}) == len(kept)
    assert all(run(x) is k for x, k in zip(inputs[:-1], kept))  # (each shape's own, kept)
    assert run(inputs[-1]) is not None
    assert _kept(weight, THREE_BY_THREE, inputs[0]) is None  # (the first made: dropped)
    assert all(_kept(weight, THREE_BY_THREE, x) is not None for x in inputs[1:])


@needs_onednn
def test_reordered_weight_made_under_inference_mode_serves_later_calls():
    """A first call under torch.inference_mode keeps an ordinary tensor (not an inference
    one), which later calls outside it, and a conversion of the weight, can use."""
    weight = frozen(torch.randn(6, 6, 1, 1))
    x = torch.randn(2, 6, 4, 4)
    with torch.inference_mode():
        cpu_conv.conv2d(x, weight)
    assert not _kept(weight, ONE_BY_ONE, x).is_inference()
    assert rel_error(cpu_conv.conv2d(x, weight), F.conv2d(x, weight)) < 1e-6


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # (mkldnn.flags's)
def test_conv2d_falls_back_where_onednn_cannot_run(monkeypatch):
    """float64, oneDNN disabled by torch.backends.mkldnn, a torch without it (the probe's
    reason, which pk.info() shows): F.conv2d, the same values, and no oneDNN op run."""
    x, weight = torch.randn(1, 4, 5, 5), frozen(torch.randn(4, 4, 3, 3))
    want = F.conv2d(x, weight, padding=1)
    ran = _ops_run(lambda: cpu_conv.conv2d(x.double(), weight.double(), padding=1))
    assert ONEDNN not in ran
    with torch.backends.mkldnn.flags(enabled=False):
        assert "oneDNN disabled" in cpu_conv.library()
        assert ONEDNN not in _ops_run(lambda: cpu_conv.conv2d(x, weight, padding=1))
        assert rel_error(cpu_conv.conv2d(x, weight, padding=1), want) < 1e-6
    monkeypatch.setattr(cpu_conv, "_REFUSAL", ["this torch is built without oneDNN"])
    assert ONEDNN not in _ops_run(lambda: cpu_conv.conv2d(x, weight, padding=1))
    assert rel_error(cpu_conv.conv2d(x, weight, padding=1, activation="gelu"),
                     F.gelu(want)) < 1e-6
    assert pk.info()["cpu_convolutions"] == \
        "torch.nn.functional.conv2d (this torch is built without oneDNN)"


@needs_onednn
def test_probe_refuses_onednn_where_a_post_op_fails_or_is_wrong(monkeypatch):
    """The first-use probe runs each post-op the eval forms use against F.conv2d: a post-op
    that computes another function, or one oneDNN does not know, keeps oneDNN off, saying
    why (what a platform whose oneDNN lacks one would show)."""
    assert cpu_conv._probe() is None
    monkeypatch.setitem(cpu_conv._POST_OPS, "gelu", ("relu", ""))
    assert cpu_conv._probe() == "oneDNN's convolution with post-op 'relu' is wrong on a probe"
    monkeypatch.setitem(cpu_conv._POST_OPS, "gelu", ("no_such_post_op", ""))
    assert cpu_conv._probe().startswith("oneDNN's convolution failed on a probe: ")


@needs_onednn
def test_info_names_the_cpu_convolutions():
    assert pk.info()["cpu_convolutions"].startswith("oneDNN")


@needs_onednn
@pytest.mark.parametrize("name", ["patnet_t1", "fasternet_t0"])
def test_inference_copy_runs_its_convolutions_on_onednn_channels_last(name):
    """On the CPU the inference copy's convolutions run on oneDNN, none through F.conv2d's
    slow path but the head's (a 1 x 1 map, where oneDNN is no faster) and PAT_sp's gate (one
    output channel, where it is slower), and its maps are channels_last from the stem on
    (features mode), equal to the eval model's."""
    torch.manual_seed(0)
    model = patnet.create_model(name, embed_dim=16, depths=(1, 1, 2, 1)).eval()
    features = patnet.create_model(name, embed_dim=16, depths=(1, 1, 2, 1),
                                   features_only=True).eval()
    features.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    fast = patnet.optimize_for_inference(model)
    with torch.no_grad():
        ran = _ops_and_shapes(lambda: fast(x))
        maps = patnet.optimize_for_inference(features)(x)
        want = features(x)
    assert ONEDNN in {name for name, _ in ran}
    slow = [shapes[:2] for name, shapes in ran if name == "aten::_slow_conv2d_forward"]
    assert [x[2:] for x, _ in slow].count([1, 1]) == 1  # (the head's)
    assert all(x[2:] == [1, 1] or weight[0] == 1 for x, weight in slow)
    for got, expected in zip(maps, want, strict=True):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert rel_error(got, expected) < 1e-5


def test_inference_copy_compiles_and_exports_on_the_cpu():
    """torch.compile(fullgraph=True) and torch.export of the CPU inference copy: the trace
    sees F.conv2d (oneDNN's reordered weights are kept outside it), one graph, equal to the
    eager copy."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = patnet.create_model("patnet_t0", embed_dim=16, depths=(1, 1, 1, 1)).eval()
    fast = patnet.optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        want = fast(x)
        assert rel_error(torch.compile(fast, backend=counter, fullgraph=True)(x), want) < 1e-5
        assert counter.frame_count == 1
        assert rel_error(torch.export.export(fast, (x,)).module()(x), want) < 1e-5


@needs_onednn
def test_speed_script_times_every_convolution_of_a_copy(tmp_path):
    """benchmarks/cpu_conv_speed.py: each distinct convolution of FasterNet-T0's copy timed
    three ways, their calls adding up to the forward's, the sums per forward, and a JSON."""
    from benchmarks import cpu_conv_speed

    out = tmp_path / "conv.json"
    assert cpu_conv_speed.main(["--models", "fasternet_t0", "--warmup", "0", "--runs", "1",
                                "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    calls = cpu_conv_speed.conv_calls("fasternet_t0", 1)
    assert sum(row["calls"] for row in report["shapes"]) == sum(calls.values()) == 43  # (stem, 3 merges, 13 x 3)
    for row in report["shapes"]:
        assert set(row["ms"]) == set(cpu_conv_speed.RUNNERS) and min(row["ms"].values()) > 0
    assert report["ms_per_forward"]["ours"] == pytest.approx(
        sum(row["ms"]["ours"] * row["calls"] for row in report["shapes"]))
