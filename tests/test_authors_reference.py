"""Exactness against the authors' code: float64 vectors of their PATNet and FasterNet.

Each case of ../shared/testdata/authors_reference holds a config, a state_dict, an input and, in
eval and train mode, the output, the input and parameter gradients for a given grad_output and
(train) the BatchNorm running statistics after the step. Our reference models, built from the
config and loaded strictly, must reproduce all of it: float64 to about 1e-10, float32 to about
1e-5 (the authors' own float32 run stays below 1e-6 / 1e-5 / 2e-5 for output / input gradient /
parameter gradients by the same measure).
"""
from __future__ import annotations

import json

import pytest
import torch

import patnet

from conftest import authors_reference_dir, rel_error

CASES = ["patnet_tiny_sp_gelu", "patnet_tiny_relu_224", "fasternet_tiny_gelu"]
# dtype -> (output, input gradient, parameter gradients, running statistics)
BUDGETS = {torch.float64: (1e-10, 1e-10, 1e-10, 1e-10),
           torch.float32: (2e-6, 2e-5, 5e-5, 2e-6)}


@pytest.fixture(scope="module")
def vectors():
    root = authors_reference_dir()
    index = json.loads((root / "index.json").read_text())
    assert sorted(index) == sorted(CASES)
    return {case: torch.load(root / f"{case}.pt", weights_only=False) for case in CASES}


def build(case: dict, mode: str, dtype: torch.dtype) -> torch.nn.Module:
    config = dict(case["config"])
    if mode == "train" and config["family"] == "patnet":
        config.update(attn_drop=0.0, proj_drop=0.0)  # the vectors were made with every p = 0
    model = patnet.model_from_config(config, backend="torch")
    model.load_state_dict(case["state_dict"], strict=True)
    return model.to(dtype).train(mode == "train")


def check_against_authors(model: torch.nn.Module, case: dict, mode: str, dtype: torch.dtype,
                          device: torch.device = torch.device("cpu")) -> None:
    """Run ``model`` on the case's input and assert the authors' output, input and parameter
    gradients and (train) updated BatchNorm statistics, within BUDGETS[dtype]."""
    ref = case[mode]
    x = case["input"].detach().to(device, dtype).clone().requires_grad_(True)
    out = model(x)
    out.backward(ref["grad_output"].to(device, dtype))
    out_budget, gin_budget, gparam_budget, state_budget = BUDGETS[dtype]

    assert rel_error(out, ref["output"]) < out_budget
    assert rel_error(x.grad, ref["grad_input"]) < gin_budget
    params = dict(model.named_parameters())
    assert set(ref["grad_params"]) == set(params)
    largest = max(g.double().norm().item() for g in ref["grad_params"].values())
    errors = {k: rel_error(params[k].grad, g, floor=1e-3 * largest)
              for k, g in ref["grad_params"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < gparam_budget, f"{worst}: {errors[worst]:.2e}"

    if mode == "train":
        state = model.state_dict()
        for key, expected in ref["state_after"].items():
            assert rel_error(state[key], expected) < state_budget, key
        for key, before in case["state_dict"].items():
            if key.endswith("num_batches_tracked"):
                assert int(state[key]) == int(before) + 1, key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", CASES)
def test_model_matches_authors(vectors, name, mode, dtype):
    case = vectors[name]
    model = build(case, mode, dtype)
    assert patnet.count_params(model) == json.loads(
        (authors_reference_dir() / "index.json").read_text())[name]["params"]
    check_against_authors(model, case, mode, dtype)


@pytest.mark.parametrize("name", CASES)
def test_state_dict_key_order_matches_authors(vectors, name):
    model = patnet.model_from_config(vectors[name]["config"])
    assert list(model.state_dict()) == list(vectors[name]["state_dict"])

