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
from sparsefx.kernels import growth, patterns, topk


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
    probe_grad, dense = _tap_gradient(out_features, in_features, offsets, "diagonals",
                                      [0, 0, 0], seed)
    torch.testing.assert_close(probe_grad[:-growth.TRAILER], patterns.diag_norms(dense),
                               rtol=1e-5, atol=1e-6)
    assert growth.trailer(probe_grad).tolist() == [1.0, 0.0], "one call, finite"


def _fanin_plan(out_features, in_features, fan_in, alpha, srigl):
    """The plan a fan-in layer asks for (RigL: a row grows at most ceil(alpha k); SRigL: up
    to its whole fan-in, and the layer-wide list), capped by what can be listed."""
    inactive = in_features - fan_in
    if srigl:
        return [min(fan_in, inactive), 0,
                min(math.ceil(alpha * out_features * fan_in), out_features * inactive)]
    return [min(math.ceil(alpha * fan_in), inactive), 0, 0]


@given(out_features=st.integers(1, 12), in_features=st.integers(2, 24),
       density=st.floats(0.05, 0.99), alpha=st.sampled_from([0.1, 0.3, 0.6, 1.0]),
       srigl=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_fanin_lists_select_exactly_what_the_dense_gradient_selects(
        out_features, in_features, density, alpha, srigl, seed, data):
    generator = torch.Generator().manual_seed(seed)
    fan_in = max(1, round(density * in_features))
    indices = patterns.random_fanin_indices(out_features, in_features, fan_in, generator)
    plan = _fanin_plan(out_features, in_features, fan_in, alpha, srigl)
    probe_grad, dense = _tap_gradient(out_features, in_features, indices, "rows", plan, seed)
    listed = growth.listed_candidates(probe_grad, indices, "rows", plan, out_features,
                                      in_features)
    assert torch.equal(listed.active, dense.gather(1, indices.long()))
    if not plan[0]:
        return  # a dense row: nothing inactive to list
    candidate_ids, scores = listed.row_candidates(indices)
    magnitude = torch.rand(out_features, fan_in, generator=generator)
    moved = data.draw(st.integers(0, min(plan[0], fan_in)))
    exact = regrow.drop_and_grow(indices.long(), magnitude, dense, moved)
    compact = regrow.drop_and_grow(indices.long(), magnitude, scores, moved,
                                   candidate_ids=candidate_ids)
    _assert_same_selection(exact, compact)
    if srigl and plan[2]:
        row_live = torch.rand(out_features, generator=generator) > 0.3
        live = int(row_live.sum())
        dropped = data.draw(st.integers(0, min(live * fan_in,
                                               math.ceil(alpha * out_features * fan_in),
                                               plan[2])))
        kept = regrow.layerwise_drop(magnitude, row_live, dropped)
        assert torch.equal(kept, _dense_layerwise_kept(magnitude, row_live, dropped))
        assert torch.equal(
            regrow.salience(kept, indices.long(), listed.active, listed.layer_wide,
                            in_features, dropped),
            _dense_salience(kept, indices.long(), dense, dropped))
        new_live = row_live | (torch.rand(out_features, generator=generator) > 0.5)
        new_fan_in = data.draw(st.integers(1, fan_in))  # a refill never needs more than k
        new_active, source = regrow.refill(indices.long(), kept, magnitude, candidate_ids,
                                           scores, new_live, new_fan_in, in_features)
        _assert_refilled(new_active, source, indices.long(), kept, magnitude, dense,
                         new_live, new_fan_in)


def _dense_layerwise_kept(magnitude, row_live, dropped):
    """All but the ``dropped`` smallest magnitudes of the live rows (a stable sort)."""
    flat = magnitude.masked_fill(~row_live[:, None], float("inf")).view(-1)
    kept = row_live[:, None].expand_as(magnitude).reshape(-1).clone()
    kept[flat.argsort(stable=True)[:dropped]] = False
    return kept.view_as(magnitude)


def _dense_salience(kept, indices, dense, num_grown):
    """SRigL's salient counts straight from its reference's definition, on the full |G|:
    the kept set united with the top ``num_grown`` of |G| over every position."""
    rows, in_features = dense.shape
    salient = torch.zeros(rows, in_features, dtype=torch.bool)
    for row in range(rows):
        salient[row, indices[row][kept[row]]] = True
    grow = dense.view(-1).argsort(descending=True, stable=True)[:num_grown]
    salient.view(-1)[grow] = True
    return salient.sum(dim=1)


def _assert_refilled(new_active, source, active, kept, magnitude, dense, live, fan_in):
    """Every live row holds its kept entries (the ``fan_in`` largest, if more) and then the
    best of the rest by |G|; a dropped entry grown back continues its slot; dead rows hold
    distinct columns and only new (zero) units."""
    for row in range(active.shape[0]):
        columns = new_active[row].tolist()
        assert len(set(columns)) == fan_in
        if not live[row]:
            assert bool((source[row] < 0).all())
            continue
        kept_columns = active[row][kept[row]]
        order = magnitude[row][kept[row]].argsort(descending=True, stable=True)
        kept_columns = kept_columns[order][:fan_in].tolist()
        free = dense[row].clone()
        free[kept_columns] = float("-inf")
        # ties towards the lower place in [slots, listed]: slots in slot order first
        place = {c: i for i, c in enumerate(active[row].tolist())}
        others = sorted((c for c in range(dense.shape[1]) if c not in kept_columns),
                        key=lambda c: (-free[c].item(), place.get(c, active.shape[1] + c)))
        expected = set(kept_columns) | set(others[:fan_in - len(kept_columns)])
        assert set(columns) == expected
        for slot, column in enumerate(columns):
            old = source[row, slot].item()
            was = place.get(column)
            assert old == (was if was is not None else -1)


@given(out_features=st.integers(1, 10), groups=st.integers(1, 5),
       nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (1, 2), (7, 8), (5, 16)]),
       alpha=st.sampled_from([0.1, 0.3, 1.0]), seed=st.integers(0, 2**16), data=st.data())
