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

Scores come either for every candidate (``[R, C]``) or, for the dense-gradient methods, as
*listed* candidates: ``candidate_ids [R, M]`` whose first ``k`` columns are the active slots
themselves, followed by the best inactive ids the growth tap kept
(``sparsefx.kernels.growth``). The listed form never touches an ``[R, C]`` tensor.
"""
from __future__ import annotations

import torch

from sparsefx.kernels.growth import top_ids

__all__ = ["drop_and_grow", "kept_mask", "keeps_at_least", "layerwise_salience"]


def kept_mask(active: torch.Tensor, keep: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """``[R, C]`` bool: True at the ids of the slots where ``keep [R, k]`` is True."""
    mask = torch.zeros(active.shape[0], num_candidates, dtype=torch.bool, device=active.device)
    return mask.scatter_(1, active, keep)


def drop_and_grow(active: torch.Tensor, magnitude: torch.Tensor, scores: torch.Tensor,
                  num_moved: int, group_size: int | None = None,
                  candidate_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``num_moved`` units in every row.

    ``active [R, k]``: distinct int64 unit ids per row; ``magnitude [R, k]``: what drop
    ranks (smallest dropped); ``scores``: what growth ranks among the candidates not kept
    (largest grown), either ``[R, C]`` over all ids or ``[R, M]`` over ``candidate_ids``
    (see the module docstring). With ``group_size=M`` (all-id scores only) the ids form
    groups of ``M`` consecutive candidates and a group regrows exactly as many units as it
    lost (N:M stays N:M).

    Returns ``(new_active [R, k], grown [R, k])``: the new ids (unchanged slots keep their
    id) and which slots now hold a unit that was not active before. Ties break towards the
    lower slot (drop) and the lower id or column (grow), so results are deterministic.
    """
    rows, slots = active.shape
    if not 0 <= num_moved <= slots:
        raise ValueError(f"num_moved={num_moved}: expected 0 <= n <= k = {slots}")
    if num_moved == 0:
        return active.clone(), torch.zeros_like(active, dtype=torch.bool)
    dropped_slots = top_ids(magnitude, num_moved, largest=False, ordered=False)
    if candidate_ids is not None:
        if group_size is not None:
            raise ValueError("drop_and_grow: group_size needs scores over all ids")
        # what can grow: the dropped slots and the listed candidates (kept slots cannot),
        # ranked by their column among [slots, listed] on ties
        columns = torch.cat([dropped_slots, torch.arange(
            slots, candidate_ids.shape[1], device=active.device).expand(rows, -1)], dim=1)
        best = columns.gather(1, top_ids(scores.gather(1, columns), num_moved, ordered=False,
                                         ids=columns))
        # a column < k is an active slot, so a dropped one: it is grown back in place
        slot_regrown = torch.zeros(rows, slots + 1, dtype=torch.bool, device=active.device)
        slot_regrown.scatter_(1, best.clamp(max=slots), True)
        return _assign(active, dropped_slots, candidate_ids.gather(1, best), best >= slots,
                       ~slot_regrown.gather(1, dropped_slots), group_size)
    keep = torch.ones_like(active, dtype=torch.bool).scatter_(1, dropped_slots, False)
    num_candidates = scores.shape[1]
    candidate_scores = scores.float().masked_fill(kept_mask(active, keep, num_candidates),
                                                  float("-inf"))
    if group_size is None:
        grown_ids = top_ids(candidate_scores, num_moved, ordered=False)
    else:
        grown_ids = _top_ids_per_group(candidate_scores, active.gather(1, dropped_slots),
                                       group_size, slots)
    dropped_ids = active.gather(1, dropped_slots)
    return _assign(active, dropped_slots, grown_ids,
                   ~_member(grown_ids, dropped_ids, num_candidates),
                   ~_member(dropped_ids, grown_ids, num_candidates), group_size)


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
            is_new: torch.Tensor, is_freed: torch.Tensor, group_size: int | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new ``grown_ids`` into the freed slots (a grown id that was just dropped
    keeps its own slot). Freed slots and new ids are matched in group order, so a new id
    lands in a slot its group freed."""
    # sort keys: (group, id) for new ids and (group, slot) for freed slots; the rest last.
    # The keys sorted to the front are distinct and the rest is never written (it is not
    # new, or not freed: a dropped slot grown back), so a plain sort is enough.
    stride, last = 1 << 31, torch.iinfo(torch.int64).max
    new_keys, freed_keys = grown_ids, dropped_slots
    if group_size:
        new_keys = grown_ids // group_size * stride + grown_ids
        freed_keys = active.gather(1, dropped_slots) // group_size * stride + dropped_slots
    new_ids = torch.where(is_new, new_keys, last).sort(dim=1).values & (stride - 1)
    freed_slots = dropped_slots.gather(1, torch.where(is_freed, freed_keys, last).argsort(dim=1))
    count_new = is_new.sum(dim=1, keepdim=True)
    position = torch.arange(grown_ids.shape[1], device=active.device)[None, :]
    write = position < count_new
    new_active = active.clone()
    current = new_active.gather(1, freed_slots)
    new_active.scatter_(1, freed_slots, torch.where(write, new_ids, current))
    grown = torch.zeros_like(active, dtype=torch.bool)
    grown.scatter_(1, freed_slots, write)
    return new_active, grown


def layerwise_salience(magnitude: torch.Tensor, row_active: torch.Tensor,
                       active_scores: torch.Tensor, listed_rows: torch.Tensor,
                       listed_scores: torch.Tensor, num_moved: int) -> torch.Tensor:
    """SRigL's salient count per row: entries in the layer-wide RigL keep set (the largest
    ``total - num_moved`` magnitudes over the active rows) plus entries in the layer-wide
    grow set (the ``num_moved`` best scores among all positions not kept).

    ``active_scores [R, k]`` are the growth scores of the slots (an ablated row's slots and
    the dropped ones are candidates too); ``listed_rows`` / ``listed_scores`` the best
    inactive positions of the layer, at least ``num_moved`` of them.
    """
    rows, slots = magnitude.shape
    total = int(row_active.sum()) * slots
    flat_magnitude = magnitude.float().masked_fill(~row_active[:, None], float("-inf"))
    # not kept: the ablated rows and the num_moved smallest of the active ones
    not_kept = top_ids(flat_magnitude.view(1, -1), rows * slots - total + num_moved,
                       largest=False, ordered=False)[0]
    keep = torch.ones(rows * slots, dtype=torch.bool, device=magnitude.device)
    keep = keep.index_fill_(0, not_kept, False).view(rows, slots)
    # grow set: the best num_moved of the slots not kept and the listed positions, ties
    # towards the lower of [slots, listed] (kept slots are out of it; they cannot be reached
    # anyway: there are num_moved or more slots not kept, and their scores are finite)
    listed = torch.arange(rows * slots, rows * slots + listed_rows.numel(),
                          device=magnitude.device)
    candidate_ids = torch.cat([not_kept, listed])
    candidate_scores = torch.cat([active_scores.float().reshape(-1)[not_kept],
                                  listed_scores.float()])
    grown = top_ids(candidate_scores[None, :], num_moved, ordered=False,
                    ids=candidate_ids[None, :])[0]
    candidate_rows = torch.cat([not_kept // slots, listed_rows])
    grown_per_row = torch.bincount(candidate_rows[grown], minlength=rows)
    return keep.sum(dim=1) + grown_per_row


def keeps_at_least(magnitude: torch.Tensor, num_moved: int, minimum: int) -> bool:
    """A sufficient test, with every row active: does each row keep at least ``minimum`` of
    its slots in the layer-wide RigL keep set (all but the ``num_moved`` smallest
    ``magnitude [R, k]``)? Then no row's salience can fall below ``minimum``.

    If ``num_moved`` magnitudes are below the smallest of the rows' ``(k - minimum + 1)``-th
    smallest, every dropped slot is below it too, so no row loses more than ``k - minimum``.
    One per-row selection and one count, against ``layerwise_salience``'s two over the layer.
    """
    rows, slots = magnitude.shape
    if num_moved == 0 or minimum <= 0:
        return True
    if minimum > slots:
        return False
    magnitude = magnitude.float()  # the minimum-th largest is the (k - minimum + 1)-th smallest
    lowest_kept = magnitude.topk(minimum, dim=1, sorted=False).values.min()
    return int((magnitude < lowest_kept).sum()) >= num_moved
