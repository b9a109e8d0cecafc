"""``sparsefx::growth_tap``: the dense-gradient growth scores of one layer, as a gradient.

RigL-style growth ranks the *inactive* weights of a layer by the magnitude of the dense
gradient ``G = grad_out.T @ x`` -- a matrix the sparse backward never forms. At update steps
a sparse layer passes its output through this op::

    y = torch.ops.sparsefx.growth_tap(y, x, probe, structure, granularity, plan)

Forward returns a copy of ``y``. Backward passes ``grad_out`` through unchanged and returns,
as the gradient of ``probe`` (a float32 leaf owned by the DST manager), the scores growth
needs. ``G`` exists only inside this one layer's backward and is reduced before it returns,
so the dense gradients of a model never exist at once and what is kept is about the size of
the sparse layer:

* ``"diagonals"`` (``structure`` = offsets): ``probe [P]``, the L2 norm of ``G`` along each
  candidate diagonal.
* ``"rows"`` (``structure`` = fan-in ``indices [out, k]``), ``plan = [per_row, group_size,
  layer_wide]``: ``|G|`` at the ``out * k`` active entries, then the best ``per_row`` inactive
  entries of each row as ``(score, column)`` pairs, then the best ``layer_wide`` inactive
  entries of the layer as ``(score, row, column)`` triples (a list of length 0 is left out).
  With ``group_size = m > 0`` (N:M) instead: the rank of every entry within its group of
  ``m`` columns (0 the largest ``|G|``, ties towards the lower column), packed ``24 //
  bits`` ranks to a number -- all an N:M update compares, at 1/12 of ``G``'s size for 2:4.
* ``"elements"`` (``structure`` = bool ``mask [out, in]``), ``plan = [0, 0, layer_wide]``:
  ``|G|`` at the active elements (in ``mask.nonzero()`` order), then the layer-wide list.

Every probe ends with two numbers, ``[calls, non_finite]``: each call's backward adds 1 to
``calls`` (autograd sums the gradients of a layer called twice in one forward, so a shared
layer shows ``calls > 1`` and its lists, summed, mean nothing: the manager refuses it), and
``non_finite`` is NaN if ``grad_out`` or ``x`` held a NaN or an infinity (ranks carry no
NaN of their own), else 0.

A manager that knows the most units it will move per row / group / layer sizes the lists so
that every candidate it could grow is in them: the selection is then exact. Under
``torch.distributed`` (e.g. DistributedDataParallel) ``G`` is all-reduced to the mean signed
gradient of all ranks before it is scored, so every rank makes the same choice.

``listed_candidates`` parses a probe gradient; ``candidate_scores`` turns it into an
``[out, in]`` score matrix, ``-inf`` where nothing was listed. Scores reach the manager
through ``probe.grad``: the only route out of a ``torch.compile``d backward that needs
neither hooks nor a graph break.

The reduction costs about what forming ``G`` costs, not a multiple of it. ``G`` is formed a
block of rows at a time (diag: of positions along the diagonals) into a buffer of a few MiB,
and reduced there; only a layer-wide list keeps all of it, since it needs every row. The
lists are exact stable selections (ties towards the lower id, as ``topk.top_ids``) without sorts:
one int32 ``topk`` on the scores' bits, redone with the id tie-break only in rows with a tie
at the cut; per-row lists in two rounds, the best blocks of columns and then their columns;
the layer-wide list from the per-row lists, reading whole only the rows whose list it fills.
The backward runs all this as an op of its own, ``sparsefx::growth_scores``, which a
compiled backward calls rather than traces (the selections branch on the data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import patterns, topk
from .distributed import mean_over_ranks_, world_size

__all__ = ["growth_tap", "probe_size", "listed_candidates", "candidate_scores", "trailer",
           "active_count", "group_ranks", "pack_ranks", "unpack_ranks", "rank_packing",
           "Listed", "GRANULARITIES", "TRAILER"]

GRANULARITIES = ("diagonals", "rows", "elements")


TRAILER = 2  # [calls, non_finite] at the end of every probe


def active_count(structure: Tensor, granularity: str) -> int:
    """The active weights a probe lists the scores of first (diag: none)."""
    if granularity == "diagonals":
        return 0
    return structure.numel() if granularity == "rows" else int(structure.sum())


def rank_packing(group_size: int) -> tuple[int, int]:
    """``(bits, per_number)``: how within-group ranks are packed (exact in float32)."""
    bits = max(1, (group_size - 1).bit_length())
    return bits, 24 // bits


def _packed_length(in_features: int, group_size: int) -> int:
    return -(-in_features // rank_packing(group_size)[1])


def probe_size(out_features: int, in_features: int, granularity: str, plan: list[int],
               active: int) -> int:
    """Length of the probe for a layer with ``active`` active weights (diag: ``P``)."""
    if granularity == "diagonals":
        return patterns.diag_geometry(out_features, in_features)[0] + TRAILER
    per_row, group_size, layer_wide = plan
    if group_size:
        return out_features * _packed_length(in_features, group_size) + TRAILER
    return active + 2 * out_features * per_row + 3 * layer_wide + TRAILER


def _check(y: Tensor, x: Tensor, probe: Tensor, structure: Tensor, granularity: str,
           plan: list[int]) -> None:
    op = "sparsefx.growth_tap"
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity={granularity!r}: expected one of {GRANULARITIES}")
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: y has shape {tuple(y.shape)} and x {tuple(x.shape)}: expected "
                         "the same leading dims")
    if probe.dtype != torch.float32 or probe.dim() != 1:
        raise ValueError(f"{op}: probe is {probe.dtype} of shape {tuple(probe.shape)}: expected "
                         "a 1-d float32 tensor")
    if len(plan) != 3 or min(plan) < 0:
        raise ValueError(f"{op}: plan={plan}: expected 3 counts >= 0 (per_row, group_size, "
                         "layer_wide)")
    out_features, in_features = y.shape[-1], x.shape[-1]
    per_row, group_size, layer_wide = plan
    if granularity == "rows" and group_size and in_features % group_size:
        raise ValueError(f"{op}: group_size={group_size} does not divide the {in_features} "
                         "inputs")
    if granularity != "diagonals":
        active = active_count(structure, granularity)
        inactive = out_features * in_features - active
        if per_row > in_features - (active // max(1, out_features)) or layer_wide > inactive:
            raise ValueError(f"{op}: plan={plan} lists more candidates than the {inactive} "
                             f"inactive weights of a ({out_features}, {in_features}) layer "
                             "hold: size the lists to what can be listed")
    expected = probe_size(out_features, in_features, granularity, plan,
                          0 if granularity == "diagonals" else active)
    if probe.numel() != expected:
        raise ValueError(f"{op}: probe has {probe.numel()} elements: expected {expected} for "
                         f"granularity {granularity!r} of a ({out_features}, {in_features}) "
                         f"layer with plan {plan}")


@torch.library.custom_op("sparsefx::growth_tap", mutates_args=())
def growth_tap(y: Tensor, x: Tensor, probe: Tensor, structure: Tensor, granularity: str,
               plan: list[int]) -> Tensor:
    """``y`` (copied); its backward leaves the growth scores in ``probe``'s gradient."""
    _check(y, x, probe, structure, granularity, plan)
    return y.clone()


