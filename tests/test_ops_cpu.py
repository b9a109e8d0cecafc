"""The public ops on CPU tensors, against the dense reference: forward and every gradient,
for both CPU implementations (native C++ and the PyTorch fallback)."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from helpers import (FLOAT_DTYPES, assert_close_to_reference, diag_case, fanin_case,
                     feature_sizes, leading_shapes, sparsities)
from sparsefx import kernels
from sparsefx.kernels import patterns, use_cpu_kernels


@pytest.fixture(params=["native", "torch"])
def cpu_kernels(request):
    with use_cpu_kernels(request.param):
        assert kernels.cpu_kernels() == request.param
        yield request.param


shapes_and_inputs = dict(
    out_features=feature_sizes, in_features=feature_sizes, leading=leading_shapes,
    sparsity=sparsities, dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1))


@given(**shapes_and_inputs)
@example(out_features=16, in_features=16, leading=(3,), sparsity=0.75, dtype=torch.float32,
         with_bias=True, seed=0)   # square
@example(out_features=300, in_features=7, leading=(2, 3), sparsity=0.5, dtype=torch.float32,
         with_bias=False, seed=1)  # tall, several output tiles
@example(out_features=5, in_features=257, leading=(), sparsity=0.9, dtype=torch.bfloat16,
         with_bias=True, seed=2)   # wide, one vector, partial tile
@example(out_features=9, in_features=13, leading=(0, 4), sparsity=0.5, dtype=torch.float16,
         with_bias=True, seed=3)   # empty batch
# register tiles of several rows and positions, wrap-arounds inside tiles, partial tiles
@example(out_features=300, in_features=129, leading=(13,), sparsity=0.5, dtype=torch.float32,
         with_bias=True, seed=4)   # tall: the scatter form
@example(out_features=129, in_features=300, leading=(3, 5), sparsity=0.75, dtype=torch.float32,
         with_bias=False, seed=5)  # wide: the gather form
@example(out_features=257, in_features=257, leading=(2, 9), sparsity=0.3, dtype=torch.bfloat16,
         with_bias=True, seed=6)
# several blocks of rows (forward) and chunks of rows (values gradient), as at large batches
@example(out_features=2049, in_features=129, leading=(150,), sparsity=0.9, dtype=torch.float32,
         with_bias=True, seed=7)
def test_diag_linear_matches_dense(cpu_kernels, out_features, in_features, leading, sparsity,
                                   dtype, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = diag_case(out_features, in_features, sparsity, dtype, generator)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    check.compare(lambda x, v, b: torch.ops.sparsefx.diag_linear(x, v, offsets, out_features, b),
                  x, values, bias, seed)


@given(**shapes_and_inputs)
@example(out_features=300, in_features=40, leading=(70,), sparsity=0.9, dtype=torch.float32,
         with_bias=True, seed=0)   # batch wide enough for the column-split scatter
@example(out_features=3, in_features=1, leading=(), sparsity=0.0, dtype=torch.float16,
         with_bias=False, seed=1)
@example(out_features=6, in_features=8, leading=(0,), sparsity=0.5, dtype=torch.bfloat16,
         with_bias=True, seed=2)
# blocks of 4 vectors of batch columns, then a masked partial block; one column
@example(out_features=40, in_features=257, leading=(3, 50), sparsity=0.75, dtype=torch.float32,
         with_bias=True, seed=3)
@example(out_features=129, in_features=300, leading=(1,), sparsity=0.9, dtype=torch.float32,
         with_bias=True, seed=4)
# several chunks of batch columns: wide inputs (forward, values gradient), many outputs
# (input gradient), as at large batches
@example(out_features=40, in_features=2049, leading=(150,), sparsity=0.9, dtype=torch.float32,
         with_bias=True, seed=5)
@example(out_features=2049, in_features=129, leading=(150,), sparsity=0.9, dtype=torch.float32,
         with_bias=False, seed=6)
def test_fanin_linear_matches_dense(cpu_kernels, out_features, in_features, leading, sparsity,
                                    dtype, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    values, indices, check = fanin_case(out_features, in_features, sparsity, dtype, generator)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices, b),
                  x, values, bias, seed)


@given(out_groups=st.integers(1, 6), groups=st.integers(1, 8),
       nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
       leading=leading_shapes, dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 999))
def test_nm_structure_through_fanin_linear(cpu_kernels, out_groups, groups, nm, leading, dtype,
                                           seed):
    n, m = nm
    out_features, in_features = 4 * out_groups, m * groups
    generator = torch.Generator().manual_seed(seed)
    indices = patterns.random_nm_indices(out_features, in_features, n, m, generator)
    patterns.check_nm_indices(indices, in_features, n, m)
    values = torch.randn(indices.shape, generator=generator).to(dtype)
    weight = patterns.fanin_to_dense(values, indices, in_features)
    grouped = (weight != 0).reshape(out_features, groups, m).sum(-1)
    assert (grouped <= n).all()
    rows = torch.arange(out_features)[:, None].expand_as(indices)
    from helpers import DenseCheck
    check = DenseCheck(weight, (rows, indices.long()), terms=indices.shape[1],
                       terms_grad_x=out_features)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices, b),
                  x, values, None, seed)


@pytest.mark.parametrize("index_dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                         torch.uint8])
def test_structure_accepts_every_integer_dtype(cpu_kernels, index_dtype):
    generator = torch.Generator().manual_seed(0)
    values, offsets, check = diag_case(12, 20, 0.5, torch.float32, generator)
    x = torch.randn(3, 20, generator=generator)
    torch.testing.assert_close(
        torch.ops.sparsefx.diag_linear(x, values, offsets.to(index_dtype), 12),
        x @ check.weight.T)
    fvalues, indices, fcheck = fanin_case(12, 20, 0.5, torch.float32, generator)
    torch.testing.assert_close(
        torch.ops.sparsefx.fanin_linear(x, fvalues, indices.to(index_dtype)),
        x @ fcheck.weight.T)


def test_non_contiguous_inputs(cpu_kernels):
    generator = torch.Generator().manual_seed(0)
    values, offsets, check = diag_case(10, 6, 0.5, torch.float32, generator)
    x = torch.randn(6, 5, generator=generator).T            # [5, 6], column-major
    wide_values = torch.randn(values.shape[1], values.shape[0], generator=generator).T
    weight = patterns.diag_to_dense(wide_values, offsets, 10, 6)
    torch.testing.assert_close(torch.ops.sparsefx.diag_linear(x, wide_values, offsets, 10),
                               x @ weight.T)


def test_ops_never_materialise_the_dense_weight(cpu_kernels, monkeypatch):
    """Forward and backward run without building W (the reference builders are disabled)."""
    generator = torch.Generator().manual_seed(0)
    values, offsets, diag_check = diag_case(20, 12, 0.5, torch.float32, generator)
    fvalues, indices, fanin_check = fanin_case(20, 12, 0.5, torch.float32, generator)

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense weight was materialised")

    monkeypatch.setattr(patterns, "diag_to_dense", forbidden)
    monkeypatch.setattr(patterns, "fanin_to_dense", forbidden)
    x = torch.randn(5, 12, generator=generator, requires_grad=True)
    values.requires_grad_()
    fvalues.requires_grad_()
    y = (torch.ops.sparsefx.diag_linear(x, values, offsets, 20)
         + torch.ops.sparsefx.fanin_linear(x, fvalues, indices))
    y.sum().backward()
    expected = x.detach() @ (diag_check.weight + fanin_check.weight).T
    torch.testing.assert_close(y.detach(), expected)


@pytest.mark.parametrize("out_features,in_features", [(600, 900), (900, 600), (640, 640)])
@pytest.mark.parametrize("rows", [1, 5, 100])
def test_layers_large_enough_to_use_every_thread(cpu_kernels, out_features, in_features, rows):
    """Sizes whose work the native kernels split over threads (small layers run on the
    calling thread), in every partitioning: by tiles, by rows, by batch columns, and by
    rows with per-thread partial sums for the fan-in input gradient."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    values, offsets, check = diag_case(out_features, in_features, 0.8, torch.float32, generator)
    check.compare(lambda x, v, b: torch.ops.sparsefx.diag_linear(x, v, offsets, out_features, b),
                  x, values, bias)
    values, indices, check = fanin_case(out_features, in_features, 0.8, torch.float32,
                                        generator)
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices, b),
                  x, values, bias)


