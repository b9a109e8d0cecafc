"""Exact stable top-k selection: what a stable sort gives (ties towards the lower id), at the
cost of ``topk``. The growth tap ranks its candidate lists with it, and DST's methods their
drops and grows.

* ``top_ids``: the ``count`` best of float32 scores along the last dim.
* ``stable_top``: the same on int32 keys (the scores' bits made monotone), with ids to break
  ties in place of positions.
* ``top_ids_per_row`` / ``layer_top_from_rows``: per-row and layer-wide lists of ``[out,
  in]`` scores that are ``>= 0`` or ``-inf`` (``|G|`` masked), in two rounds where it pays.
* ``LayerPool``: the ``count`` best of scores offered a block at a time.

Each is exact: one int32 ``topk`` finds the set unless it had to choose among keys equal to
its cut, and only such rows are ranked again on int64 keys (key high, reversed id low).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_ids", "stable_top", "wide_keys", "top_ids_per_row", "layer_top_from_rows",
           "LayerPool"]


def top_ids(scores: Tensor, count: int, largest: bool = True, ordered: bool = True,
            ids: Tensor | None = None) -> Tensor:
    """Positions of the ``count`` largest (or smallest) float32 ``scores`` along the last dim,
    ties towards the lower id: what a stable sort gives, at the cost of ``topk``. Best first
    if ``ordered``; otherwise the same set in no particular order. ``ids`` (int64, shaped
    like ``scores``, each ``< 2**32``) ranks ties in place of the position.

    Each score becomes an int32 key, its bits made monotone (the usual float-to-int order
    trick: -0.0 sorts just below 0.0, NaN by its bits), and ``stable_top`` ranks the keys.
    """
    bits = scores.float().contiguous().view(torch.int32)
    keys = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
    if not largest:
        keys.bitwise_not_()
    return stable_top(keys, count, ordered, ids)[0]


_INT32_MIN = torch.iinfo(torch.int32).min


def stable_top(keys: Tensor, count: int, ordered: bool = False, ids=None,
                scratch: bool = False) -> tuple[Tensor, Tensor]:
    """Positions of the ``count`` largest int32 ``keys`` along the last dim, ties towards the
    lower id, and the keys there. Best first if ``ordered``. ``ids`` rank ties in place of
    the position: int64 shaped like ``keys``, or a function of row numbers giving those
    rows' ids (not with ``ordered``). ``keys`` is used as scratch, and restored unless
    ``scratch``.

    One int32 ``topk`` finds the set unless it had to choose among keys equal to the
    smallest it kept (an exact tie at the cut, rare for gradients and magnitudes except in
    rows that are all zero): a row where a key left out equals that cut is redone on int64
    keys (key high, reversed id low), which cost about twice as much to build and rank.
    """
    shape, width = keys.shape, keys.shape[-1]
    if count == 0 or keys.numel() == 0:
        return (torch.zeros(*shape[:-1], count, dtype=torch.int64, device=keys.device),
                torch.zeros(*shape[:-1], count, dtype=keys.dtype, device=keys.device))
    keys = keys.view(-1, width)
    if torch.is_tensor(ids):
        ids = ids.reshape(-1, width)
    values, best = keys.topk(count, dim=-1, sorted=False)
    if count < width:
        cut = values.amin(dim=-1)
        keys.scatter_(1, best, _INT32_MIN)  # a key equal to _INT32_MIN can only add rows
        tied = keys.amax(dim=-1) == cut
        if not scratch:
            keys.scatter_(1, best, values)
        if bool(tied.any()):
            rows = tied.nonzero()[:, 0]
            tied_keys = keys[rows]
            if scratch:
                tied_keys.scatter_(1, best[rows], values[rows])
            tied_ids = None if ids is None else ids(rows) if callable(ids) else ids[rows]
            best[rows] = wide_keys(tied_keys, tied_ids).topk(count, dim=-1,
                                                              sorted=False).indices
            values[rows] = tied_keys.gather(1, best[rows])
    if ordered:
        chosen = best if ids is None else ids.gather(1, best)
        order = wide_keys(values, chosen).argsort(dim=-1, descending=True)
        best, values = best.gather(1, order), values.gather(1, order)
    return best.view(*shape[:-1], count), values.view(*shape[:-1], count)


def wide_keys(keys: Tensor, ids: Tensor | None = None) -> Tensor:
    """int64 keys: the int32 ``keys`` high, the reversed ``ids`` (default: positions; all
    ``< 2**32``) low, so that equal keys rank the lower id first."""
    if ids is None:
        ids = torch.arange(keys.shape[-1], device=keys.device)
    return (keys.to(torch.int64) << 32) | (0xFFFFFFFF - ids)

def top_ids_per_row(scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``top_ids(scores, count, ordered=False)`` for ``[out, in]`` scores that are ``>= 0``,
    ``-inf`` or NaN with the sign bit clear (``|G|`` with entries masked to ``-inf``): their
    float32 bits are already monotone int32 keys. Returns the ids and the scores there.

    Where it pays, in two rounds on fewer keys: the ``count`` best blocks of ``block``
    consecutive columns by their best key, then the best ``count`` of those blocks' columns.
    Exact: each of the ``count`` best entries lies in a block whose best entry is at least as
    good, so among the ``count`` best blocks (equal blocks ranked by their lower columns).
    """
    keys = scores.view(torch.int32)
    rows, in_features = keys.shape
    block = _block_size(in_features, count)
    if block == 1:
        best, values = stable_top(keys, count)
        return best, values.view(torch.float32)
    grouped = keys.view(rows, -1, block)
    blocks = stable_top(grouped.amax(dim=-1), count, scratch=True)[0]
    candidates = grouped.gather(1, blocks[:, :, None].expand(-1, -1, block)).view(rows, -1)
    offsets = torch.arange(block, device=keys.device)
    columns = lambda some: (blocks[some, :, None] * block + offsets).view(len(some), -1)
    picked, values = stable_top(candidates, count, ids=columns, scratch=True)
    return blocks.gather(1, picked // block) * block + picked % block, values.view(torch.float32)


def _block_size(width: int, count: int) -> int:
    """The block that minimises the keys ranked, ``width / block + count * block``; 1 (one
    round) unless that is under 60 % of ``width``."""
    best, ranked = 1, 0.6 * width
    for block in (2, 4, 8, 16):
        if width % block == 0 and width // block + count * block < ranked:
            best, ranked = block, width // block + count * block
    return best


def layer_top_from_rows(rescore, row_best: Tensor, row_scores: Tensor, count: int,
                         in_features: int, block: int = 256) -> tuple[Tensor, Tensor]:
    """``top_ids(scores.view(-1), count, ordered=False)`` (flat ids), and the scores there,
    for the ``[out, in]`` scores of ``top_ids_per_row``, given its ids ``row_best [out, c]``
    of each row's ``c`` best (int64, or float32 holding whole numbers), the scores there,
    and ``rescore(rows)``: the scores of the rows ``rows`` (read only where a row may hold
    more than it listed). Everything is read ``block`` rows at a time: the scores are never
    needed whole, nor the lists as int64.

    Exact, not a heuristic: let ``S`` be the best ``count`` of the listed entries. If a row
    had a better entry than ``S`` holds that is not listed, all ``c`` of its listed entries
    would be better still, and in ``S``. So a row with fewer than ``c`` entries in ``S`` lost
    nothing, and the answer is ``S`` unless some rows are full. Those (rows with outsized
    gradients) are then read whole, keeping only entries at least as good as the worst of
    ``S`` (the answer's worst can only be better), and the best ``count`` of those and
    ``S``'s entries from other rows is the answer: a row not full in ``S`` lost nothing.
    """
    out_features, slots = row_best.shape
    offsets = torch.arange(0, out_features * in_features, in_features, device=row_best.device)
    listed = LayerPool(count)
    for start in range(0, out_features, block):  # a block of rows at a time: a few MiB
        part = slice(start, min(start + block, out_features))
        listed.add(row_scores[part].clone(),
                   ids=(row_best[part].to(torch.int64) + offsets[part, None]).view(-1))
    best_ids, best_keys = listed.ids, listed.keys
    best_rows = best_ids // in_features
    full = torch.bincount(best_rows, minlength=out_features) == slots
    if not bool(full.any()):
        return best_ids, best_keys.view(torch.float32)
    cut = best_keys.amin()
    elsewhere = ~full[best_rows]
    pool_keys, pool_ids = [best_keys[elsewhere]], [best_ids[elsewhere]]
    full_rows = full.nonzero()[:, 0]
    for start in range(0, full_rows.numel(), block):
        rows = full_rows[start:start + block]
        whole_keys = rescore(rows).view(torch.int32).view(-1)
        good = (whole_keys >= cut).nonzero()[:, 0]  # ties at the cut: ids decide
        pool_keys.append(whole_keys[good])
        pool_ids.append(rows[good // in_features] * in_features + good % in_features)
    pool_keys, pool_ids = torch.cat(pool_keys), torch.cat(pool_ids)
    best, best_keys = stable_top(pool_keys[None, :], count, ids=pool_ids[None, :])
    return pool_ids[best[0]], best_keys[0].view(torch.float32)

class LayerPool:
    """The ``count`` largest of scores seen a block at a time, ties towards the lower flat
    id: what ``top_ids`` over all of them gives, holding at most ``2 * count`` at once.
    Scores must be ``>= 0``, ``-inf`` or NaN with the sign bit clear (their float32 bits are
    then monotone int32 keys)."""

    def __init__(self, count: int):
        self.count = count
        self.keys: Tensor | None = None
        self.ids: Tensor | None = None

    def add(self, scores: Tensor, first_id: int = 0, ids: Tensor | None = None) -> None:
        """Offer ``scores`` (any shape; used as scratch), whose flat ids are ``ids`` (int64,
        one per score), or run on from ``first_id``."""
        keys = scores.reshape(-1).view(torch.int32)
        best, best_keys = stable_top(keys[None, :], min(self.count, keys.numel()),
                                      ids=None if ids is None else ids[None, :], scratch=True)
        best_ids = best[0] + first_id if ids is None else ids[best[0]]
        if self.keys is None:
            self.keys, self.ids = best_keys[0], best_ids
            return
        keys, ids = torch.cat([self.keys, best_keys[0]]), torch.cat([self.ids, best_ids])
        if keys.numel() > self.count:
            best, best_keys = stable_top(keys[None, :], self.count, ids=ids[None, :])
            keys, ids = best_keys[0], ids[best[0]]
        self.keys, self.ids = keys, ids

    def best(self) -> tuple[Tensor, Tensor]:
        """``(flat ids, scores)`` of the ``count`` best, in no particular order."""
        return self.ids, self.keys.view(torch.float32)
