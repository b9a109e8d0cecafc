"""sparsefx.kernels: tensors in, tensors out.

Importing this package registers the ``torch.ops.sparsefx`` ops and the growth-score tap the
DST manager reads dense gradients through (``growth.py``, which ranks with the exact top-k
selection of ``topk.py``). Each pattern's ops live in their
own package -- ``diag/``, ``fanin/`` (which N:M layers use too), ``blockdiag/`` -- with their
schemas, checks, fakes, C++ CPU kernels and autograd, PyTorch fallback and Triton kernels
together; ``_library.py`` is what they share (the library, device registration),
``native.py`` builds their C++ and ``cpu_choice.py`` picks the CPU kernels. The pattern math every layer of sparsefx shares lives in
``patterns.py``. Nothing here imports ``sparsefx`` or ``sparsefx.passes``.
"""

if __name__ == "sparsefx.kernels":
    from . import cpu_choice, growth, patterns, topk
    from .cpu_choice import CPU_KERNELS, cpu_kernels, use_cpu_kernels
    # each pattern's ops (a new pattern's kernel package joins here)
    from .blockdiag import blockdiag_linear
    from .diag import diag_linear
    from .fanin import fanin_linear

    cpu_choice.load_cpu_kernels()  # once every pattern's ops are defined

    __all__ = ["growth", "patterns", "topk", "diag_linear", "fanin_linear",
               "blockdiag_linear", "cpu_kernels", "use_cpu_kernels", "CPU_KERNELS"]
else:
    # Run from the repository root, this folder is also importable as a top-level
    # "kernels", a name other packages probe for (transformers looks for the Hub's
    # "kernels"). That import gets the one sparsefx.kernels instead of a second copy
    # registering the ops again.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("sparsefx.kernels")