def test_nm_ranks_select_exactly_what_the_dense_gradient_selects(out_features, groups, nm,
                                                                 alpha, seed, data):
    n, m = nm
    in_features = groups * m
    generator = torch.Generator().manual_seed(seed)
    indices = patterns.random_nm_indices(out_features, in_features, n, m, generator)
    fan_in = indices.shape[1]
    plan = [0, m, 0]
    probe_grad, dense = _tap_gradient(out_features, in_features, indices, "rows", plan, seed)
    scores = growth.candidate_scores(probe_grad, indices, "rows", plan, out_features,
                                     in_features)
    magnitude = torch.rand(out_features, fan_in, generator=generator)
    moved = data.draw(st.integers(0, fan_in))
    exact = regrow.drop_and_grow(indices.long(), magnitude, dense, moved, m)
    compact = regrow.drop_and_grow(indices.long(), magnitude, scores, moved, m)
    _assert_same_selection(exact, compact)
    patterns.check_nm_indices(compact[0], in_features, n, m)


@given(rows=st.integers(1, 5), groups=st.integers(1, 7), m=st.sampled_from([2, 3, 4, 8, 16]),
       kind=st.sampled_from(["random", "ties"]), seed=st.integers(0, 2**16))
def test_group_ranks_are_a_stable_sort_and_unpack_exactly(rows, groups, m, kind, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, groups * m, generator=generator)
    if kind == "ties":
        scores = (scores * 3).floor()
    ranks = growth.group_ranks(scores, m)
    expected = scores.view(rows, groups, m).argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(ranks.view(rows, groups, m).argsort(dim=-1), expected)
    packed = growth.pack_ranks(ranks, m)
    assert packed.dtype == torch.float32 and bool((packed < 2**24).all())
    assert torch.equal(growth.unpack_ranks(packed, groups * m, m), ranks)


def _assert_same_selection(exact, compact):
    assert torch.equal(exact[0], compact[0])
    assert torch.equal(exact[1], compact[1])


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
    plan = [0, 0, min(math.ceil(alpha * kept), total - kept)]
    probe_grad, dense = _tap_gradient(out_features, in_features, mask, "elements", plan, seed)
    listed = growth.listed_candidates(probe_grad, mask, "elements", plan, out_features,
                                      in_features)
    active = mask.view(1, -1).nonzero()[:, 1][None, :]
    candidate_ids, scores = listed.layer_candidates(active, in_features)
    magnitude = torch.rand(1, kept, generator=generator)
    moved = data.draw(st.integers(0, min(plan[2], kept)))
    exact = regrow.drop_and_grow(active, magnitude, dense.view(1, -1), moved)
    compact = regrow.drop_and_grow(active, magnitude, scores, moved, candidate_ids=candidate_ids)
    _assert_same_selection(exact, compact)


