"""``sparsefx::growth_tap``: the growth scores a sparse layer hands the DST manager through a
probe's gradient. The compact candidate lists must select exactly what the full dense
gradient ``|G|`` selects, for every move the manager can make."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefx import regrow
from sparsefx.kernels import growth, patterns


def _tap_gradient(out_features, in_features, structure, granularity, plan, seed):
    """Run the op forward and backward; return (probe.grad, |G| in float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, in_features, generator=generator)
    grad_out = torch.randn(5, out_features, generator=generator)
    active = structure.numel() if granularity == "rows" else int(structure.sum())
    size = growth.probe_size(out_features, in_features, granularity, plan, active)
    probe = torch.zeros(1).expand(size).requires_grad_(True)
    y0 = torch.randn(5, out_features, requires_grad=True)
    y = torch.ops.sparsefx.growth_tap(y0, x, probe, structure, granularity, plan)
    assert torch.equal(y, y0)
    y.backward(grad_out)
    assert torch.equal(y0.grad, grad_out), "the tap passes the gradient through unchanged"
    exact = (grad_out.double().T @ x.double()).abs()
    # the selections below compare against |G| as the op computes it (float32), so that a
    # near-tie rounded differently cannot flip a choice; it agrees with float64 to rounding
    dense = (grad_out.T @ x).abs()
    torch.testing.assert_close(dense.double(), exact, rtol=1e-5, atol=1e-5)
    return probe.grad, dense


@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24),
       seed=st.integers(0, 2**16))
def test_diag_scores_are_gradient_norms_along_every_candidate(out_features, in_features, seed):
    offsets = torch.tensor([0])
    scores, dense = _tap_gradient(out_features, in_features, offsets, "diagonals",
                                  [0, 0, 0, 0], seed)
    torch.testing.assert_close(scores, patterns.diag_norms(dense), rtol=1e-5, atol=1e-6)


@given(out_features=st.integers(1, 12), in_features=st.integers(2, 24),
       density=st.floats(0.05, 0.95), alpha=st.sampled_from([0.1, 0.3, 0.6, 1.0]),
       srigl=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_fanin_lists_select_exactly_what_the_dense_gradient_selects(
        out_features, in_features, density, alpha, srigl, seed, data):
    generator = torch.Generator().manual_seed(seed)
    fan_in = max(1, round(density * in_features))
    indices = patterns.random_fanin_indices(out_features, in_features, fan_in, generator)
    most = math.ceil(alpha * fan_in)
    plan = ([fan_in, 0, 0, min(math.ceil(alpha * indices.numel()), out_features * in_features)]
            if srigl else [most, 0, 0, 0])
    probe_grad, dense = _tap_gradient(out_features, in_features, indices, "rows", plan, seed)
    listed = growth.listed_candidates(probe_grad, indices, "rows", plan, out_features,
                                      in_features)
    assert torch.equal(listed.active, dense.gather(1, indices.long()))
    candidate_ids, scores = listed.row_candidates(indices)
    magnitude = torch.rand(out_features, fan_in, generator=generator)
    moved = data.draw(st.integers(0, min(most, fan_in)))
    exact = regrow.drop_and_grow(indices.long(), magnitude, dense, moved)
    compact = regrow.drop_and_grow(indices.long(), magnitude, scores, moved,
                                   candidate_ids=candidate_ids)
    _assert_same_selection(exact, compact)
    if srigl:
        row_active = torch.rand(out_features, generator=generator) > 0.3
        total = round(alpha * int(row_active.sum()) * fan_in)
        listed_scores, listed_rows, _ = listed.layer_wide
        assert torch.equal(
            _dense_salience(magnitude, indices.long(), dense, row_active, total),
            regrow.layerwise_salience(magnitude, row_active, listed.active, listed_rows,
                                      listed_scores, total))
        # a revived row takes its best k columns: of its slots and its listed ones
        best = growth.top_ids(scores, fan_in)
        assert torch.equal(candidate_ids.gather(1, best).sort(1)[0],
                           dense.argsort(dim=1, descending=True, stable=True)[:, :fan_in]
                           .sort(1)[0])


def _dense_salience(magnitude, indices, dense, row_active, moved):
    """SRigL's salient counts straight from the definition, on the full |G|."""
    rows, slots = indices.shape
    total = int(row_active.sum()) * slots
    flat = magnitude.masked_fill(~row_active[:, None], float("-inf")).view(-1)
    keep = torch.zeros(rows * slots, dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:total - moved]] = True
    keep = keep.view(rows, slots)
    not_kept = dense.clone()
    for row in range(rows):
        not_kept[row, indices[row][keep[row]]] = float("-inf")
    grow = torch.zeros(dense.numel(), dtype=torch.bool)
    grow[not_kept.view(-1).argsort(descending=True, stable=True)[:moved]] = True
    return keep.sum(dim=1) + grow.view_as(dense).sum(dim=1)


