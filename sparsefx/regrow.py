"""The drop-and-grow step of dynamic sparse training, as pure tensor functions.

Every pattern is handled as rows of *slots*: a row holds ``k`` distinct unit ids out of
``C`` candidates, and an update moves ``n`` of them.

=================  =============  =======================  ============================
layer              rows           slots per row            candidates per row
=================  =============  =======================  ============================
``DiagLinear``     1              K diagonals              P diagonals
``FanInLinear``    out            k entries                in columns (N:M: per group)
``MaskedLinear``   1              all kept elements        out * in elements
=================  =============  =======================  ============================

``drop_and_grow`` keeps the ``k - n`` slots of largest magnitude, grows the ``n``
best-scoring candidates among the rest (for N:M, within the groups that lost entries, so
each group still holds N), and writes them in place of the dropped ones. A dropped unit
that is grown again keeps its slot -- and so its value and optimizer state. The manager
(``sparsefx.dst``) decides what "magnitude" and "score" are for each method.
"""
from __future__ import annotations

import torch

from sparsefx.kernels.growth import top_ids

__all__ = ["drop_and_grow", "kept_mask", "layerwise_salience"]


def kept_mask(active: torch.Tensor, keep: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """``[R, C]`` bool: True at the ids of the slots where ``keep [R, k]`` is True."""
    mask = torch.zeros(active.shape[0], num_candidates, dtype=torch.bool, device=active.device)
    return mask.scatter_(1, active, keep)


def drop_and_grow(active: torch.Tensor, magnitude: torch.Tensor, scores: torch.Tensor,
                  num_moved: int, group_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``num_moved`` units in every row.

    ``active [R, k]``: distinct int64 unit ids per row; ``magnitude [R, k]``: what drop
    ranks (smallest dropped); ``scores [R, C]``: what growth ranks among the candidates not
    kept (largest grown). With ``group_size=M`` the ids form groups of ``M`` consecutive
    candidates and a group regrows exactly as many units as it lost (N:M stays N:M).

    Returns ``(new_active [R, k], grown [R, k])``: the new ids (unchanged slots keep their
    id) and which slots now hold a unit that was not active before. Ties break towards the
    lower slot (drop) and the lower id (grow), so results are deterministic.
    """
    rows, slots = active.shape
    if not 0 <= num_moved <= slots:
        raise ValueError(f"num_moved={num_moved}: expected 0 <= n <= k = {slots}")
    if num_moved == 0:
        return active.clone(), torch.zeros_like(active, dtype=torch.bool)
    dropped_slots = top_ids(magnitude, num_moved, largest=False, ordered=False)
    keep = torch.ones_like(active, dtype=torch.bool).scatter_(1, dropped_slots, False)
    candidate_scores = scores.float().masked_fill(kept_mask(active, keep, scores.shape[1]),
                                                  float("-inf"))
    if group_size is None:
        grown_ids = top_ids(candidate_scores, num_moved, ordered=False)
    else:
        grown_ids = _top_ids_per_group(candidate_scores, active.gather(1, dropped_slots),
                                       group_size, slots)
    return _assign(active, dropped_slots, grown_ids, group_size, scores.shape[1])




def _top_ids_per_group(scores: torch.Tensor, dropped_ids: torch.Tensor, group_size: int,
                       slots: int) -> torch.Tensor:
    """In each group, the best ``d`` candidates where ``d`` is how many ids it dropped."""
    rows, num_candidates = scores.shape
    groups = num_candidates // group_size
    per_group = slots // groups  # N of N:M
    lost = torch.zeros(rows, groups, dtype=torch.int64, device=scores.device)
    lost.scatter_add_(1, dropped_ids // group_size, torch.ones_like(dropped_ids))
    order = top_ids(scores.view(rows * groups, group_size), per_group).view(rows, groups,
                                                                            per_group)
    ids = order + (torch.arange(groups, device=scores.device) * group_size)[None, :, None]
    chosen = torch.arange(per_group, device=scores.device)[None, None, :] < lost[..., None]
    # chosen ones first (each row chose exactly len(dropped) ids), in id order
    rank = torch.where(chosen, ids, num_candidates + ids).view(rows, -1)
    return rank.sort(dim=1).values[:, :dropped_ids.shape[1]]


def _member(ids: torch.Tensor, of: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """``[R, a]`` bool: is ``ids[r, i]`` among ``of[r, :]``? One ``[R, C]`` bitmap, so a
    layer-wide move of many units costs O(C), not O(n^2)."""
    marks = torch.zeros(ids.shape[0], num_candidates, dtype=torch.bool, device=ids.device)
    return marks.scatter_(1, of, True).gather(1, ids)


def _assign(active: torch.Tensor, dropped_slots: torch.Tensor, grown_ids: torch.Tensor,
            group_size: int | None, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``grown_ids`` into the dropped slots; a grown id that was just dropped keeps its
    own slot. Freed slots and new ids are matched in group order, so a new id lands in a
    slot its group freed."""
    dropped_ids = active.gather(1, dropped_slots)
    is_new = ~_member(grown_ids, dropped_ids, num_candidates)
    is_freed = ~_member(dropped_ids, grown_ids, num_candidates)
    group_of = (lambda ids: ids // group_size) if group_size else torch.zeros_like
    # sort keys: (group, id) for new ids and (group, slot) for freed slots; the rest last
    stride, last = 1 << 31, torch.iinfo(torch.int64).max
    new_ids = grown_ids.gather(1, torch.argsort(
        torch.where(is_new, group_of(grown_ids) * stride + grown_ids, last), dim=1,
        stable=True))
    freed_order = torch.argsort(
        torch.where(is_freed, group_of(dropped_ids) * stride + dropped_slots, last), dim=1,
        stable=True)
    freed_slots = dropped_slots.gather(1, freed_order)
    count_new = is_new.sum(dim=1, keepdim=True)
    position = torch.arange(grown_ids.shape[1], device=active.device)[None, :]
    write = position < count_new
    new_active = active.clone()
    current = new_active.gather(1, freed_slots)
    new_active.scatter_(1, freed_slots, torch.where(write, new_ids, current))
    grown = torch.zeros_like(active, dtype=torch.bool)
    grown.scatter_(1, freed_slots, write)
    return new_active, grown


def layerwise_salience(magnitude: torch.Tensor, active: torch.Tensor, scores: torch.Tensor,
                       row_active: torch.Tensor, num_moved: int) -> torch.Tensor:
    """SRigL's salient count per row: entries in the layer-wide RigL keep set (the largest
    ``total - num_moved`` magnitudes over the active rows) plus entries in the layer-wide
    grow set (the ``num_moved`` best scores among all positions not kept)."""
    rows, slots = active.shape
    total = int(row_active.sum()) * slots
    flat_magnitude = magnitude.float().masked_fill(~row_active[:, None], float("-inf"))
    # not kept: the ablated rows and the num_moved smallest of the active ones
    not_kept = top_ids(flat_magnitude.view(1, -1), rows * slots - total + num_moved,
                       largest=False, ordered=False)[0]
    keep = torch.ones(rows * slots, dtype=torch.bool, device=active.device)
    keep = keep.index_fill_(0, not_kept, False).view(rows, slots)
    candidate_scores = scores.float().masked_fill(kept_mask(active, keep, scores.shape[1]),
                                                  float("-inf"))
    grow_flat = torch.zeros(candidate_scores.numel(), dtype=torch.bool, device=active.device)
    grow_flat[top_ids(candidate_scores.view(1, -1), num_moved, ordered=False)[0]] = True
    return keep.sum(dim=1) + grow_flat.view_as(scores).sum(dim=1)
