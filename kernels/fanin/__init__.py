"""The fanin pattern's kernels (N:M layers use them too): its ops (``op.py``), their C++
CPU kernels and autograd (``fanin_ops.cpp``, ``kernels.h``, ``checks.h``), PyTorch fallback
(``torch_kernels.py``) and Triton kernels (``triton_kernels.py``, imported on first use with
CUDA tensors)."""
from .op import fanin_linear

__all__ = ["fanin_linear"]