@given(out_features=st.integers(1, 10), groups=st.integers(1, 5),
       nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (1, 2)]),
       alpha=st.sampled_from([0.1, 0.3, 1.0]), seed=st.integers(0, 2**16), data=st.data())
def test_nm_lists_select_exactly_what_the_dense_gradient_selects(out_features, groups, nm,
                                                                 alpha, seed, data):
    n, m = nm
    in_features = groups * m
    generator = torch.Generator().manual_seed(seed)
    indices = patterns.random_nm_indices(out_features, in_features, n, m, generator)
    fan_in = indices.shape[1]
    most = math.ceil(alpha * fan_in)
    plan = [0, min(n, most), m, 0]
    probe_grad, dense = _tap_gradient(out_features, in_features, indices, "rows", plan, seed)
    scores = growth.candidate_scores(probe_grad, indices, "rows", out_features, in_features)
    magnitude = torch.rand(out_features, fan_in, generator=generator)
    moved = data.draw(st.integers(0, min(most, fan_in)))
    exact = regrow.drop_and_grow(indices.long(), magnitude, dense, moved, m)
    compact = regrow.drop_and_grow(indices.long(), magnitude, scores, moved, m)
    _assert_same_selection(exact, compact)
    patterns.check_nm_indices(compact[0], in_features, n, m)


@given(out_features=st.integers(1, 12), in_features=st.integers(1, 12),
       density=st.floats(0.05, 0.95), alpha=st.sampled_from([0.1, 0.3, 1.0]),
       seed=st.integers(0, 2**16), data=st.data())
def test_element_lists_select_exactly_what_the_dense_gradient_selects(
        out_features, in_features, density, alpha, seed, data):
    generator = torch.Generator().manual_seed(seed)
    total = out_features * in_features
    kept = max(1, round(density * total))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:kept]] = True
    mask = mask.view(out_features, in_features)
    plan = [0, 0, 0, min(math.ceil(alpha * kept), total)]
    probe_grad, dense = _tap_gradient(out_features, in_features, mask, "elements", plan, seed)
    listed = growth.listed_candidates(probe_grad, mask, "elements", plan, out_features,
                                      in_features)
    active = mask.view(1, -1).nonzero()[:, 1][None, :]
    candidate_ids, scores = listed.layer_candidates(active, in_features)
    magnitude = torch.rand(1, kept, generator=generator)
    moved = data.draw(st.integers(0, min(plan[3], kept)))
    exact = regrow.drop_and_grow(active, magnitude, dense.view(1, -1), moved)
    compact = regrow.drop_and_grow(active, magnitude, scores, moved, candidate_ids=candidate_ids)
    _assert_same_selection(exact, compact)


def _assert_same_selection(exact, compact):
    assert torch.equal(exact[0], compact[0]) and torch.equal(exact[1], compact[1])


@given(rows=st.integers(1, 4), columns=st.integers(1, 40), seed=st.integers(0, 2**16),
       largest=st.booleans(), data=st.data())
def test_top_ids_is_a_stable_sort(rows, columns, seed, largest, data):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values (many ties), signed zeros, infinities
    choices = torch.tensor([0.0, -0.0, 1.5, -2.0, 3.0, float("inf"), float("-inf"), 1e-30])
    scores = choices[torch.randint(0, len(choices), (rows, columns), generator=generator)]
    count = data.draw(st.integers(0, columns))
    expected = scores.argsort(dim=1, descending=largest, stable=True)[:, :count]
    got = growth.top_ids(scores, count, largest=largest)
    # -0.0 and 0.0 compare equal for the sort; the keys order -0.0 below 0.0
    same = torch.gather(scores, 1, got) == torch.gather(scores, 1, expected)
    assert bool(same.all())
    exact = (scores != 0).all(dim=1)
    assert torch.equal(got[exact], expected[exact])


