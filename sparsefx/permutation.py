"""Input permutations that fit a diagonal pattern to a trained weight.

A diagonal (or blocked-diagonal) layer keeps only what lies on its diagonals; permuting the
layer's inputs changes what lies there. With the layer computing on ``x[..., perm]``
(``DiagLinear.set_input_permutation``), its structure is chosen on ``W[:, perm]`` and the
model computes the same function: ``dense_weight()`` is in the inputs' own order.

``fit_input_permutation`` maximises the importance the pattern keeps, ``sum(S[:, perm] *
M)`` over permutations ``perm`` and the pattern's masks ``M``, by alternating: the best mask
for the current permutation (the pattern's own rule, ``from_scores``), then the best
permutation for that mask, a linear assignment of input columns to positions (the gain of
putting column ``j`` at position ``p`` is ``sum_i S[i, j] M[i, p]``). Neither step lowers
the kept importance; it stops when a round gains nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fit_input_permutation", "permuted_layer", "ROUNDS"]

ROUNDS = 20  # alternations at most (each gains, or the search stops)


def _assignment(gain: torch.Tensor) -> torch.Tensor:
    """``perm`` maximising ``sum_p gain[perm[p], p]``."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("sparsefx: permute=True needs scipy (pip install scipy), for its "
                          "linear assignment") from None
    columns, positions = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
    permutation = torch.empty(gain.shape[0], dtype=torch.int64)
    permutation[torch.from_numpy(positions)] = torch.from_numpy(columns)
    return permutation


@torch.no_grad()
def fit_input_permutation(scores: torch.Tensor,
                          best_mask: Callable[[torch.Tensor], torch.Tensor],
                          rounds: int = ROUNDS) -> tuple[torch.Tensor, float]:
    """``(perm, kept)``: the input permutation found for the importance ``scores [out, in]``
    (>= 0) and the fraction of their sum the pattern then keeps. ``best_mask(S)``: the
    pattern's mask of largest kept ``S`` (``bool [out, in]``)."""
    scores = scores.detach().double().cpu()
    total = float(scores.sum())
    permutation = torch.arange(scores.shape[1])
    best_value, best = -1.0, permutation
    for _ in range(rounds):
        permuted = scores[:, permutation]
        mask = best_mask(permuted).cpu()
        value = float(permuted[mask].sum())
        if value <= best_value:
            break
        best_value, best = value, permutation
        permutation = _assignment(scores.T @ mask.double())
    return best, (best_value / total if total > 0 else 1.0)


def permuted_layer(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                   scores: torch.Tensor, **structure):
    """``cls.from_scores`` on the inputs permuted to keep the most of ``scores``, the
    permutation set on the layer (``cls``: a layer with ``set_input_permutation``)."""
    def best_mask(permuted: torch.Tensor) -> torch.Tensor:
        return cls.from_scores(permuted, None, permuted, **structure).kept_mask()

    permutation, _ = fit_input_permutation(scores, best_mask)
    permutation = permutation.to(weight.device)
    layer = cls.from_scores(weight[:, permutation], bias, scores[:, permutation.to(
        scores.device)], **structure)
    layer.set_input_permutation(permutation)
    return layer
