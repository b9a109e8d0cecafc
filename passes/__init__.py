"""sparsefx.passes: torch.fx graph passes (trace, find sites, allocate, rewrite, analyse).

Graph in, graph out. Passes insert ``torch.ops.sparsefx`` ops; they never import a kernel.
"""
