"""Triton kernels, one file per kernel family: the @triton.jit kernels and their launchers.

Importing this package imports ``triton``. Triton decides when a kernel is *defined* whether it
runs compiled (CUDA tensors) or under its interpreter (``TRITON_INTERPRET=1``, CPU tensors, for
testing), so that variable must be set before the first import; see
:func:`patnet_kernels.backends.info`.
"""
