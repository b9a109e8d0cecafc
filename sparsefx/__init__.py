"""sparsefx: structured sparse training for PyTorch.

Importing sparsefx registers the ``torch.ops.sparsefx`` ops of every pattern in
``sparsefx.registry.PATTERNS`` (see ``sparsefx.kernels``); ``sparsefx.layers`` holds the
modules that own a sparse weight and call them; ``sparsefx.DST`` trains their structure
(``sparsefx.dst``) with a method of ``sparsefx.methods``. ``register_pattern`` adds a
pattern defined outside sparsefx.
"""
from sparsefx.kernels import blockdiag_linear, diag_linear, fanin_linear, patterns
from sparsefx.checkpoint import load_checkpoint, save_checkpoint
from sparsefx.dst import DST
from sparsefx.layers import BlockDiagLinear, DiagLinear, FanInLinear, MaskedLinear, SparseLinear
from sparsefx.methods import SET, DynaDiag, RigL, SRigL, Static
from sparsefx.registry import Pattern, register_pattern
from sparsefx.report import Report, report
from sparsefx.saving import load, save
from sparsefx.transform import densify, layer_graph, transform

__version__ = "0.1.0"
__all__ = ["transform", "DST", "Static", "SET", "RigL", "SRigL", "DynaDiag", "densify", "report",
           "layer_graph", "Report", "save_checkpoint", "load_checkpoint", "save", "load",
           "DiagLinear", "BlockDiagLinear", "FanInLinear", "MaskedLinear", "SparseLinear",
           "Pattern", "register_pattern", "diag_linear", "fanin_linear", "blockdiag_linear",
           "patterns", "__version__"]
