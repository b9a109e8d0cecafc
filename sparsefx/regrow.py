"""The drop-and-grow step of dynamic sparse training, as pure tensor functions.

Every pattern is handled as rows of *slots*: a row holds ``k`` distinct unit ids out of
``C`` candidates, and an update moves ``n`` of them.

For instance (each layer's ``slot_shape`` and ``num_candidates`` say it for its pattern): a
diag layer is one row of ``K`` diagonals out of ``P``, a fan-in layer ``out`` rows of ``k``
entries out of ``in`` columns (N:M: per group), an unstructured one a single row of every
kept element out of ``out * in``.

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

from sparsefx.kernels.topk import LayerPool, top_ids

__all__ = ["drop_and_grow", "kept_mask", "layerwise_drop", "rowwise_drop",
           "salience", "live_rows", "refill", "row_blocks"]

# what an update may hold at once for a block of rows scored over every candidate: the
# scores, their int32 keys, a kept mask and a few index tensors, about 16 bytes a candidate
BLOCK_BYTES = 16 << 20


def row_blocks(rows: int, slots: int, num_candidates: int, block_bytes: int = BLOCK_BYTES):
    """Slices of rows whose all-candidate scores (about 16 bytes each) fit ``block_bytes``:
    an update scores one block at a time, so that it never holds a layer's worth of them."""
    per_block = max(1, block_bytes // (16 * max(1, num_candidates)))
    for start in range(0, rows, per_block):
        yield slice(start, min(start + per_block, rows))


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


def layerwise_drop(magnitude: torch.Tensor, row_live: torch.Tensor,
                   num_dropped: int) -> torch.Tensor:
    """``[R, k]`` bool, the slots kept: all but the ``num_dropped`` smallest ``magnitude``
    over the slots of the live rows (``row_live [R]``), ties towards the lower row and slot
    dropped; a row that is not live keeps nothing. SRigL's drop (its reference's layer-wide
    rule: a row may lose anything from none to all of its entries)."""
    rows, slots = magnitude.shape
    live = row_live[:, None].expand(rows, slots)
    flat = magnitude.float().masked_fill(~live, float("inf")).reshape(1, -1)
    dropped = top_ids(flat, num_dropped, largest=False, ordered=False)[0]
    kept = live.reshape(-1).clone()
    kept[dropped] = False
    return kept.view(rows, slots)


def rowwise_drop(magnitude: torch.Tensor, row_live: torch.Tensor,
                 num_dropped: int) -> torch.Tensor:
    """``[R, k]`` bool, the slots kept: all but the ``num_dropped`` smallest ``magnitude`` of
    every live row, ties towards the lower slot dropped (sparsefx 0.1's SRigL)."""
    rows, slots = magnitude.shape
    kept = torch.ones(rows, slots, dtype=torch.bool, device=magnitude.device)
    kept.scatter_(1, top_ids(magnitude, num_dropped, largest=False, ordered=False), False)
    return kept & row_live[:, None]


def salience(kept: torch.Tensor, active: torch.Tensor, active_scores: torch.Tensor,
             listed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], in_features: int,
             num_grown: int, block: int = 256) -> torch.Tensor:
    """SRigL's salient entries per row, as its reference counts them: the union of the kept
    set ``kept [R, k]`` and the grow set, the ``num_grown`` largest scores over *every*
    position of the layer (kept ones, dropped ones, ablated rows' and inactive ones), ties
    towards the lower position ``row * in + column``.

    ``active [R, k]`` are the slots' columns and ``active_scores`` their scores; ``listed``
    the ``(scores, rows, columns)`` of the best inactive positions of the layer, at least
    ``num_grown`` of them (the best of all positions are among the slots and those).
    """
    rows = active.shape[0]
    offsets = torch.arange(0, rows * in_features, in_features, device=active.device)
    grow_set = LayerPool(num_grown)  # a block of rows at a time: a few MiB
    for start in range(0, rows, block):
        part = slice(start, min(start + block, rows))
        grow_set.add(active_scores[part].float().clone(),
                     ids=(active[part] + offsets[part, None]).view(-1))
    listed_scores, listed_rows, listed_columns = listed
    grow_set.add(listed_scores.float().clone(), ids=listed_rows * in_features + listed_columns)
    grown = grow_set.best()[0]
    kept_at = torch.zeros(rows, in_features, dtype=torch.bool, device=active.device)
    kept_at.scatter_(1, active, kept)  # a bool per weight: a quarter of a dense gradient
    new = grown[~kept_at.view(-1)[grown]]
    return kept.sum(dim=1) + torch.bincount(new // in_features, minlength=rows)


def live_rows(salient: torch.Tensor, minimum: int, fewest: int) -> torch.Tensor:
    """``[R]`` bool, the rows SRigL keeps: those with at least ``minimum`` salient entries;
    but if that would leave fewer than ``fewest`` rows, the threshold drops to the salience
    of the ``fewest``-th most salient row (its reference's rule: so at least ``fewest`` rows,
    and all rows tied with the last of them, stay)."""
    ranked = salient.sort(descending=True).values
    fewest = min(max(fewest, 1), salient.numel())
    threshold = min(minimum, int(ranked[fewest - 1]))
    return salient >= threshold


def refill(active: torch.Tensor, kept: torch.Tensor, magnitude: torch.Tensor,
           candidate_ids: torch.Tensor, candidate_scores: torch.Tensor,
           row_live: torch.Tensor, fan_in: int, num_candidates: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every live row back to ``fan_in`` entries: its kept slots (``kept [R, k]``; the
    ``fan_in`` largest ``magnitude`` of them, should it keep more), then the best-scoring of
    its dropped slots and listed candidates (``candidate_ids`` / ``candidate_scores [R, k +
    c]``, the slots first) until it holds ``fan_in``; ties towards the lower column of the
    candidate list. A row that is not live holds its old columns (more, if ``fan_in`` grew:
    the lowest it lacks) at zero.

    Returns ``(new_active [R, fan_in], source [R, fan_in])``: the new ids, and for each the
    old slot whose unit (value, optimizer state) it continues, or -1 for a new unit. A unit
    that stays keeps its slot where it can (always when ``fan_in == k``)."""
    rows, slots = active.shape
    device = active.device
    kept = kept & row_live[:, None]
    if fan_in < slots:  # fan-in shrank: a row keeps at most fan_in, the largest
        order = magnitude.float().masked_fill(~kept, float("-inf"))
        kept &= _ranks(order) < fan_in
    need = torch.where(row_live, fan_in - kept.sum(dim=1), 0)
    choosable = candidate_scores.float().clone()
    choosable[:, :slots].masked_fill_(kept, float("-inf"))
    most = int(need.max()) if rows else 0
    columns = torch.arange(candidate_ids.shape[1], device=device).expand(rows, -1)
    best = top_ids(choosable, most, ordered=True, ids=columns)
    chosen = torch.arange(most, device=device)[None, :] < need[:, None]
    regrown = torch.zeros(rows, slots + 1, dtype=torch.bool, device=device)
    regrown.scatter_(1, torch.where(chosen, best.clamp(max=slots), slots), True)
    surviving = kept | regrown[:, :slots]
    new = chosen & (best >= slots)
    new_ids = torch.where(new, candidate_ids.gather(1, best), -1)
    new_active, source = _place(active, surviving, new_ids, fan_in, num_candidates)
    return _fill_dead_rows(new_active, source, active, row_live, num_candidates)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank in its row, 0 for the largest, ties towards the lower column."""
    order = top_ids(scores, scores.shape[1], ordered=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                          .expand_as(order).contiguous())


def _place(active: torch.Tensor, surviving: torch.Tensor, new_ids: torch.Tensor,
           fan_in: int, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out each row's ``fan_in`` units: a surviving slot ``j < fan_in`` stays at ``j``;
    the positions left take the surviving slots beyond ``fan_in`` (in slot order), then the
    new ids (``new_ids``, -1 padded; ascending)."""
    rows, slots = active.shape
    device = active.device
    positions = torch.arange(fan_in, device=device).expand(rows, -1)
    stays = torch.zeros(rows, fan_in, dtype=torch.bool, device=device)
    width = min(slots, fan_in)
    stays[:, :width] = surviving[:, :width]
    new_active = torch.where(stays, _pad(active, fan_in), 0)
    source = torch.where(stays, positions, -1)
    # what fills the free positions, in order: movers by slot, then new units by id
    big = num_candidates + slots + 1
    slot_numbers = torch.arange(slots, device=device).expand(rows, -1)
    movers = surviving & (slot_numbers >= fan_in)
    keys = torch.cat([torch.where(movers, slot_numbers, big),
                      torch.where(new_ids >= 0, slots + new_ids, big)], dim=1)
    order = keys.argsort(dim=1)
    ids = torch.cat([active, new_ids], dim=1).gather(1, order)
    sources = torch.cat([slot_numbers, torch.full_like(new_ids, -1)], dim=1).gather(1, order)
    valid = keys.gather(1, order) < big
    free = torch.where(stays, fan_in + positions, positions).argsort(dim=1)
    count = min(free.shape[1], ids.shape[1])
    fill = valid[:, :count] & (torch.arange(count, device=device)[None, :]
                               < (~stays).sum(dim=1, keepdim=True))
    target = free[:, :count]
    new_active.scatter_(1, target, torch.where(fill, ids[:, :count],
                                               new_active.gather(1, target)))
    source.scatter_(1, target, torch.where(fill, sources[:, :count], source.gather(1, target)))
    return new_active, source


def _pad(active: torch.Tensor, width: int) -> torch.Tensor:
    if width <= active.shape[1]:
        return active[:, :width]
    return torch.cat([active, active.new_zeros(active.shape[0], width - active.shape[1])], 1)


def _fill_dead_rows(new_active: torch.Tensor, source: torch.Tensor, active: torch.Tensor,
                    row_live: torch.Tensor, num_candidates: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are not live: their old columns, then the lowest columns they lack."""
    dead = (~row_live).nonzero()[:, 0]
    if dead.numel() == 0:
        return new_active, source
    fan_in = new_active.shape[1]
    old = active[dead]
    held = torch.zeros(dead.numel(), num_candidates, dtype=torch.bool, device=active.device)
    held.scatter_(1, old, True)
    lacking = torch.where(~held, torch.arange(num_candidates, device=active.device),
                          num_candidates).sort(dim=1).values
    columns = torch.cat([old, lacking], dim=1)[:, :fan_in]
    new_active[dead] = columns
    source[dead] = -1
    return new_active, source
