"""Installs patnet_kernels (fused ops + reference) and patnet (models), and builds the CUDA
extension ``patnet_kernels._C`` (csrc/) where CUDA is really there to build with.

Whether it is built is decided by patnet_kernels/_build.py (``decide_cuda_build``): a CUDA
toolkit (CUDA_HOME, or nvcc on PATH) with a CUDA build of torch, or ``FORCE_CUDA=1`` /
``TORCH_CUDA_ARCH_LIST`` (then a missing toolkit is an error); ``PATNET_SKIP_CUDA_BUILD=1``
skips it; ``MAX_JOBS`` caps ninja's parallel jobs. A visible GPU plays no part. Without the
prebuilt extension the package JIT-builds csrc/ on first use of backend="cuda".
Install torch first and build without isolation: ``pip install --no-build-isolation -e .``.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_module():
    # patnet_kernels/_build.py by path: the package itself is not importable yet.
    spec = importlib.util.spec_from_file_location("_patnet_build", ROOT / "patnet_kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    """(ext_modules, cmdclass) of the CUDA extension, or empty ones when it is not built."""
    build = _build_module()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch_cuda, cuda_home = None, build.find_cuda_home()
    else:
        torch_cuda, cuda_home = torch.version.cuda, cpp_extension.CUDA_HOME or build.find_cuda_home()
    decision = build.decide_cuda_build(os.environ, torch_cuda, cuda_home)
    print(f"patnet-kernels: CUDA extension {'built' if decision.build else 'not built'}: "
          f"{decision.reason}", file=sys.stderr)
    if not decision.build:
        return [], {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = decision.arch_list
    if decision.max_jobs is not None:
        os.environ["MAX_JOBS"] = str(decision.max_jobs)  # read by torch's ninja build
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "kernels").glob("*.cu"))
    extension = cpp_extension.CUDAExtension(
        "patnet_kernels._C", ["csrc/bindings.cpp"] + kernels,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.CUDA_FLAGS)})
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="patnet-kernels",
    version="0.1.0",
    description="Fused kernels and reference implementation of PATNet (partial visual attention)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["patnet_kernels", "patnet_kernels.*", "patnet", "patnet.*"]),
    # The GPU measurements behind backend="auto" (patnet_kernels/auto_rule.py), the tuned kernel
    # configurations and the AOT check's record of what each compile showed.
    package_data={"patnet_kernels": ["measured_speed.json", "triton/tuned_configs.json",
                                     "triton/aot_record/*.json"]},
    python_requires=">=3.9",
    # Any torch >= 2.4 works; an installed CUDA build is kept. Install torch before this package
    # (scripts/install.sh does) so that pip never pulls a CUDA build by itself.
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest>=7"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
