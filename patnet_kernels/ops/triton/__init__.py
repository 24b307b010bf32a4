"""The Triton backend's registered ops (``patnet_triton``), one module per op module of
:mod:`patnet_kernels.ops`: bodies that launch the kernels of :mod:`patnet_kernels.triton`."""