@given(rows=st.integers(1, 4), columns=st.integers(1, 40), seed=st.integers(0, 2**16),
       largest=st.booleans(), data=st.data())
def test_top_ids_is_a_stable_sort(rows, columns, seed, largest, data):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values (many ties), signed zeros, infinities
    choices = torch.tensor([0.0, -0.0, 1.5, -2.0, 3.0, float("inf"), float("-inf"), 1e-30])
    scores = choices[torch.randint(0, len(choices), (rows, columns), generator=generator)]
    count = data.draw(st.integers(0, columns))
    expected = scores.argsort(dim=1, descending=largest, stable=True)[:, :count]
    got = topk.top_ids(scores, count, largest=largest)
    # -0.0 and 0.0 compare equal for the sort; the keys order -0.0 below 0.0
    same = torch.gather(scores, 1, got) == torch.gather(scores, 1, expected)
    assert bool(same.all())
    exact = (scores != 0).all(dim=1)
    assert torch.equal(got[exact], expected[exact])


def test_the_trailer_counts_calls_and_flags_non_finite_inputs():
    """Autograd adds a probe's gradients: a layer tapped twice in one backward shows 2
    calls (and lists that mean nothing summed); a NaN or an infinity in the inputs shows
    as NaN, whatever the packed numbers before it say."""
    indices = torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16)
    plan = [0, 2, 0]  # N:M 1:2 ranks: no NaN of their own
    size = growth.probe_size(3, 4, "rows", plan, indices.numel())
    probe = torch.zeros(1).expand(size).requires_grad_(True)
    x = torch.randn(5, 4)
    y = torch.randn(5, 3, requires_grad=True)
    twice = (torch.ops.sparsefx.growth_tap(y, x, probe, indices, "rows", plan)
             + torch.ops.sparsefx.growth_tap(y, x, probe, indices, "rows", plan))
    twice.sum().backward()
    assert growth.trailer(probe.grad).tolist() == [2.0, 0.0]
    probe.grad = None
    x[1, 2] = float("inf")
    torch.ops.sparsefx.growth_tap(y, x, probe, indices, "rows", plan).sum().backward()
    calls, non_finite = growth.trailer(probe.grad).tolist()
    assert calls == 1.0 and math.isnan(non_finite)


def test_the_lists_are_about_the_size_of_the_sparse_layer():
    out_features, in_features = 512, 512
    dense = out_features * in_features
    # fan-in at 90 %, alpha 0.3: active scores, then (score, column) per listed candidate
    fan_in = patterns.fanin_num_kept(in_features, 0.9)
    plan = _fanin_plan(out_features, in_features, fan_in, 0.3, srigl=False)
    size = growth.probe_size(out_features, in_features, "rows", plan, out_features * fan_in)
    assert size < 1.7 * out_features * fan_in < 0.2 * dense
    # N:M 2:4: within-group ranks, twelve to a number
    assert growth.probe_size(out_features, in_features, "rows", [0, 4, 0], dense // 2) \
        == out_features * math.ceil(in_features / 12) + growth.TRAILER


@pytest.mark.parametrize("granularity,structure,plan", [
    ("diagonals", torch.tensor([0, 3]), [0, 0, 0]),
    ("rows", torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16), [1, 0, 2]),
    ("rows", torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16), [0, 2, 0]),
    ("elements", torch.tensor([[True, False, False, True]] * 3), [0, 0, 2]),
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
    with pytest.raises(ValueError, match="probe has 5 elements: expected 6"):
        torch.ops.sparsefx.growth_tap(torch.randn(2, 3), torch.randn(2, 4), probe,
                                      torch.tensor([0]), "diagonals", [0, 0, 0])
    with pytest.raises(ValueError, match="granularity='rowz'"):
        torch.ops.sparsefx.growth_tap(torch.randn(2, 3), torch.randn(2, 4), probe,
                                      torch.tensor([0]), "rowz", [0, 0, 0])
    indices = torch.tensor([[0, 2], [1, 3], [2, 0]], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"plan=\[3, 0, 0\] lists more candidates than the 6 "
                                         "inactive weights"):
        torch.ops.sparsefx.growth_tap(torch.randn(2, 3), torch.randn(2, 4), probe, indices,
                                      "rows", [3, 0, 0])


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
    ids, listed = topk.top_ids_per_row(scores.clone(), count)
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
    row_best = topk.top_ids_per_row(scores, per_row)
    got, got_scores = topk.layer_top_from_rows(lambda some: scores[some].clone(),
                                                  *row_best, count, columns, block=2)
    assert torch.equal(got.sort().values, _stable_top_set(scores.view(-1), count))
    assert torch.equal(got_scores.view(torch.int32), scores.view(-1)[got].view(torch.int32))


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
    got = topk.top_ids(scores, count, largest=largest, ids=ids)
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
    plan = [1, 0, 2]
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
    plan = _fanin_plan(out_features, in_features, fan_in, 0.3, srigl)
    scores = growth.growth_scores(grad_out, x, indices, "rows", plan)
    listed = growth.listed_candidates(scores, indices, "rows", plan, out_features, in_features)
    inactive = (grad_out.T @ x).abs().scatter(1, indices.long(), float("-inf"))
    _, columns = listed.per_row
    assert torch.equal(columns.long().sort(1).values, _stable_top_set(inactive, plan[0]))
    if srigl:
        _, rows, columns = listed.layer_wide
        assert torch.equal((rows * in_features + columns).sort().values,
                           _stable_top_set(inactive.view(-1), plan[2]))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), columns=st.sampled_from([8, 32, 64]),
       kind=st.sampled_from(["random", "ties", "zero rows", "loud rows"]),
       seed=st.integers(0, 2**16), block=st.integers(1, 5), data=st.data())
