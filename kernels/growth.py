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

* ``"diag"`` (``structure`` = offsets): ``probe [P]``, the L2 norm of ``G`` along each
  candidate diagonal.
* ``"rows"`` (``structure`` = fan-in ``indices [out, k]``), ``plan = [per_row, per_group,
  group_size, layer_wide]``: ``|G|`` at the ``out * k`` active entries, then candidate lists
  of inactive entries as ``(score, row, column)`` triples: the best ``per_row`` of each row,
  the best ``per_group`` of each group of ``group_size`` columns, the best ``layer_wide`` of
  the layer (a list of length 0 is left out).
* ``"elements"`` (``structure`` = bool ``mask [out, in]``), ``plan = [0, 0, 0, layer_wide]``:
  ``|G|`` at the active elements (in ``mask.nonzero()`` order), then the layer-wide list.

A manager that knows the most units it will move per row / group / layer sizes the lists so
that every candidate it could grow is in them: the selection is then exact. Under
``torch.distributed`` (e.g. DistributedDataParallel) ``G`` is all-reduced to the mean signed
gradient of all ranks before it is scored, so every rank makes the same choice.

``listed_candidates`` parses a probe gradient; ``candidate_scores`` turns it into an
``[out, in]`` score matrix, ``-inf`` where nothing was listed. Scores reach the manager
through ``probe.grad``: the only route out of a ``torch.compile``d backward that needs
neither hooks nor a graph break.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import patterns

__all__ = ["growth_tap", "probe_size", "listed_candidates", "candidate_scores", "top_ids",
           "Listed", "GRANULARITIES"]

GRANULARITIES = ("diag", "rows", "elements")


def _active_count(structure: Tensor, granularity: str) -> int:
    return structure.numel() if granularity == "rows" else int(structure.sum())


def _list_lengths(out_features: int, in_features: int, plan: list[int]) -> list[int]:
    per_row, per_group, group_size, layer_wide = plan
    groups = in_features // group_size if group_size else 0
    return [out_features * per_row, out_features * groups * per_group, layer_wide]


def probe_size(out_features: int, in_features: int, granularity: str, plan: list[int],
               active: int) -> int:
    """Length of the probe for a layer with ``active`` active weights (diag: ``P``)."""
    if granularity == "diag":
        return patterns.diag_geometry(out_features, in_features)[0]
    return active + 3 * sum(_list_lengths(out_features, in_features, plan))


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
    if len(plan) != 4 or min(plan) < 0:
        raise ValueError(f"{op}: plan={plan}: expected 4 counts >= 0")
    out_features, in_features = y.shape[-1], x.shape[-1]
    if granularity == "diag":
        expected = probe_size(out_features, in_features, granularity, plan, 0)
    else:
        expected = probe_size(out_features, in_features, granularity, plan,
                              _active_count(structure, granularity))
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


def _world_size() -> int:
    distributed = torch.distributed
    return (distributed.get_world_size()
            if distributed.is_available() and distributed.is_initialized() else 1)


def top_ids(scores: Tensor, count: int, largest: bool = True, ordered: bool = True) -> Tensor:
    """Ids of the ``count`` largest (or smallest) float32 ``scores`` along the last dim, ties
    towards the lower id: what a stable sort gives, at the cost of ``topk``. Best first if
    ``ordered``; otherwise the same set in no particular order (about 2x faster).

    Each score becomes one int64 key: its bits made monotone (the usual float-to-int order
    trick) in the high half, the reversed id in the low half.
    """
    bits = scores.float().contiguous().view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    if not largest:
        monotone = ~monotone
    width = scores.shape[-1]
    reversed_ids = torch.arange(width - 1, -1, -1, device=scores.device, dtype=torch.int64)
    keys = (monotone.to(torch.int64) << 32) | reversed_ids
    return keys.topk(count, dim=-1, sorted=ordered).indices


