"""The Triton kernels called directly -- under TRITON_INTERPRET=1 on a machine without a GPU,
compiled on a GPU -- against the dense reference. Every output buffer the kernel should fill
is poisoned with NaN first, so an element a kernel forgets to write fails the test (the
interpreter raises nothing for a missed store or an unmasked out-of-bounds load)."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from helpers import FLOAT_DTYPES, blockdiag_case, diag_case, fanin_case, sparsities

triton = pytest.importorskip("triton")
from sparsefx.kernels.diag import triton_kernels as diag_triton  # noqa: E402
from sparsefx.kernels.fanin import triton_kernels as fanin_triton  # noqa: E402
from sparsefx.kernels.blockdiag import triton_kernels as blockdiag_triton  # noqa: E402
from sparsefx.kernels.triton_runtime import interpreter_problem  # noqa: E402

pytestmark = pytest.mark.skipif(interpreter_problem() is not None,
                                reason=str(interpreter_problem()))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter runs every program in Python: small shapes, fewer examples
small_sizes = st.one_of(st.integers(1, 24), st.sampled_from([33, 129]))
triton_settings = settings(max_examples=25)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


class TritonDiag(torch.autograd.Function):
    """diag_linear wired straight to the Triton kernels, outputs poisoned."""

    @staticmethod
    def forward(ctx, x, values, offsets, out_features, splits=None):
        in_features = x.shape[-1]
        mod = max(out_features, in_features)
        ctx.save_for_backward(x, values, offsets)
        ctx.shape = (out_features, in_features, mod)
        ctx.splits = splits
        return diag_triton.diag_apply(x, values, offsets, mod, gather=out_features < in_features,
                                      out=poisoned(x.shape[0], out_features, dtype=x.dtype),
                                      splits=splits)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, offsets = ctx.saved_tensors
        out_features, in_features, mod = ctx.shape
        grad_out = grad_out.contiguous()
        grad_x = diag_triton.diag_apply(grad_out, values, offsets, mod,
                                        gather=out_features >= in_features,
                                        out=poisoned(*x.shape, dtype=x.dtype), splits=ctx.splits)
        a, b = (grad_out, x) if out_features < in_features else (x, grad_out)
        grad_values = diag_triton.diag_values_grad(a, b, offsets, mod,
                                                   out=poisoned(*values.shape, dtype=x.dtype))
        return grad_x, grad_values, None, None, None


class TritonFanin(torch.autograd.Function):
    """fanin_linear wired straight to the Triton kernels, outputs poisoned."""

    @staticmethod
    def forward(ctx, x, values, indices, splits=None):
        ctx.save_for_backward(x, values, indices)
        return fanin_triton.fanin_forward(x, values, indices,
                                          out=poisoned(x.shape[0], values.shape[0], dtype=x.dtype),
                                          splits=splits)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # the input gradient accumulates with atomics into a buffer it zeroes itself
        grad_x = fanin_triton.fanin_input_grad(grad_out, values, indices, x.shape[1])
        grad_values = fanin_triton.fanin_values_grad(grad_out, x, indices,
                                                     out=poisoned(*values.shape, dtype=x.dtype))
        return grad_x, grad_values, None, None


def _with_bias(y, bias):
    return y if bias is None else y + bias


@triton_settings
@given(out_features=small_sizes, in_features=small_sizes, rows=st.integers(0, 40),
       sparsity=sparsities, dtype=st.sampled_from(FLOAT_DTYPES + [torch.float64]),
       with_bias=st.booleans(), splits=st.sampled_from([None, 2, 7]),
       seed=st.integers(0, 2**31 - 1))
@example(out_features=129, in_features=5, rows=33, sparsity=0.9, dtype=torch.float32,
         with_bias=True, splits=None, seed=0)
@example(out_features=3, in_features=129, rows=1, sparsity=0.5, dtype=torch.bfloat16,
         with_bias=False, splits=7, seed=1)  # the diagonals split: partial sums
@example(out_features=24, in_features=24, rows=17, sparsity=0.75, dtype=torch.float16,
         with_bias=True, splits=2, seed=2)
@example(out_features=20, in_features=300, rows=3, sparsity=0.9, dtype=torch.bfloat16,
         with_bias=False, splits=None, seed=3)  # gather form, P >> tile: most tiles unwrapped
@example(out_features=300, in_features=20, rows=17, sparsity=0.9, dtype=torch.float32,
         with_bias=True, splits=None, seed=4)  # scatter form, the same
def test_triton_diag_kernels(out_features, in_features, rows, sparsity, dtype, with_bias,
                             splits, seed):
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = diag_case(out_features, in_features, sparsity, dtype, generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    offsets = offsets.to(torch.int32).to(DEVICE)
    check.weight = check.weight.to(DEVICE)
    check.compare(lambda x, v, b: _with_bias(TritonDiag.apply(x, v, offsets, out_features,
                                                              splits), b),
                  x.to(DEVICE), values.to(DEVICE), None if bias is None else bias.to(DEVICE),
                  seed)


@triton_settings
@given(out_features=small_sizes, in_features=small_sizes, rows=st.integers(0, 40),
       sparsity=sparsities, dtype=st.sampled_from(FLOAT_DTYPES + [torch.float64]),
       with_bias=st.booleans(), splits=st.sampled_from([None, 2, 3]),
       seed=st.integers(0, 2**31 - 1))
@example(out_features=129, in_features=33, rows=40, sparsity=0.9, dtype=torch.float32,
         with_bias=True, splits=None, seed=0)
@example(out_features=1, in_features=1, rows=1, sparsity=0.0, dtype=torch.bfloat16,
         with_bias=False, splits=None, seed=1)
@example(out_features=130, in_features=129, rows=1, sparsity=0.5, dtype=torch.float16,
         with_bias=False, splits=3, seed=2)  # one row, slots split three ways: partial sums
def test_triton_fanin_kernels(out_features, in_features, rows, sparsity, dtype, with_bias,
                              splits, seed):
    generator = torch.Generator().manual_seed(seed)
    values, indices, check = fanin_case(out_features, in_features, sparsity, dtype, generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    indices = indices.to(DEVICE)
    check.weight = check.weight.to(DEVICE)
    check.stored = tuple(t.to(DEVICE) for t in check.stored)
    check.compare(lambda x, v, b: _with_bias(TritonFanin.apply(x, v, indices, splits), b),
                  x.to(DEVICE), values.to(DEVICE), None if bias is None else bias.to(DEVICE),
                  seed)


class TritonBlockdiag(torch.autograd.Function):
    """blockdiag_linear wired straight to the Triton kernels."""

    @staticmethod
    def forward(ctx, x, values, offsets, out_features, groups):
        ctx.save_for_backward(x, values, offsets)
        ctx.groups = groups
        return blockdiag_triton.blockdiag_forward(x, values, offsets, out_features, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = blockdiag_triton.blockdiag_input_grad(grad_out, values, offsets, x.shape[1],
                                                       ctx.groups)
        grad_values = blockdiag_triton.blockdiag_values_grad(grad_out, x, offsets, ctx.groups)
        return grad_x, grad_values, None, None, None


@pytest.fixture
def poisoned_blockdiag_buffers(monkeypatch):
    """Every buffer the blocked kernels fill starts as NaN: a missed store fails."""
    def empty(like, *shape):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    monkeypatch.setattr(blockdiag_triton, "_empty", empty)


@triton_settings
@given(groups=st.sampled_from([1, 2, 3, 8]), out_block=st.sampled_from([1, 5, 16, 24, 33]),
       in_block=st.sampled_from([1, 7, 16, 40]), rows=st.sampled_from([0, 1, 15, 16, 40, 70]),
       sparsity=st.sampled_from([0.5, 0.75]),
       dtype=st.sampled_from(FLOAT_DTYPES + [torch.float64]), seed=st.integers(0, 2**31 - 1))
@example(groups=8, out_block=24, in_block=40, rows=70, sparsity=0.75, dtype=torch.bfloat16,
         seed=0)  # tensor-core tiles over several k steps, masked edges, 2 cosets
@example(groups=3, out_block=33, in_block=16, rows=16, sparsity=0.5, dtype=torch.float32,
         seed=1)
def test_triton_blockdiag_kernels(poisoned_blockdiag_buffers, groups, out_block, in_block,
                                  rows, sparsity, dtype, seed):
    """Both sides of BLOCKED_MIN_ROWS (the diag kernels below it, and for float64)."""
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = blockdiag_case(groups, out_block, in_block, sparsity, dtype,
                                            generator)
    x = torch.randn(rows, groups * in_block, generator=generator).to(dtype)
    check.weight = check.weight.to(DEVICE)
    offsets = offsets.to(DEVICE)
    out_features = groups * out_block
    check.compare(lambda x, v, b: TritonBlockdiag.apply(x, v, offsets, out_features, groups),
                  x.to(DEVICE), values.to(DEVICE), None, seed)


def test_triton_fanin_masks_out_of_range_ids():
    """An id outside [0, in) must never be read: the kernels mask it off."""
    x = torch.randn(4, 6, device=DEVICE)
    values = torch.ones(3, 2, device=DEVICE)
    indices = torch.tensor([[0, 1], [2, 600], [-7, 5]], dtype=torch.int32, device=DEVICE)
    y = fanin_triton.fanin_forward(x, values, indices)
    expected = torch.stack([x[:, 0] + x[:, 1], x[:, 2], x[:, 5]], dim=1)
    torch.testing.assert_close(y, expected)


@pytest.fixture
def triton_cpu_kernels():
    from sparsefx.kernels import use_cpu_kernels
    with use_cpu_kernels("triton"):
        yield


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the ops on Triton in test_gpu.py")
@triton_settings
@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24),
       leading=st.lists(st.integers(0, 3), max_size=3).map(tuple), sparsity=sparsities,
       dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(), seed=st.integers(0, 999))
def test_ops_on_triton_kernels(triton_cpu_kernels, out_features, in_features, leading, sparsity,
                               dtype, with_bias, seed):
    """The public ops end to end -- checks, reshapes, autograd, bias -- on the Triton kernels
    (the path CUDA tensors take), run on CPU tensors under the interpreter."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    values, offsets, check = diag_case(out_features, in_features, sparsity, dtype, generator)
    check.compare(lambda x, v, b: torch.ops.sparsefx.diag_linear(x, v, offsets, out_features, b),
                  x, values, bias, seed)
    values, indices, check = fanin_case(out_features, in_features, sparsity, dtype, generator)
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices, b),
                  x, values, bias, seed)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the ops on Triton in test_gpu.py")