@growth_tap.register_fake
def _(y, x, probe, structure, granularity, plan):
    if granularity not in GRANULARITIES:
        raise ValueError(f"sparsefx.growth_tap: granularity={granularity!r}: expected one of "
                         f"{GRANULARITIES}")
    return torch.empty_like(y)



def _diag_gradient_norms(grad_rows: Tensor, x_rows: Tensor, block: int = 512) -> Tensor:
    """``[P]``: the L2 norm of ``G = grad_rows.T @ x_rows`` along every candidate diagonal, as
    ``patterns.diag_norms(G)`` gives it, formed and reduced ``block`` diagonal positions at a
    time in a buffer of a few MiB (no ``[out, in]`` matrix, no strided pass over it).

    Element ``t`` of diagonal ``d`` is ``G[(d + t) % out, t]`` (tall) or ``G[t, (t + d) % in]``
    (wide): ``M[t, (t + d) % P]`` with ``M [L, P]`` = ``G.T`` (tall) or ``G``. Rows
    ``t0 .. t0 + block`` of ``M`` go into the buffer rolled left by ``t0`` and continued with
    their own first columns, so that ``M[t, (t + d) % P]`` sits at ``buffer[t - t0, t - t0 +
    d]``: column ``d`` of a view with row stride ``width + 1``, summed in one streaming pass.
    Squares are exact in float64 and summed there, so the norms are correctly rounded
    (``patterns.diag_norms``' float32 sum is off by an ulp now and then).
    """
    out_features, in_features = grad_rows.shape[1], x_rows.shape[1]
    num_candidates, length = patterns.diag_geometry(out_features, in_features)
    left, right = (x_rows, grad_rows) if out_features >= in_features else (grad_rows, x_rows)
    block = min(block, length)
    width = -(-(num_candidates + block - 1) // 16) * 16  # rows 64-byte aligned
    buffer = left.new_empty(block, width)
    squares = left.new_empty(block, num_candidates, dtype=torch.float64)
    sums = squares.new_empty(num_candidates)
    sum_of_squares = torch.zeros(num_candidates, dtype=torch.float64, device=left.device)
    distributed = world_size() > 1
    for start in range(0, length, block):
        rows = min(block, length - start)
        lhs, rolled = left[:, start:start + rows].T, buffer[:rows]
        head, tail = rolled[:, :num_candidates - start], rolled[:, num_candidates - start:]
        if distributed:  # the all-reduce wants a contiguous tensor
            part = mean_over_ranks_(lhs @ right)
            head.copy_(part[:, start:])
            tail[:, :start].copy_(part[:, :start])
        else:
            torch.mm(lhs, right[:, start:], out=head)
            if start:
                torch.mm(lhs, right[:, :start], out=tail[:, :start])
        rolled[:, num_candidates:num_candidates + rows - 1] = rolled[:, :rows - 1]
        diagonals = buffer.as_strided((rows, num_candidates), (width + 1, 1))
        torch.sum(squares[:rows].copy_(diagonals).square_(), dim=0, out=sums)
        sum_of_squares += sums
    return sum_of_squares.sqrt_().float()



def growth_scores(grad_out: Tensor, x: Tensor, structure: Tensor, granularity: str,
                  plan: list[int]) -> Tensor:
    """The float32 probe gradient ``growth_tap`` hands back: see the module docstring."""
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x_rows = x.reshape(-1, x.shape[-1]).float()
    finite = torch.isfinite(grad_rows).all() & torch.isfinite(x_rows).all()
    if granularity == "diagonals":
        num_candidates = patterns.diag_geometry(grad_rows.shape[1], x_rows.shape[1])[0]
        probe_grad = grad_rows.new_empty(num_candidates + TRAILER)
        probe_grad[:num_candidates] = _diag_gradient_norms(grad_rows, x_rows)
    elif granularity == "rows":
        probe_grad = _fanin_scores(grad_rows, x_rows, structure.long(), plan)
    else:
        probe_grad = _element_scores(grad_rows, x_rows, structure, plan)
    probe_grad[-TRAILER] = 1.0
    probe_grad[-1] = torch.where(finite, 0.0, float("nan"))
    return probe_grad


def _element_scores(grad_rows: Tensor, x_rows: Tensor, mask: Tensor, plan: list[int],
                    block: int = 256) -> Tensor:
    """``growth_scores`` of an unstructured layer: ``|G|`` at the active elements, then the
    layer-wide list of the best inactive ones. ``G`` is formed ``block`` rows at a time and
    the list kept as a running pool, so that no ``[out, in]`` matrix is ever held."""
    out_features, in_features = grad_rows.shape[1], x_rows.shape[1]
    active, layer_wide = int(mask.sum()), plan[2]
    probe_grad = grad_rows.new_empty(active + 3 * layer_wide + TRAILER)
    buffer = grad_rows.new_empty(min(block, out_features), in_features)
    pool = topk.LayerPool(layer_wide)
    filled = 0
    for start in range(0, out_features, block):
        rows = slice(start, min(start + block, out_features))
        scores, block_mask = buffer[:rows.stop - start], mask[rows]
        torch.mm(grad_rows[:, rows].T, x_rows, out=scores)
        mean_over_ranks_(scores).abs_()
        count = int(block_mask.sum())
        torch.masked_select(scores, block_mask, out=probe_grad[filled:filled + count])
        filled += count
        if layer_wide:
            pool.add(scores.masked_fill_(block_mask, float("-inf")), start * in_features)
    if layer_wide:
        ids, best_scores = pool.best()
        _write_layer_list(probe_grad[active:active + 3 * layer_wide].view(-1, 3), ids,
                          best_scores, in_features)
    return probe_grad



def _fanin_scores(grad_rows: Tensor, x_rows: Tensor, columns: Tensor, plan: list[int],
                  block: int = 1024) -> Tensor:
    """``growth_scores`` of a fan-in / N:M layer (active ``columns [out, k]``), ``G`` formed
    and reduced ``block`` rows at a time: the per-row lists and the group ranks need no more,
    and each pass then runs on a few MiB that stay in cache; so does the layer-wide list,
    from the per-row lists or a running pool (``LayerPool``)."""
    out_features, in_features = grad_rows.shape[1], x_rows.shape[1]
    per_row, group_size, layer_wide = plan
    probe_grad = grad_rows.new_empty(probe_size(out_features, in_features, "rows", plan,
                                                columns.numel()))
    if group_size:
        packed = probe_grad[:-TRAILER].view(out_features, -1)
    else:
        active_size, pairs_size = columns.numel(), 2 * out_features * per_row
        active = probe_grad[:active_size].view(columns.shape)
        row_lists = probe_grad[active_size:active_size + pairs_size].view(out_features, -1, 2)
        layer_list = probe_grad[active_size + pairs_size:-TRAILER].view(-1, 3)
    # the layer-wide list comes from the per-row lists where they can hold it (rereading the
    # few rows that may hold more), else from a running pool of the blocks' best
    from_rows = layer_wide <= out_features * per_row
    pool = topk.LayerPool(layer_wide) if layer_wide and not group_size and not from_rows else None
    buffer = grad_rows.new_empty(min(block, out_features), in_features)
    for start in range(0, out_features, block):
        rows = slice(start, min(start + block, out_features))
        scores = buffer[:rows.stop - start]
        torch.mm(grad_rows[:, rows].T, x_rows, out=scores)
        mean_over_ranks_(scores).abs_()
        if group_size:
            packed[rows] = pack_ranks(group_ranks(scores, group_size), group_size)
            continue
        torch.gather(scores, 1, columns[rows], out=active[rows])
        scores.scatter_(1, columns[rows], float("-inf"))  # only inactive ones are listed
        if per_row:
            best, best_scores = topk.top_ids_per_row(scores, per_row)
            row_lists[rows, :, 0] = best_scores
            row_lists[rows, :, 1] = best
        if pool is not None:
            pool.add(scores, start * in_features)
    if layer_wide and not group_size:
        if pool is not None:
            best, best_scores = pool.best()
        else:
            def rescore(rows: Tensor) -> Tensor:  # bit for bit the loop's: its blocks again
                scores = grad_rows.new_empty(rows.numel(), in_features)
                for number in (rows // block).unique().tolist():
                    part = slice(number * block, min((number + 1) * block, out_features))
                    again = mean_over_ranks_(torch.mm(grad_rows[:, part].T, x_rows)).abs_()
                    again.scatter_(1, columns[part], float("-inf"))
                    here = rows // block == number
                    scores[here] = again[rows[here] - part.start]
                return scores

            best, best_scores = topk.layer_top_from_rows(rescore, row_lists[..., 1],
                                                     row_lists[..., 0], layer_wide, in_features)
        _write_layer_list(layer_list, best, best_scores, in_features)
    return probe_grad


def group_ranks(scores: Tensor, group_size: int) -> Tensor:
    """``[rows, in]`` int32: each entry's rank within its group of ``group_size`` consecutive
    columns, 0 for the largest score, ties towards the lower column (a stable sort)."""
    rows, in_features = scores.shape
    grouped = scores.view(rows, in_features // group_size, group_size)
    order = grouped.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    ranks.scatter_(-1, order, torch.arange(group_size, dtype=torch.int32,
                                           device=scores.device).expand_as(order).contiguous())
    return ranks.view(rows, in_features)


def pack_ranks(ranks: Tensor, group_size: int) -> Tensor:
    """``[rows, in]`` ranks packed ``rank_packing(group_size)`` to a float32 number."""
    bits, per_number = rank_packing(group_size)
    rows, in_features = ranks.shape
    numbers = -(-in_features // per_number)
    padded = ranks.new_zeros(rows, numbers * per_number)
    padded[:, :in_features] = ranks
    shifts = torch.arange(0, bits * per_number, bits, dtype=torch.int32, device=ranks.device)
    return (padded.view(rows, numbers, per_number) << shifts).sum(dim=-1).float()


def unpack_ranks(packed: Tensor, in_features: int, group_size: int) -> Tensor:
    """``pack_ranks`` undone: ``[rows, in]`` int32 ranks."""
    bits, per_number = rank_packing(group_size)
    shifts = torch.arange(0, bits * per_number, bits, dtype=torch.int32, device=packed.device)
    ranks = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return ranks.view(packed.shape[0], -1)[:, :in_features]


def _write_layer_list(layer_list: Tensor, best: Tensor, scores: Tensor,
                      in_features: int) -> None:
    """``layer_list [count, 3]`` = ``(score, row, column)`` of the flat ids ``best``."""
    layer_list[:, 0] = scores
    layer_list[:, 1] = best // in_features
    layer_list[:, 2] = best % in_features


@dataclass
class Listed:
    """A ``"rows"`` / ``"elements"`` probe gradient, parsed: ``active`` holds ``|G|`` at the
    active weights (``[out, k]`` in slot order, or ``[K]`` in ``mask.nonzero()`` order);
    ``per_row`` the ``(scores, columns) [out, per_row]`` of each row's listed inactive
    candidates (views of the probe: the columns are float32 whole numbers), and
    ``layer_wide`` the flat ``(scores, rows, columns)`` of the layer's (``None`` for a list
    the plan left out)."""

    active: Tensor
    per_row: tuple[Tensor, Tensor] | None
    layer_wide: tuple[Tensor, Tensor, Tensor] | None

    def rows(self, rows: slice) -> Listed:
        """The lists of the slot rows ``rows`` (views): per-row lists and, for a one-row
        (unstructured) layer, all of it; a layer-wide list of several rows stays whole."""
        if self.active.dim() == 1:  # "elements": one row of slots
            return self
        per_row = None if self.per_row is None else tuple(part[rows] for part in self.per_row)
        return Listed(self.active[rows], per_row, self.layer_wide)

    def row_candidates(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids, scores) [out, k + per_row]``: each row's active columns ``indices``, then
        its listed ones."""
        if self.per_row is None:  # nothing inactive was listed
            return indices.long(), self.active
        scores, columns = self.per_row
        return (torch.cat([indices.long(), columns.long()], dim=1),
                torch.cat([self.active, scores], dim=1))

    def layer_candidates(self, flat_active: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
        """``(ids, scores) [1, K + layer_wide]`` as flat ids ``row * in + column``: the active
        elements ``flat_active [1, K]``, then the listed ones."""
        if self.layer_wide is None:
            return flat_active, self.active.view(1, -1)
        scores, rows, cols = self.layer_wide
        return (torch.cat([flat_active, (rows * in_features + cols)[None, :]], dim=1),
                torch.cat([self.active.view(1, -1), scores[None, :]], dim=1))


def trailer(probe_grad: Tensor) -> Tensor:
    """``[calls, non_finite]`` of a probe gradient (see the module docstring)."""
    return probe_grad[-TRAILER:]


def listed_candidates(probe_grad: Tensor, structure: Tensor, granularity: str,
                      plan: list[int], out_features: int, in_features: int) -> Listed:
    """The lists of a ``"rows"`` (not N:M) or ``"elements"`` probe gradient."""
    per_row, group_size, layer_wide = plan
    if granularity not in ("rows", "elements") or group_size:
        raise ValueError(f"listed_candidates: a {granularity!r} probe with plan {plan} "
                         "holds no candidate lists")
    active = active_count(structure, granularity)
    scores = probe_grad[:active]
    if granularity == "rows":
        scores = scores.view(structure.shape)
    pairs_end = active + 2 * out_features * per_row
    row_lists = None
    if per_row:
        pairs = probe_grad[active:pairs_end].view(out_features, per_row, 2)
        row_lists = pairs[..., 0], pairs[..., 1]  # columns as whole float32 numbers
    layer_lists = None
    if layer_wide:
        triples = probe_grad[pairs_end:pairs_end + 3 * layer_wide].view(-1, 3)
        layer_lists = triples[:, 0], triples[:, 1].long(), triples[:, 2].long()
    return Listed(scores, row_lists, layer_lists)


def candidate_scores(probe_grad: Tensor, structure: Tensor, granularity: str, plan: list[int],
                     out_features: int, in_features: int,
                     rows: slice | None = None) -> Tensor:
    """``[out, in]`` float32 scores from a ``"rows"`` / ``"elements"`` probe gradient (only
    ``rows`` of them, if given): the listed candidates and the active weights carry their
    ``|G|``, the rest ``-inf``; an N:M probe gives ``group_size - rank`` within each group,
    which orders every group's entries as ``|G|`` does (all an N:M update compares)."""
    rows = slice(0, out_features) if rows is None else rows
    group_size = plan[1]
    if group_size:
        packed = probe_grad[:-TRAILER].view(out_features, -1)[rows]
        return (group_size - unpack_ranks(packed, in_features, group_size)).float()
    listed = listed_candidates(probe_grad, structure, granularity, plan, out_features,
                               in_features)
    scores = torch.full((out_features, in_features), float("-inf"), device=probe_grad.device)
    if listed.per_row is not None:
        row_scores, columns = listed.per_row
        scores.scatter_(1, columns.long(), row_scores)
    if listed.layer_wide is not None:
        layer_scores, layer_rows, columns = listed.layer_wide
        scores[layer_rows, columns] = layer_scores
    if granularity == "rows":
        scores.scatter_(1, structure.long(), listed.active)
    else:
        scores[structure] = listed.active
    return scores[rows]


@torch.library.custom_op("sparsefx::growth_scores", mutates_args=())
def _growth_scores_op(grad_out: Tensor, x: Tensor, structure: Tensor, granularity: str,
                      plan: list[int], size: int) -> Tensor:
    """``growth_scores`` as an op of its own, so that a compiled backward calls it rather than
    tracing it: its exact selections branch on the data (rows with tied scores, full rows)."""
    return growth_scores(grad_out, x, structure, granularity, plan)


@_growth_scores_op.register_fake
def _(grad_out, x, structure, granularity, plan, size):
    return grad_out.new_empty(size, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, x, probe, structure, granularity, plan = inputs
    ctx.save_for_backward(x, structure)
    ctx.granularity, ctx.plan, ctx.probe_size = granularity, plan, probe.numel()


def _backward(ctx, grad_out):
    x, structure = ctx.saved_tensors
    scores = (torch.ops.sparsefx.growth_scores(grad_out, x, structure, ctx.granularity,
                                               ctx.plan, ctx.probe_size)
              if ctx.needs_input_grad[2] else None)
    return grad_out, None, scores, None, None, None


growth_tap.register_autograd(_backward, setup_context=_setup_context)
