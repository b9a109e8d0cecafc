"""sparsefx.kernels: tensors in, tensors out.

Importing this package registers the ``torch.ops.sparsefx`` ops (``ops.py``) and the
growth-score tap the DST manager reads dense gradients through (``growth.py``). The pattern
math every layer of sparsefx shares lives in ``patterns.py``; the Triton kernels in
``diag_triton.py`` / ``fanin_triton.py`` (imported on first use with CUDA tensors); the C++ CPU
kernels, checks and autograd in ``csrc/`` (loaded by ``cpu.py``, which also holds the
PyTorch fallback kernels). Nothing here imports ``sparsefx`` or ``sparsefx.passes``.
"""

if __name__ == "sparsefx.kernels":
    from . import growth, patterns
    from .ops import cpu_kernels, diag_linear, fanin_linear, use_cpu_kernels

    __all__ = ["growth", "patterns", "diag_linear", "fanin_linear", "cpu_kernels",
               "use_cpu_kernels"]
else:
    # Run from the repository root, this folder is also importable as a top-level
    # "kernels", a name other packages probe for (transformers looks for the Hub's
    # "kernels"). That import gets the one sparsefx.kernels instead of a second copy
    # registering the ops again.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("sparsefx.kernels")