def test_the_layer_pool_is_a_stable_sort_over_its_blocks(rows, columns, kind, seed, block,
                                                         data):
    scores = _tied_scores(rows, columns, torch.Generator().manual_seed(seed), kind)
    count = data.draw(st.integers(1, rows * columns))
    pool = topk.LayerPool(count)
    for start in range(0, rows, block):
        pool.add(scores[start:start + block].clone(), start * columns)
    ids, listed = pool.best()
    assert torch.equal(ids.sort().values, _stable_top_set(scores.view(-1), count))
    assert torch.equal(listed.view(torch.int32), scores.view(-1)[ids].view(torch.int32))


@settings(max_examples=30, deadline=None)
@given(out_features=st.integers(1, 9), in_features=st.sampled_from([4, 16, 24]),
       seed=st.integers(0, 2**16), block=st.integers(1, 4), data=st.data())
def test_blocked_taps_list_what_the_whole_gradient_lists(out_features, in_features, seed,
                                                         block, data):
    """The taps form G a block of rows at a time (the layer-wide list from a running pool
    or from the rows' lists): the lists are those of the whole gradient."""
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(3, out_features, generator=generator)
    x = torch.randn(3, in_features, generator=generator)
    inactive = data.draw(st.integers(1, out_features * in_features - 1))
    mask = torch.ones(out_features * in_features, dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=generator)[:inactive]] = False
    mask = mask.view(out_features, in_features)
    plan = [0, 0, data.draw(st.integers(1, inactive))]
    whole = growth._element_scores(grad_out, x, mask, plan, block=out_features)
    blocked = growth._element_scores(grad_out, x, mask, plan, block=block)
    assert torch.equal(whole[:int(mask.sum())], blocked[:int(mask.sum())])
    for probe in (whole, blocked):
        _, rows, cols = growth.listed_candidates(probe, mask, "elements", plan, out_features,
                                                 in_features).layer_wide
        scores = (grad_out.T @ x).abs().masked_fill(mask, float("-inf"))
        assert torch.equal((rows * in_features + cols).sort().values,
                           _stable_top_set(scores.view(-1), plan[2]))
    fan_in = data.draw(st.integers(1, in_features - 1))
    indices = torch.stack([torch.randperm(in_features, generator=generator)[:fan_in]
                           for _ in range(out_features)])
    for per_row, layer_wide in [(0, 1), (1, out_features * (in_features - fan_in))]:
        layer_wide = min(layer_wide, out_features * (in_features - fan_in))
        plan = [min(per_row, in_features - fan_in), 0, layer_wide]
        probe = growth._fanin_scores(grad_out, x, indices, plan, block=block)
        listed = growth.listed_candidates(probe, indices, "rows", plan, out_features,
                                          in_features)
        _, rows, cols = listed.layer_wide
        scores = (grad_out.T @ x).abs().scatter(1, indices, float("-inf"))
        assert torch.equal((rows * in_features + cols).sort().values,
                           _stable_top_set(scores.view(-1), layer_wide))