def test_the_lists_are_about_the_size_of_the_sparse_layer():
    # fan-in at 90 %, alpha 0.3: active scores plus 3 numbers per listed candidate
    out_features, in_features = 512, 512
    fan_in = patterns.fanin_num_kept(in_features, 0.9)
    plan = [math.ceil(0.3 * fan_in), 0, 0, 0]
    size = growth.probe_size(out_features, in_features, "rows", plan, out_features * fan_in)
    assert size < 2 * out_features * fan_in < 0.25 * out_features * in_features


@pytest.mark.parametrize("granularity,structure,plan", [
    ("diagonals", torch.tensor([0, 3]), [0, 0, 0, 0]),
    ("rows", torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16), [1, 0, 0, 2]),
    ("elements", torch.tensor([[True, False, False, True]] * 3), [0, 0, 0, 2]),
])
def test_opcheck(granularity, structure, plan):
    active = structure.numel() if granularity == "rows" else int(structure.sum())
    size = growth.probe_size(3, 4, granularity, plan, active)
    probe = torch.zeros(size, requires_grad=True)
    y = torch.randn(2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsefx.growth_tap.default,
                          (y, torch.randn(2, 4), probe, structure, granularity, plan))


def test_bad_probe_raises():
    probe = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match="probe has 5 elements: expected 4"):
        torch.ops.sparsefx.growth_tap(torch.randn(2, 3), torch.randn(2, 4), probe,
                                      torch.tensor([0]), "diagonals", [0, 0, 0, 0])
    with pytest.raises(ValueError, match="granularity='rowz'"):
        torch.ops.sparsefx.growth_tap(torch.randn(2, 3), torch.randn(2, 4), probe,
                                      torch.tensor([0]), "rowz", [0, 0, 0, 0])


# ------------------------------------------------ the fast selections against plain sorts
#
# growth_scores avoids sorting: int32 topk on the scores' bits (redone with the id tie-break
# in rows with a tie at the cut), per-row lists in two rounds, the layer-wide list from the
# per-row lists. Each must pick exactly what a stable sort picks, ties and all: scores drawn
# from a few values, rows of zeros (a dead unit's gradient), rows with outsized scores.


def _tied_scores(rows, columns, generator, kind):
    """Non-negative scores or -inf (the domain of |G| with the active entries masked)."""
    scores = torch.rand(rows, columns, generator=generator)
    if kind == "ties":
        scores = (scores * 3).floor()
    elif kind == "zero rows":
        scores[torch.rand(rows, generator=generator) < 0.5] = 0.0
    elif kind == "loud rows":
        scores *= 1 + 100 * (torch.rand(rows, 1, generator=generator) < 0.2)
    masked = torch.rand(rows, columns, generator=generator) < 0.2
    return scores.masked_fill(masked, float("-inf"))


