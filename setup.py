"""Installs patnet_kernels (fused ops + reference) and patnet (models).

This version is pure Python: it installs on any machine with PyTorch, CUDA or not.
The CUDA C++ extension ``patnet_kernels._C`` (sources in csrc/) is not built by this version;
when it lands, its build goes here, decided by CUDA_HOME with a CUDA-enabled torch or by
FORCE_CUDA / TORCH_CUDA_ARCH_LIST, never by whether a GPU is visible.
"""
from setuptools import find_packages, setup

setup(
    name="patnet-kernels",
    version="0.1.0",
    description="Fused kernels and reference implementation of PATNet (partial visual attention)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["patnet_kernels", "patnet_kernels.*", "patnet", "patnet.*"]),
    python_requires=">=3.9",
    # Any torch >= 2.4 works; an installed CUDA build is kept. Install torch before this package
    # (scripts/install.sh does) so that pip never pulls a CUDA build by itself.
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest>=7"]},
)