def test_input_gradient_follows_in_place_structure_changes(cpu_kernels):
    """An in-place write to the indices (as DST makes) changes the next input gradient,
    with nothing derived from the old structure left behind."""
    generator = torch.Generator().manual_seed(0)
    values, indices, _ = fanin_case(9, 14, 0.5, torch.float32, generator)
    x = torch.randn(6, 14, generator=generator, requires_grad=True)

    def grad_x():
        x.grad = None
        torch.ops.sparsefx.fanin_linear(x, values, indices).sum().backward()
        return x.grad.clone()

    grad_x()
    with torch.no_grad():
        indices[3] = torch.sort(torch.randperm(14, generator=generator)[:indices.shape[1]]).values
    expected = torch.ones(6, 9) @ patterns.fanin_to_dense(values, indices, 14)
    torch.testing.assert_close(grad_x(), expected)


@given(out_features=st.sampled_from([7, 64, 129, 300]),
       in_features=st.sampled_from([5, 64, 127, 300]), rows=st.sampled_from([1, 3, 7, 40]),
       seed=st.integers(0, 999))
def test_diag_order_of_diagonals_does_not_matter(cpu_kernels, out_features, in_features, rows,
                                                 seed):
    """DST leaves offsets in slot order, not sorted: a layer whose diagonals are listed in any
    order computes the same, up to the order of summation (each side within the fp32
    accumulation bound of the exact sum, so within twice that of each other)."""
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = diag_case(out_features, in_features, 0.5, torch.float32, generator)
    order = torch.randperm(offsets.numel(), generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    grad_out = torch.randn(rows, out_features, generator=generator)
    ops, terms = torch.ops.sparsefx, 2 * max(offsets.numel(), rows)
    abs_weight = check.weight.abs().double()
    assert_close_to_reference(ops.diag_linear(x, values[order], offsets[order], out_features),
                              ops.diag_linear(x, values, offsets, out_features),
                              x.abs().double() @ abs_weight.T, terms, "output")
    assert_close_to_reference(
        ops.diag_linear_grad_input(grad_out, values[order], offsets[order], in_features),
        ops.diag_linear_grad_input(grad_out, values, offsets, in_features),
        grad_out.abs().double() @ abs_weight, terms, "grad x")
    grad_w = grad_out.abs().double().T @ x.abs().double()
    assert_close_to_reference(
        ops.diag_linear_grad_values(grad_out, x, values[order], offsets[order]),
        ops.diag_linear_grad_values(grad_out, x, values, offsets)[order],
        grad_w[check.stored][order], terms, "grad values")


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("rows", [(), (7,), (5, 21)])
def test_fanin_index_dtypes(cpu_kernels, index_dtype, rows):
    """Every integer id dtype gives the dense result (the native kernels read int16, int32
    and int64 directly, through different gather paths, and convert the others)."""
    generator = torch.Generator().manual_seed(0)
    values, indices, check = fanin_case(48, 200, 0.8, torch.float32, generator)
    x = torch.randn(*rows, 200, generator=generator)
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices.to(index_dtype),
                                                                  b),
                  x, values, torch.randn(48, generator=generator), 0)


