"""sparsefx.kernels: tensors in, tensors out.

Importing this package registers the ``torch.ops.sparsefx`` ops (``ops.py``) and the
growth-score tap the DST manager reads dense gradients through (``growth.py``). The pattern
math every layer of sparsefx shares lives in ``patterns.py``; the Triton kernels in
``diag_triton.py`` / ``fanin_triton.py`` (imported on first use with CUDA tensors); the CPU
kernels in ``cpu.py``. Nothing here imports ``sparsefx`` or ``sparsefx.passes``.
"""
from . import growth, patterns
from .ops import diag_linear, fanin_linear

__all__ = ["growth", "patterns", "diag_linear", "fanin_linear"]
