"""sparsefx: structured sparse training for PyTorch.

Importing sparsefx registers the ops ``torch.ops.sparsefx.diag_linear`` and
``torch.ops.sparsefx.fanin_linear`` (see ``sparsefx.kernels``).
"""
from sparsefx.kernels import diag_linear, fanin_linear, patterns

__version__ = "0.1.0"
__all__ = ["diag_linear", "fanin_linear", "patterns", "__version__"]
