"""The blockdiag pattern's kernels: its ops (``op.py``), their C++ CPU kernels and autograd
(``blockdiag_ops.cpp``, ``kernels.h``, ``checks.h``: batched dense GEMMs over the blocks)
and their PyTorch kernels (``torch_kernels.py``: the fallback, and the CUDA path until the
pattern has Triton kernels)."""
from .op import blockdiag_linear

__all__ = ["blockdiag_linear"]