def test_structure_written_in_place_is_seen(cpu_kernels):
    """What the kernels derive from a structure (the diagonals' order, the fan-in structure by
    column) is rebuilt after DST writes the structure in place."""
    generator = torch.Generator().manual_seed(0)
    x, grad_out = torch.randn(9, 60, generator=generator), torch.randn(9, 30, generator=generator)
    ops = torch.ops.sparsefx
    values, indices, _ = fanin_case(30, 60, 0.5, torch.float32, generator)
    ops.fanin_linear_grad_input(grad_out, values, indices, 60)
    with torch.no_grad():
        indices.copy_(patterns.random_fanin_indices(30, 60, indices.shape[1], generator))
    weight = patterns.fanin_to_dense(values, indices, 60)
    torch.testing.assert_close(ops.fanin_linear_grad_input(grad_out, values, indices, 60),
                               grad_out @ weight)
    torch.testing.assert_close(ops.fanin_linear(x, values, indices), x @ weight.T)

    values, offsets, _ = diag_case(30, 60, 0.5, torch.float32, generator)
    ops.diag_linear(x, values, offsets, 30)
    with torch.no_grad():
        offsets.copy_(offsets.flip(0))  # same set, another order
        values.copy_(values.flip(0))
    weight = patterns.diag_to_dense(values, offsets, 30, 60)
    torch.testing.assert_close(ops.diag_linear(x, values, offsets, 30), x @ weight.T)