@triton_settings
@given(groups=st.sampled_from([1, 2, 4]), out_block=st.sampled_from([3, 16, 20]),
       in_block=st.sampled_from([2, 16, 17]), leading=st.sampled_from([(5,), (2, 9), (20,)]),
       sparsity=st.sampled_from([0.5, 0.75]), dtype=st.sampled_from(FLOAT_DTYPES),
       with_bias=st.booleans(), seed=st.integers(0, 999))
def test_blockdiag_op_on_triton_kernels(triton_cpu_kernels, groups, out_block, in_block,
                                        leading, sparsity, dtype, with_bias, seed):
    """sparsefx::blockdiag_linear end to end on the Triton kernels, blocked (18 and 20 rows)
    and not (5)."""
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = blockdiag_case(groups, out_block, in_block, sparsity, dtype,
                                            generator)
    out_features = groups * out_block
    x = torch.randn(*leading, groups * in_block, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    check.compare(lambda x, v, b: torch.ops.sparsefx.blockdiag_linear(x, v, offsets,
                                                                      out_features, groups, b),
                  x, values, bias, seed)


def test_blockdiag_autotune_set_is_the_compiled_set():
    """On a GPU the blockdiag kernels are autotuned over exactly the configurations the
    compile check compiles (each dtype's tiles and warps), keyed on rows bucket and block
    sides."""
    variants = list(blockdiag_triton.launch_variants())
    for dtype in blockdiag_triton.DTYPES:
        configs = blockdiag_triton._configs(dtype)
        tuned = blockdiag_triton._tuned(blockdiag_triton._blockdiag_forward_kernel, dtype)
        assert list(tuned.keys) == ["rows_key", "in_block", "out_block"]
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
                for c in tuned.configs] == [
            (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"]) for c in configs]
        precisions = len(blockdiag_triton.PRECISIONS[dtype])
        assert sum(v.kernel is blockdiag_triton._blockdiag_forward_kernel
                   and v.constexprs["BLOCK_M"] in {16, blockdiag_triton.LARGE_TILE[dtype]}
                   and v.signature["xp_ptr"] == "*" + {torch.float16: "fp16",
                                                       torch.bfloat16: "bf16",
                                                       torch.float32: "fp32"}[dtype]
                   for v in variants) == len(configs) * precisions


@pytest.mark.parametrize("kernel", ["_blockdiag_forward_kernel", "_blockdiag_input_grad_kernel",
                                    "_blockdiag_values_grad_kernel"])
def test_blockdiag_autotune_times_at_most_four_suited_configs(kernel):
    """A first GPU run tunes each kernel once per (rows bucket, block sides): the autotuner
    times at most 4 of the 8 tiles, none wider than the side it covers needs, with a short
    ``do_bench``; a side of at most 16 leaves the 16-wide tile alone."""
    from sparsefx.kernels import triton_runtime
    jit = getattr(blockdiag_triton, kernel)
    for dtype in blockdiag_triton.DTYPES:
        tuned = blockdiag_triton._tuned(jit, dtype)
        assert tuned.do_bench is triton_runtime.autotune_bench
        sides = blockdiag_triton._TILE_SIDES[kernel]
        assert set(sides) <= set(jit.arg_names)
        for rows_key, in_block, out_block in [(1, 16, 16), (1, 64, 64), (16, 48, 256),
                                              (4096, 64, 64), (4096, 768, 3072)]:
            named = dict(rows_key=rows_key, in_block=in_block, out_block=out_block)
            kept = tuned.early_config_prune(tuned.configs, named)
            assert 1 <= len(kept) <= blockdiag_triton.MAX_TIMED
            assert all(c in tuned.configs for c in kept)
            for config in kept:
                for tile, side in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), sides):
                    assert config.kwargs[tile] <= max(16, 1 << (named[side] - 1).bit_length())
        kept = tuned.early_config_prune(tuned.configs, dict(rows_key=1, in_block=16, out_block=16))
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [
            (16, 16, 16)]