def _triples(scores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return torch.stack([scores.reshape(-1), rows.reshape(-1).float(), cols.reshape(-1).float()],
                       dim=1).reshape(-1)


def growth_scores(grad_out: Tensor, x: Tensor, structure: Tensor, granularity: str,
                  plan: list[int]) -> Tensor:
    """The float32 probe gradient ``growth_tap`` hands back: see the module docstring."""
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x_rows = x.reshape(-1, x.shape[-1]).float()
    dense_grad = grad_rows.T @ x_rows  # this layer's only dense matrix
    world = _world_size()
    if world > 1:  # data parallel: score the mean signed gradient, as every rank will
        torch.distributed.all_reduce(dense_grad)
        dense_grad /= world
    scores = dense_grad.abs_()
    if granularity == "diag":
        return patterns.diag_norms(scores)
    out_features, in_features = scores.shape
    row_ids = torch.arange(out_features, device=scores.device)
    if granularity == "rows":
        columns = structure.long()
        parts = [scores.gather(1, columns).reshape(-1)]
        inactive = scores.scatter(1, columns, float("-inf"))
    else:
        parts = [scores[structure]]
        inactive = scores.masked_fill(structure, float("-inf"))
    per_row, per_group, group_size, layer_wide = plan
    if per_row:
        best = top_ids(inactive, per_row, ordered=False)
        parts.append(_triples(inactive.gather(1, best), row_ids[:, None].expand_as(best), best))
    if per_group:
        grouped = inactive.view(out_features, in_features // group_size, group_size)
        best = top_ids(grouped, per_group, ordered=False)
        first = torch.arange(0, in_features, group_size, device=scores.device)[None, :, None]
        parts.append(_triples(grouped.gather(2, best), row_ids[:, None, None].expand_as(best),
                              best + first))
    if layer_wide:
        best = top_ids(inactive.view(-1), layer_wide, ordered=False)
        parts.append(_triples(inactive.view(-1)[best], best // in_features, best % in_features))
    return torch.cat(parts)


@dataclass
class Listed:
    """A ``"rows"`` / ``"elements"`` probe gradient, parsed: ``active`` holds ``|G|`` at the
    active weights (``[out, k]`` in slot order, or ``[K]`` in ``mask.nonzero()`` order);
    ``per_row``, ``per_group`` and ``layer_wide`` the ``(scores, rows, columns)`` of the
    listed inactive candidates, flat (``None`` for a list the plan left out)."""

    active: Tensor
    per_row: tuple[Tensor, Tensor, Tensor] | None
    per_group: tuple[Tensor, Tensor, Tensor] | None
    layer_wide: tuple[Tensor, Tensor, Tensor] | None

    def row_candidates(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids, scores) [out, k + per_row]``: each row's active columns ``indices``, then
        its listed ones."""
        scores, _, cols = self.per_row
        rows = indices.shape[0]
        return (torch.cat([indices.long(), cols.view(rows, -1)], dim=1),
                torch.cat([self.active, scores.view(rows, -1)], dim=1))

    def layer_candidates(self, flat_active: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
        """``(ids, scores) [1, K + layer_wide]`` as flat ids ``row * in + column``: the active
        elements ``flat_active [1, K]``, then the listed ones."""
        scores, rows, cols = self.layer_wide
        return (torch.cat([flat_active, (rows * in_features + cols)[None, :]], dim=1),
                torch.cat([self.active.view(1, -1), scores[None, :]], dim=1))


def listed_candidates(probe_grad: Tensor, structure: Tensor, granularity: str,
                      plan: list[int], out_features: int, in_features: int) -> Listed:
    active = _active_count(structure, granularity)
    parts, start = [], active
    for length in _list_lengths(out_features, in_features, plan):
        triples = probe_grad[start:start + 3 * length].view(-1, 3)
        start += 3 * length
        parts.append((triples[:, 0], triples[:, 1].long(), triples[:, 2].long())
                     if length else None)
    scores = probe_grad[:active]
    if granularity == "rows":
        scores = scores.view(structure.shape)
    return Listed(scores, *parts)


def candidate_scores(probe_grad: Tensor, structure: Tensor, granularity: str,
                     out_features: int, in_features: int) -> Tensor:
    """``[out, in]`` float32 scores from a ``"rows"`` / ``"elements"`` probe gradient: the
    listed candidates and the active weights carry their ``|G|``, the rest ``-inf``."""
    scores = torch.full((out_features, in_features), float("-inf"), device=probe_grad.device)
    active = _active_count(structure, granularity)
    triples = probe_grad[active:].view(-1, 3)
    listed = triples[:, 0] > float("-inf")
    rows, cols = triples[listed, 1].long(), triples[listed, 2].long()
    scores[rows, cols] = triples[listed, 0]
    if granularity == "rows":
        scores.scatter_(1, structure.long(), probe_grad[:active].view(out_features, -1))
    else:
        scores[structure] = probe_grad[:active]
    return scores


def _setup_context(ctx, inputs, output):
    _, x, _, structure, granularity, plan = inputs
    ctx.save_for_backward(x, structure)
    ctx.granularity, ctx.plan = granularity, plan


def _backward(ctx, grad_out):
    x, structure = ctx.saved_tensors
    scores = (growth_scores(grad_out, x, structure, ctx.granularity, ctx.plan)
              if ctx.needs_input_grad[2] else None)
    return grad_out, None, scores, None, None, None


growth_tap.register_autograd(_backward, setup_context=_setup_context)
