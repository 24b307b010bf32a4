"""The CPU inference path's measured choices (``patnet_kernels.cpu_choice``): the first call of
each kind times its candidates and keeps the fastest, later ones run it alone; off (the suite's
setting, PATNET_CPU_MEASURE=0) or in a trace the last candidate runs; an in-place call is
restored between its timed runs. Through the functional API (the reference against the eval
form) and the inference copy, which equals the eval model whatever was kept."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import patnet
import patnet_kernels as pk
from patnet.testing import randomize_norms
from patnet_kernels import backends, cpu_choice, eval_cpu, reference

from conftest import frozen, rel_error, slowed


@pytest.fixture
def choices(monkeypatch):
    """Timing on, and fresh, empty choices (the process's are left as they were)."""
    for name in ("EVAL_FORMS", "CONVOLUTIONS"):
        fresh = cpu_choice.MeasuredChoice(name, getattr(cpu_choice, name).labels)
        monkeypatch.setattr(cpu_choice, name, fresh)
    with cpu_choice.measuring_as(True):
        yield cpu_choice


def test_the_faster_candidate_is_kept_and_later_calls_run_it_alone(choices):
    ran = []
    fast = lambda x, k: ran.append("fast") or x + k  # noqa: E731
    slow = slowed(lambda x, k: ran.append("slow") or x + k)
    choice = choices.MeasuredChoice("test", ("slow", "fast"))
    x = torch.zeros(3)
    out = choice.choose("kind", (slow, fast))(x, 1.0)
    assert torch.equal(out, torch.ones(3))
    assert ran.count("fast") == ran.count("slow") == choices.ROUNDS + 1
    assert choice.chosen("kind") == "fast" and choice.summary() == {"slow": 0, "fast": 1}
    ((key, label, times),) = choice.records()
    assert key == "kind" and label == "fast" and times[0] > times[1] > 0
    ran.clear()
    assert torch.equal(choice.choose("kind", (slow, fast))(x, 2.0), torch.full((3,), 2.0))
    assert ran == ["fast"]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # (another thread count: another choice, timed again)
    try:
        assert choice.chosen("kind") is None
        ran.clear()
        choice.choose("kind", (slow, fast))(x, 1.0)
        assert len(ran) == 2 * (choices.ROUNDS + 1) and len(choice.records()) == 2
    finally:
        torch.set_num_threads(threads)
    choice.forget()
    assert choice.chosen("kind") is None and choice.summary() == {"slow": 0, "fast": 0}


@pytest.mark.parametrize("first, kept", [(0.97, "last"), (0.94, "first")])
def test_another_candidate_is_kept_only_if_a_margin_faster_than_the_last(choices, monkeypatch,
                                                                         first, kept):
    """The last candidate (the fixed path) stays unless another's least time is MARGIN (5%)
    below its own (a fake clock: each candidate advances it by its time)."""
    clock = [0.0]
    monkeypatch.setattr(cpu_choice, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds, label):
        return lambda x: clock.__setitem__(0, clock[0] + seconds) or label
    choice = choices.MeasuredChoice("test", ("first", "last"))
    out = choice.choose("kind", (taking(first, "first"), taking(1.0, "last")))(torch.zeros(1))
    assert choice.chosen("kind") == kept and out == kept


def test_without_timing_or_in_a_trace_the_last_candidate_runs(choices, monkeypatch):
    first, last = (lambda x: "first"), (lambda x: "last")
    choice = choices.MeasuredChoice("test", ("first", "last"))
    with choices.measuring_as(False):
        assert not choices.measuring()
        assert choice.choose("kind", (first, last)) is last
    assert choices.measuring()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choice.choose("kind", (first, last)) is last
    assert choice.records() == []
    with pytest.raises(TypeError, match="True or False"):
        choices.set_measuring(1)


def test_an_in_place_call_is_restored_between_timed_runs(choices):
    """Each timed run of an in-place candidate starts from the call's input: the call's
    result is one application, whichever is kept."""
    choice = choices.MeasuredChoice("test", ("a", "b"))
    x = torch.arange(4.0)
    out = choice.choose("kind", (lambda t: t.mul_(2), slowed(lambda t: t.mul_(2))),
                        writes_input=True)(x)
    assert out is x and torch.equal(x, torch.arange(4.0) * 2)
    assert choice.chosen("kind") == "a"


def _mlp_args(gen):
    x = torch.randn(1, 16, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    w1 = frozen(torch.randn(32, 16, 1, 1, generator=gen) * 0.2)
    w2 = frozen(torch.randn(16, 32, 1, 1, generator=gen) * 0.2)
    return x, w1, torch.randn(32, generator=gen), w2, torch.randn(16, generator=gen)


@pytest.mark.parametrize("slower", ["reference", "eval form"])
def test_functional_api_keeps_the_faster_of_reference_and_eval_form(choices, monkeypatch,
                                                                   slower):
    """An op called with eval_form=True on the CPU runs whichever of the reference and its
    eval form was faster on the first call of its kind (here the other one made slower); a
    call that needs a gradient runs the reference untimed; either equals the reference."""
    module, name = (reference, "pointwise_mlp") if slower == "reference" else \
        (eval_cpu, "pointwise_mlp")
    monkeypatch.setattr(module, name, slowed(getattr(module, name)))
    gen = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2 = _mlp_args(gen)
    want = reference.pointwise_mlp(x.double(), w1.double(), b1.double(), w2.double(),
                                   b2.double(), None, "gelu")
    with torch.no_grad():
        got = pk.pointwise_mlp(x, w1, b1, w2, b2, activation="gelu", eval_form=True)
        again = pk.pointwise_mlp(x, w1, b1, w2, b2, activation="gelu", eval_form=True)
    kept = "eval form" if slower == "reference" else "reference"
    ((key, label, _),) = choices.EVAL_FORMS.records()
    assert key[0] == "pointwise_mlp" and label == kept
    assert rel_error(got, want) < 1e-6 and torch.equal(got, again)
    pk.pointwise_mlp(x.requires_grad_(), w1, b1, w2, b2, activation="gelu", eval_form=True)
    assert len(choices.EVAL_FORMS.records()) == 1


def test_in_place_partial_conv_is_timed_on_its_own_input(choices):
    """PConv with inplace=True, timed: x ends as one in-place PConv of it would leave it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 7, 7, generator=gen)
    weight = frozen(torch.randn(2, 2, 3, 3, generator=gen))
    want = reference.partial_conv3x3(x.clone(), weight, False)
    with torch.no_grad():
        out = pk.partial_conv3x3(x, weight, inplace=True, eval_form=True)
    assert out is x and rel_error(x, want) < 1e-6
    assert [r[0][0] for r in choices.EVAL_FORMS.records()] == ["partial_conv3x3"]


@pytest.mark.parametrize("name, ops", [
    ("patnet_t0", {"channel_attention", "layer_norm_linear", "patch_conv", "pointwise_mlp",
                   "rpe_attention", "self_mixer_output"}),
    ("fasternet_t0", {"partial_conv3x3", "patch_conv", "pointwise_mlp"})])
def test_inference_copy_makes_its_choices_once_and_equals_the_eval_model(choices, monkeypatch,
                                                                          name, ops):
    """The copy's first forward times every kind of op call and convolution it makes; the
    second times none; both equal the eval model."""
    torch.manual_seed(0)
    model = randomize_norms(patnet.create_model(name, backend="torch"), 0).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast = patnet.optimize_for_inference(model)
    with torch.no_grad():
        want = model(x)
        first = fast(x)
        assert {key[0] for key, _, _ in choices.EVAL_FORMS.records()} == ops
        assert sum(choices.CONVOLUTIONS.summary().values()) > 0
        monkeypatch.setattr(cpu_choice.MeasuredChoice, "measure", None)  # (a call would fail)
        second = fast(x)
    assert rel_error(first, want) < 1e-5 and rel_error(second, want) < 1e-5


def test_info_and_speed_script_report_the_choices(choices, tmp_path):
    """info() says how the CPU convolutions are chosen; benchmarks/cpu_choice_speed.py prints
    and writes every kind of op call of a copy with both times and what was kept, and eager
    and the copy both ways timed round-robin."""
    from benchmarks import cpu_choice_speed

    assert "whichever was faster" in pk.info()["cpu_convolutions"]
    assert pk.info()["cpu_choices"] == {"measuring": True,
                                        "eval forms": {"reference": 0, "eval form": 0},
                                        "convolutions": {"F.conv2d": 0, "oneDNN": 0}}
    out = tmp_path / "choices.json"
    assert cpu_choice_speed.main(["--models", "fasternet_t0", "--size", "32", "--runs", "2",
                                  "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert {row["op"] for row in report["calls"]} == {"partial_conv3x3", "patch_conv",
                                                      "pointwise_mlp"}
    for row in report["calls"]:
        assert row["kept"] in ("reference", "eval form") and min(row["us"].values()) > 0
        faster = row["us"]["reference"] < (1 - cpu_choice.MARGIN) * row["us"]["eval form"]
        assert (row["kept"] == "reference") == faster
    assert report["first_forward_ms"] > 0 and report["second_forward_ms"] > 0
    assert set(report["median_ms"]) == {"eager", cpu_choice_speed.FIXED,
                                        cpu_choice_speed.MEASURED}
    assert min(report["median_ms"].values()) > 0
    assert sum(pk.info()["cpu_choices"]["eval forms"].values()) == len(report["calls"])
    with cpu_choice.measuring_as(False):
        assert cpu_choice_speed.main(["--models", "fasternet_t0"]) == 2


def test_cpu_shortcut_agrees_with_the_backend_decision():
    """choose_implementation takes "auto" and "torch" on the CPU as the reference without
    asking choose_backend: what choose_backend decides for every op there."""
    for op in pk.registry.OPS:
        for backend in backends.REFERENCE_ON_CPU:
            assert backends.resolve_backend(backend, torch.device("cpu"), op) == "torch"
