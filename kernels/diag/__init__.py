"""The diag pattern's kernels: its ops (``op.py``), their C++ CPU kernels and autograd
(``diag_ops.cpp``, ``kernels.h``, ``checks.h``), PyTorch fallback (``torch_kernels.py``)
and Triton kernels (``triton_kernels.py``, imported on first use with CUDA tensors)."""
from .op import diag_linear

__all__ = ["diag_linear"]
