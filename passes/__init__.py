"""sparsefx.passes: torch.fx graph passes (trace, find sites, allocate, rewrite, analyse).

Graph in, graph out. Passes insert ``torch.ops.sparsefx`` ops; they never import a kernel.
"""

if __name__ != "sparsefx.passes":
    # Run from the repository root, this folder is also importable as a top-level "passes";
    # that import gets the one sparsefx.passes instead of a second copy.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("sparsefx.passes")
