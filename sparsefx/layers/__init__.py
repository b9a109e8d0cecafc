"""Sparse linear layers, one file per pattern (which layer each pattern uses:
``sparsefx.registry.PATTERNS``): each is a ``SparseLinear`` (``base.py``) that owns its
``values`` and structure buffer, calls its pattern's op, and says what DST needs of its
units (slots, magnitudes, candidates, writing a structure, describing itself).

Each builds from a dense weight with ``from_dense``: ``init="magnitude"`` keeps the
largest-magnitude diagonals / entries, so a pretrained layer can be sparsified;
``init="random"`` draws the structure at random and keeps the dense values there, as RigL
does when training from scratch. ``random(...)`` does the latter from ``nn.Linear``'s
initialisation. ``dense_weight()`` / ``to_dense()`` go back. The structure math is
``sparsefx.kernels.patterns``'; nothing here re-derives it.
"""
from .base import DenseLinear, SparseLinear
from .blockdiag import BlockDiagLinear
from .diag import DiagLinear, soft_top_k_gates
from .fanin import FanInLinear
from .unstructured import MaskedLinear

__all__ = ["SparseLinear", "DiagLinear", "BlockDiagLinear", "FanInLinear", "MaskedLinear",
           "DenseLinear", "SPARSE_LAYERS", "soft_top_k_gates"]

# what isinstance checks for "a sparse layer": every pattern's layer, registered outside
# sparsefx too, derives from SparseLinear
SPARSE_LAYERS = (SparseLinear,)