def _stable_top_set(scores, count):
    """Ids of the ``count`` largest along the last dim by a stable sort, ascending."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :count].sort(-1).values


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), columns=st.sampled_from([16, 48, 64, 96, 128]),
       kind=st.sampled_from(["random", "ties", "zero rows", "loud rows"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_per_row_lists_are_a_stable_sort(rows, columns, kind, seed, data):
    scores = _tied_scores(rows, columns, torch.Generator().manual_seed(seed), kind)
    count = data.draw(st.integers(1, columns))
    ids, listed = growth._top_ids_per_row(scores.clone(), count)
    assert torch.equal(ids.sort(-1).values, _stable_top_set(scores, count))
    assert torch.equal(listed, scores.gather(1, ids))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), columns=st.sampled_from([8, 32, 64]),
       kind=st.sampled_from(["random", "ties", "zero rows", "loud rows"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_layer_list_from_the_row_lists_is_a_stable_sort(rows, columns, kind, seed, data):
    scores = _tied_scores(rows, columns, torch.Generator().manual_seed(seed), kind)
    per_row = data.draw(st.integers(1, columns))
    count = data.draw(st.integers(1, rows * per_row))
    row_best = growth._top_ids_per_row(scores, per_row)
    got = growth._layer_top_from_rows(scores, *row_best, count)
    assert torch.equal(got.sort().values, _stable_top_set(scores.view(-1), count))


@given(rows=st.integers(1, 4), columns=st.integers(1, 40), seed=st.integers(0, 2**16),
       largest=st.booleans(), data=st.data())
def test_top_ids_ranks_ties_by_the_given_ids(rows, columns, seed, largest, data):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, columns), generator=generator).float()
    ids = torch.stack([torch.randperm(columns, generator=generator) for _ in range(rows)])
    count = data.draw(st.integers(0, columns))
    # a stable sort by (score, id): sort by id first, then stably by score
    by_id = ids.argsort(dim=1)
    order = scores.gather(1, by_id).argsort(dim=1, descending=largest, stable=True)
    expected = by_id.gather(1, order)[:, :count]
    got = growth.top_ids(scores, count, largest=largest, ids=ids)
    assert torch.equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 40), in_features=st.integers(1, 40),
       block=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_diag_norms_are_correctly_rounded_in_any_block(out_features, in_features, block, seed):
    """Formed a few diagonal positions at a time (wrapping around inside each block), the
    norms are the exact norms rounded once. Small integers keep G exact in float32, so the
    exact norm is known."""
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randint(-3, 4, (5, out_features), generator=generator).float()
    x = torch.randint(-3, 4, (5, in_features), generator=generator).float()
    dense = grad_out.double().T @ x.double()
    num_candidates, _ = patterns.diag_geometry(out_features, in_features)
    rows, cols = patterns.diag_coordinates(torch.arange(num_candidates), out_features,
                                           in_features)
    exact = dense[rows, cols].square().sum(dim=1).sqrt().float()
    assert torch.equal(growth._diag_gradient_norms(grad_out, x, block=block), exact)


def test_scores_op_opcheck():
    structure = torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16)
    plan = [1, 0, 0, 2]
    size = growth.probe_size(3, 4, "rows", plan, structure.numel())
    torch.library.opcheck(torch.ops.sparsefx.growth_scores.default,
                          (torch.randn(2, 3), torch.randn(2, 4), structure, "rows", plan, size))


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 20), in_features=st.sampled_from([64, 128]),
       fan_in=st.integers(1, 16), srigl=st.booleans(), seed=st.integers(0, 2**16))
def test_wide_layer_lists_match_the_dense_gradient(out_features, in_features, fan_in, srigl,
                                                  seed):
    """The lists through the op, at widths where the per-row lists take two rounds, with
    dead units (zero rows of G) and dead inputs (zero columns): each list holds exactly
    what a stable sort of the full |G| puts first."""
    generator = torch.Generator().manual_seed(seed)
    indices = patterns.random_fanin_indices(out_features, in_features, fan_in, generator)
    grad_out = torch.randn(5, out_features, generator=generator)
    grad_out[:, torch.rand(out_features, generator=generator) < 0.3] = 0.0
    x = torch.randn(5, in_features, generator=generator)
    x[:, torch.rand(in_features, generator=generator) < 0.3] = 0.0
    most = math.ceil(0.3 * fan_in)
    plan = ([fan_in, 0, 0, math.ceil(0.3 * indices.numel())] if srigl else [most, 0, 0, 0])
    scores = growth.growth_scores(grad_out, x, indices, "rows", plan)
    listed = growth.listed_candidates(scores, indices, "rows", plan, out_features, in_features)
    inactive = (grad_out.T @ x).abs().scatter(1, indices.long(), float("-inf"))
    _, _, columns = listed.per_row
    assert torch.equal(columns.view(out_features, -1).sort(1).values,
                       _stable_top_set(inactive, plan[0]))
    if srigl:
        _, rows, columns = listed.layer_wide
        assert torch.equal((rows * in_features + columns).sort().values,
                           _stable_top_set(inactive.view(-1), plan[3]))