def test_diag_and_fanin_autotune_keys_name_kernel_arguments(monkeypatch):
    """The diag and fan-in launches take their warps from an autotuner on a GPU. Triton's
    autotuner silently drops a key name that is not a kernel argument (and would then reuse
    one timing for every shape), so every launch's key, reset list and warp set is checked
    here on the path a GPU takes, the kernels run by the interpreter with the first choice;
    the warps are those the compile check compiles."""
    from sparsefx.kernels import triton_runtime, triton_variants
    launches, autotuned = [], triton_runtime._autotuned

    def recorded(kernel, warps, key, reset_to_zero):
        launches.append((kernel, warps, key, reset_to_zero))
        real = autotuned(kernel, warps, key, reset_to_zero)
        assert [c.num_warps for c in real.configs] == list(warps)
        assert real.do_bench is triton_runtime.autotune_bench  # the short timing

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **constexprs: kernel[grid](
                    *args, num_warps=warps[0], **constexprs)
        return Launcher()

    monkeypatch.setattr(triton_runtime, "INTERPRETED", False)
    monkeypatch.setattr(triton_runtime, "_autotuned", recorded)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 17):  # the one-row tiles and the row-block tiles
        values, offsets, check = diag_case(1100, 40, 0.9, torch.float32, generator)
        x = torch.randn(rows, 40, generator=generator)
        y = diag_triton.diag_apply(x, values, offsets, 1100, gather=False)
        torch.testing.assert_close(y, x @ check.weight.T, rtol=1e-5, atol=1e-5)
        values, indices, check = fanin_case(130, 70, 0.5, torch.float32, generator)
        x = torch.randn(rows, 70, generator=generator)
        torch.testing.assert_close(fanin_triton.fanin_forward(x, values, indices),
                                   x @ check.weight.T, rtol=1e-5, atol=1e-5)
        grad = torch.randn(rows, 130, generator=generator)
        torch.testing.assert_close(fanin_triton.fanin_input_grad(grad, values, indices, 70),
                                   grad @ check.weight, rtol=1e-5, atol=1e-5)
    assert {kernel.__name__ for kernel, *_ in launches} == {
        "_diag_apply_kernel", "_fanin_forward_kernel", "_fanin_input_grad_kernel"}
    compiled = {(v.kernel, v.num_warps) for v in triton_variants.every_variant()}
    for kernel, warps, key, reset_to_zero in launches:
        assert set(key) | set(reset_to_zero) <= set(kernel.arg_names), kernel.__name__
        assert "rows_key" in key and all((kernel, w) in compiled for w in warps)
    assert any(reset == ("grad_x_ptr",) for *_, reset in launches)  # the atomics' buffer
