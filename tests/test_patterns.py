"""The pattern math of SPEC section 2, which every other layer relies on."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from sparsefx.kernels import patterns

dims = st.integers(1, 50)


@given(out_features=dims, in_features=dims)
def test_diagonals_tile_the_matrix_exactly_once(out_features, in_features):
    num_candidates, length = patterns.diag_geometry(out_features, in_features)
    assert (num_candidates, length) == (max(out_features, in_features),
                                        min(out_features, in_features))
    rows, cols = patterns.diag_coordinates(torch.arange(num_candidates), out_features,
                                           in_features)
    hits = torch.zeros(out_features, in_features, dtype=torch.int64)
    hits.index_put_((rows.reshape(-1), cols.reshape(-1)), torch.tensor(1), accumulate=True)
    assert (hits == 1).all()


def test_diagonal_convention_by_hand():
    # out >= in: diagonal d holds W[(t + d) % out, t]
    rows, cols = patterns.diag_coordinates(torch.tensor([2]), 4, 3)
    assert rows.tolist() == [[2, 3, 0]] and cols.tolist() == [[0, 1, 2]]
    # out < in: diagonal d holds W[t, (t + d) % in]
    rows, cols = patterns.diag_coordinates(torch.tensor([3]), 2, 5)
    assert rows.tolist() == [[0, 1]] and cols.tolist() == [[3, 4]]
    weight = patterns.diag_to_dense(torch.tensor([[1.0, 2.0]]), torch.tensor([4]), 2, 5)
    assert weight.tolist() == [[0, 0, 0, 0, 1.0], [2.0, 0, 0, 0, 0]]


@pytest.mark.parametrize("out_features,in_features,sparsity,expected", [
    (10, 10, 0.7, 3),        # (1 - 0.7) * 10 = 3.0000000000000004 in floating point
    (10, 10, 0.9, 1),
    (10, 10, 0.0, 10),
    (4096, 4096, 0.9, 410),  # ceil(409.6)
    (8, 100, 0.95, 5),       # P = 100
    (3, 3, 0.99, 1),         # never fewer than one diagonal
])
def test_diag_num_kept(out_features, in_features, sparsity, expected):
    assert patterns.diag_num_kept(out_features, in_features, sparsity) == expected


@pytest.mark.parametrize("in_features,sparsity,expected", [
    (10, 0.7, 3), (4096, 0.9, 410), (5, 0.9, 1), (3, 0.5, 2), (100, 0.0, 100)])
def test_fanin_num_kept(in_features, sparsity, expected):
    assert patterns.fanin_num_kept(in_features, sparsity) == expected


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.*expected a fraction in \[0, 1\)"):
        patterns.diag_num_kept(8, 8, sparsity)
    with pytest.raises(ValueError, match=r"sparsity="):
        patterns.fanin_num_kept(8, sparsity)


@given(out_features=dims, in_features=dims, seed=st.integers(0, 99))
def test_diag_norms_are_the_norms_of_the_diagonals_elements(out_features, in_features, seed):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    num_candidates, _ = patterns.diag_geometry(out_features, in_features)
    rows, cols = patterns.diag_coordinates(torch.arange(num_candidates), out_features,
                                           in_features)
    torch.testing.assert_close(patterns.diag_norms(weight), weight[rows, cols].norm(dim=1))


@given(out_features=dims, in_features=dims, data=st.data())
def test_dense_to_diag_keeps_the_largest_diagonals(out_features, in_features, data):
    num_candidates, _ = patterns.diag_geometry(out_features, in_features)
    num_kept = data.draw(st.integers(1, num_candidates))
    weight = torch.randn(out_features, in_features,
                         generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    values, offsets = patterns.dense_to_diag(weight, num_kept)
    norms = patterns.diag_norms(weight)
    dropped = torch.ones(num_candidates, dtype=torch.bool)
    dropped[offsets] = False
    if dropped.any():
        assert norms[offsets].min() >= norms[dropped].max()
    patterns.check_diag_offsets(offsets, out_features, in_features)
    # the kept diagonals are copied exactly: round trip through the dense form
    kept = patterns.diag_to_dense(values, offsets, out_features, in_features)
    assert torch.equal(kept[kept != 0], weight[kept != 0])
    assert torch.equal(patterns.dense_to_diag(kept, num_kept)[1], offsets)


@given(out_features=dims, in_features=dims, data=st.data())
def test_dense_to_fanin_keeps_each_rows_largest_entries(out_features, in_features, data):
    fan_in = data.draw(st.integers(1, in_features))
    weight = torch.randn(out_features, in_features,
                         generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    values, indices = patterns.dense_to_fanin(weight, fan_in)
    assert indices.dtype == patterns.fanin_index_dtype(in_features)
    assert indices.shape == (out_features, fan_in)
    patterns.check_fanin_indices(indices, in_features)
    assert (indices[:, 1:] > indices[:, :-1]).all()  # ascending within a row
    kept = patterns.fanin_to_dense(values, indices, in_features)
    assert torch.equal(kept.gather(1, indices.long()), weight.gather(1, indices.long()))
    threshold = weight.abs().gather(1, indices.long()).min(1).values
    dropped_max = torch.where(kept != 0, 0.0, weight.abs()).max(1).values
    assert (dropped_max <= threshold).all()


@given(rows=st.integers(1, 8), groups=st.integers(1, 6),
       nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]), seed=st.integers(0, 99))
def test_nm_keeps_n_largest_per_group(rows, groups, nm, seed):
    n, m = nm
    in_features = groups * m
    weight = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    values, indices = patterns.dense_to_nm(weight, n, m)
    patterns.check_nm_indices(indices, in_features, n, m)
    assert indices.shape[1] == patterns.nm_num_kept(in_features, n, m) == n * groups
    grouped = weight.abs().reshape(rows, groups, m)
    kth_largest = grouped.topk(n, dim=2).values[..., -1]
    kept = grouped.gather(2, (indices.long() % m).reshape(rows, groups, n))
    assert (kept >= kth_largest[..., None]).all()
    random = patterns.random_nm_indices(rows, in_features, n, m,
                                        torch.Generator().manual_seed(seed))
    patterns.check_nm_indices(random, in_features, n, m)


@pytest.mark.parametrize("n,m,in_features,message", [
    (2, 2, 8, r"N:M = 2:2: expected 0 < N < M"),
    (0, 4, 8, r"N:M = 0:4"),
    (2, 4, 10, r"in_features = 10: expected a multiple of M = 4"),
])
def test_nm_rejects_bad_configurations(n, m, in_features, message):
    with pytest.raises(ValueError, match=message):
        patterns.nm_num_kept(in_features, n, m)


def test_check_nm_indices_names_the_bad_group():
    indices = torch.tensor([[0, 2, 4, 5]])  # groups {0, 2} and {4, 5}: two each
    with pytest.raises(ValueError, match=r"row 0 holds 1 entries in group 0 .*expected 2"):
        patterns.check_nm_indices(torch.tensor([[0, 4, 5, 6]]), 8, 2, 4)
    patterns.check_nm_indices(indices, 8, 2, 4)


def test_index_dtype_is_the_narrowest_that_fits():
    assert patterns.fanin_index_dtype(32768) == torch.int16   # ids up to 32767
    assert patterns.fanin_index_dtype(32769) == torch.int32


def test_random_structures_are_valid_and_seeded():
    first = patterns.random_diag_offsets(30, 20, 7, torch.Generator().manual_seed(5))
    again = patterns.random_diag_offsets(30, 20, 7, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    patterns.check_diag_offsets(first, 30, 20)
    indices = patterns.random_fanin_indices(9, 31, 4, torch.Generator().manual_seed(5))
    patterns.check_fanin_indices(indices, 31)
    assert math.prod(indices.shape) == 36


layer_shapes = st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1,
                        max_size=8)


@given(shapes=layer_shapes, sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 0.99]))
def test_erk_keeps_the_global_budget(shapes, sparsity):
    densities = patterns.erk_densities(shapes, sparsity)
    sizes = [o * i for o, i in shapes]
    assert all(0.0 < d <= 1.0 + 1e-12 for d in densities)
    kept = sum(d * n for d, n in zip(densities, sizes, strict=True))
    assert kept == pytest.approx((1 - sparsity) * sum(sizes), rel=1e-9)
    # below the cap, density is proportional to (in + out) / (in * out)
    ratios = [d * o * i / (o + i) for d, (o, i) in zip(densities, shapes, strict=True) if d < 1]
    assert all(r == pytest.approx(ratios[0], rel=1e-9) for r in ratios)
    # a layer left dense would have needed more than density 1 at the final scale
    if ratios:
        assert all(ratios[0] * (o + i) / (o * i) >= 1 - 1e-9
                   for d, (o, i) in zip(densities, shapes, strict=True) if d >= 1)


def test_erk_by_hand():
    # two layers: 10x10 (raw 0.2) and 100x100 (raw 0.02); keep 10 % of 10100 weights
    small, large = patterns.erk_densities([(10, 10), (100, 100)], 0.9)
    assert large == pytest.approx(small / 10)
    assert small * 100 + large * 10000 == pytest.approx(1010)
    # at 50 % the small layer would need density > 1: it stays dense, the large one pays
    small, large = patterns.erk_densities([(10, 10), (100, 100)], 0.5)
    assert small == 1.0 and large == pytest.approx((5050 - 100) / 10000)
    with pytest.raises(ValueError, match="shapes is empty"):
        patterns.erk_densities([], 0.9)


# ---------------------------------------------------------------------------- blockdiag


@st.composite
def blockdiag_layers(draw):
    """A shape with a common divisor g, and c distinct kept cosets of the g."""
    groups = draw(st.integers(1, 8))
    out_features = groups * draw(st.integers(1, 6))
    in_features = groups * draw(st.integers(1, 6))
    cosets = draw(st.lists(st.integers(0, groups - 1), min_size=1, max_size=groups,
                           unique=True))
    return out_features, in_features, groups, torch.tensor(cosets)


@given(blockdiag_layers())
def test_blockdiag_is_dense_blocks_after_grouping_by_residue(layer):
    out_features, in_features, groups, cosets = layer
    offsets = patterns.blockdiag_offsets(out_features, in_features, groups, cosets)
    num_candidates, length = patterns.diag_geometry(out_features, in_features)
    assert offsets.numel() == len(cosets) * num_candidates // groups
    patterns.check_blockdiag_offsets(offsets, out_features, in_features, groups)
    assert patterns.blockdiag_cosets(offsets, groups).tolist() == sorted(cosets.tolist())
    # materialise W with nonzero values and regroup rows and columns by residue mod g
    values = torch.rand(offsets.numel(), length) + 1.0
    weight = patterns.diag_to_dense(values, offsets, out_features, in_features)
    rows = torch.arange(out_features).reshape(-1, groups).T.reshape(-1)  # i -> (i % g, i // g)
    cols = torch.arange(in_features).reshape(-1, groups).T.reshape(-1)
    blocks = weight[rows][:, cols].reshape(groups, out_features // groups, groups,
                                           in_features // groups).transpose(1, 2)
    shifts = set(patterns.blockdiag_block_shifts(out_features, in_features, groups,
                                                 cosets).tolist())
    for block_row in range(groups):
        for block_col in range(groups):
            block = blocks[block_row, block_col]
            if (block_row - block_col) % groups in shifts:
                assert bool((block != 0).all()), "a kept block is entirely dense"
            else:
                assert bool((block == 0).all()), "every other block is zero"


def test_blockdiag_refuses_partial_cosets_and_bad_groups():
    offsets = patterns.blockdiag_offsets(12, 8, 4, torch.tensor([1]))  # P = 12: 1, 5, 9
    assert offsets.tolist() == [1, 5, 9]
    with pytest.raises(ValueError, match=r"2 of the 3 diagonals of coset 1 \(mod g = 4\)"):
        patterns.check_blockdiag_offsets(offsets[:2], 12, 8, 4)
    with pytest.raises(ValueError, match=r"groups=5: expected a positive divisor of both"):
        patterns.blockdiag_offsets(12, 8, 5, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"cosets=\[4\]: expected distinct residues in"):
        patterns.blockdiag_offsets(12, 8, 4, torch.tensor([4]))


@given(out_blocks=st.integers(1, 64), in_blocks=st.integers(1, 64),
       common=st.sampled_from([1, 2, 3, 16, 48, 64]),
       sparsity=st.sampled_from([0.5, 0.8, 0.9, 0.95]))
def test_blockdiag_groups_divide_the_shape_and_keep_blocks_large(out_blocks, in_blocks,
                                                                 common, sparsity):
    out_features, in_features = common * out_blocks, common * in_blocks
    groups = patterns.blockdiag_groups(out_features, in_features, sparsity)
    assert out_features % groups == 0 and in_features % groups == 0
    density = lambda g: patterns.blockdiag_num_cosets(g, sparsity) / g
    error = lambda g: abs(density(g) - (1 - sparsity)) / (1 - sparsity)
    fits = [g for g in range(2, math.gcd(out_features, in_features) + 1)
            if out_features % g == 0 and in_features % g == 0
            and min(out_features, in_features) // g >= 16]
    if not fits:  # no blocks of 16: the largest blocks that still leave some sparsity
        assert groups == min([g for g in range(2, math.gcd(out_features, in_features) + 1)
                              if out_features % g == 0 and in_features % g == 0], default=1)
        return
    assert groups in fits
    close = [g for g in fits if error(g) <= 0.10]
    if close:  # the largest blocks whose density is within 10 % of the target
        assert groups == min(close)
    else:      # else the closest density, with the most cosets among equals
        assert error(groups) == min(error(g) for g in fits)
        assert groups == max(g for g in fits if error(g) == error(groups))


def test_blockdiag_groups_at_model_widths():
    # 90 %: blocks of 24 at 768 (density 3/32), 128 at 4096; 95 % at 4096: 64
    assert patterns.blockdiag_groups(768, 768, 0.9) == 32
    assert patterns.blockdiag_groups(3072, 768, 0.9) == 32
    assert patterns.blockdiag_groups(4096, 4096, 0.9) == 32
    assert patterns.blockdiag_groups(4096, 4096, 0.95) == 64
    assert patterns.blockdiag_num_cosets(32, 0.9) == 3
    # 256x256 at 90 %: g = 8 and g = 16 both give density 1/8; two cosets of 16x16 blocks
    assert patterns.blockdiag_groups(256, 256, 0.9) == 16
    assert patterns.blockdiag_num_cosets(16, 0.9) == 2
