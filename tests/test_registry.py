"""The op registry (patnet_kernels/registry.py): every op declared once, and everything that
lists ops derived from it, so that adding an op touches its own files and one registry entry."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import patnet_kernels as pk
from patnet_kernels import _cuda_ext, backends, eval_cpu, functional, reference, registry
from patnet_kernels.triton import aot

from conftest import fused_backend_unavailable

REPO = Path(__file__).resolve().parents[1]


def test_every_op_has_its_files():
    """Per op: the functional entry point, the reference, the ops module (fakes, autograd,
    backend_function), the Triton ops module, the kernel files of each backend that has it."""
    assert tuple(registry.OPS) == pk.OPS
    for name, op in registry.OPS.items():
        assert callable(getattr(functional, name)) and getattr(pk, name) is getattr(functional, name)
        assert callable(getattr(reference, name))
        module = REPO / "patnet_kernels" / "ops" / f"{op.module}.py"
        text = module.read_text()
        assert "FAKES = {" in text and "def backend_function(ops)" in text, module
        assert (REPO / "patnet_kernels" / "ops" / "triton" / f"{op.module}.py").is_file()
        assert (REPO / "patnet_kernels" / "triton" / f"{op.family}.py").is_file()
        if "cuda" in op.backends:
            assert (REPO / "csrc" / "kernels" / f"{op.family}.cu").is_file()
        if op.eval_form:
            form, ref = getattr(eval_cpu, name), getattr(reference, name)
            assert list(inspect.signature(form).parameters) == \
                list(inspect.signature(ref).parameters), name
        assert op.layout in ("map", "heads") and set(op.backends) <= set(registry.FUSED_BACKENDS)


def test_lists_of_ops_are_derived():
    assert backends.CUDA_OPS == registry.ops_of("cuda")
    assert "spatial_attention" not in registry.ops_of("cuda")
    assert registry.ops_of("torch") == pk.OPS
    assert _cuda_ext.KERNEL_FAMILIES == registry.families("cuda") == (
        "partial_conv", "channel_attention", "rpe_attention")
    assert aot.FAMILIES == registry.families("triton")
    assert set(pk.backend_plan("torch")) == set(pk.OPS)


def test_backend_plan_names_what_a_backend_lacks():
    """The plan of a backend that has no kernel for some ops says so for those ops (a call
    there raises) instead of raising for the whole plan; bad op names are refused by name."""
    plan = pk.backend_plan("cuda", "cpu") if fused_backend_unavailable("cuda") is None else None
    if plan is not None:
        assert plan["partial_conv3x3"] == "cuda"
        assert plan["spatial_attention"] == ("none: backend='cuda' has no kernel for "
                                             "spatial_attention")
    assert pk.backend_plan("torch", ops=("partial_conv3x3",)) == {"partial_conv3x3": "torch"}
    with pytest.raises(TypeError, match=r"a sequence of op names.*pass \('partial_conv3x3',\)"):
        pk.backend_plan("torch", ops="partial_conv3x3")
    for call in (lambda: pk.backend_plan("torch", ops=("nope",)),
                 lambda: pk.choose_backend("torch", None, "nope")):
        with pytest.raises(ValueError, match="unknown op 'nope'; the ops are partial_conv3x3"):
            call()


def _op_lists(path: Path):
    """Line numbers of list, tuple, set or dict literals in ``path`` that spell out two or more
    op names (``__all__`` aside: it lists the public functions)."""
    tree = ast.parse(path.read_text())
    exported = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__all__" for t in node.targets)}
    found = []
    for node in ast.walk(tree):
        if id(node) in exported:
            continue
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [key for key in node.keys if key is not None]
        else:
            continue
        if len({i.value for i in items if isinstance(i, ast.Constant) and i.value in pk.OPS}) > 1:
            found.append(node.lineno)
    return found


def test_the_registry_is_the_one_file_of_the_package_that_lists_ops():
    """No module of the package or the models spells out a list of ops; the registry declares
    them one ``Op(...)`` entry each, and the rest asks it."""
    listing = {str(path.relative_to(REPO)): lines
               for root in ("patnet_kernels", "patnet")
               for path in sorted((REPO / root).rglob("*.py"))
               if (lines := _op_lists(path))}
    assert listing == {}
    declared = (REPO / "patnet_kernels" / "registry.py").read_text()
    assert all(declared.count(f'Op("{name}"') == 1 for name in pk.OPS)


def test_refusals_state_each_limit_once():
    x = torch.zeros(2, 8, 4, 4)
    assert registry.refusals("partial_conv3x3", x) == ()
    (cuda,) = registry.refusals("spatial_attention", x)
    assert (cuda.backend, cuda.error) == ("cuda", "BackendUnavailableError")
    dtype = registry.refusals("partial_conv3x3", x.double())
    assert [(r.backend, r.error) for r in dtype] == [("triton", "TypeError"), ("cuda", "TypeError")]
    assert str(registry.refusal_error(dtype[0], dtype)) == (
        "backend='triton' runs float32, float16 and bfloat16, got torch.float64; use "
        "backend='torch'")
    wide = registry.refusals("rpe_attention", torch.zeros(1, 2, 4, registry.MAX_HEAD_DIM + 8))
    assert [r.error for r in wide] == ["ValueError", "ValueError"]
    many = registry.refusals("rpe_attention", torch.zeros(1, 2, registry.CUDA_MAX_TOKENS + 1, 8))
    assert [r.backend for r in many] == ["cuda"]
    assert str(registry.refusal_error(many[0], many)).endswith("use backend='triton' or 'auto'")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_refused_backend_is_never_loaded(backend, monkeypatch):
    """A named backend that cannot take a call raises before its ops are imported or built."""
    monkeypatch.setattr(registry, "load", lambda *a: pytest.fail("loaded a refused backend"))
    backends.forget_decisions()
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"backend='{backend}' runs float32"):
        pk.partial_conv3x3(x, torch.zeros(1, 1, 3, 3, dtype=torch.float64), backend=backend)
    backends.forget_decisions()


def test_the_backend_neutral_modules_import_no_triton():
    """ops/<op>.py (fakes, autograd) and ops/cuda.py serve the CUDA backend: they import no
    Triton module of ours (the Triton ops live in ops/triton/<op>.py)."""
    paths = [REPO / "patnet_kernels" / "ops" / f"{op.module}.py" for op in registry.OPS.values()]
    for path in paths + [REPO / "patnet_kernels" / "ops" / "cuda.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "triton" not in (node.module or ""), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any("triton" in alias.name for alias in node.names), path.name


def test_each_op_is_found_by_its_name():
    """For every op, ``<module>`` (the registry's name of its files) finds its reference, its
    ops modules, its tests and its benchmark, which scripts/gpu_check.sh runs (so that a GPU
    session measures every op for the auto rule)."""
    from benchmarks import gpu_report

    for op in registry.OPS.values():
        assert (REPO / "patnet_kernels" / "reference" / f"{op.module}.py").is_file(), op.name
        assert (REPO / "tests" / f"test_fused_{op.module}.py").is_file(), op.name
        assert (REPO / "benchmarks" / f"bench_{op.module}.py").is_file(), op.name
        assert op.module in gpu_report.OP_FAMILIES, op.name
