"""Sparse linear layers: each owns its ``values`` and structure buffers and calls one op.

* ``DiagLinear``   -- K whole wrap-around diagonals (``torch.ops.sparsefx.diag_linear``);
* ``FanInLinear``  -- exactly k inputs per output row, optionally N:M
  (``torch.ops.sparsefx.fanin_linear``);
* ``MaskedLinear`` -- a dense weight times a 0/1 mask: the unstructured baseline, not
  accelerated.

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
