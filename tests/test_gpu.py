"""The public ops on CUDA tensors (Triton kernels compiled for the GPU) against the dense
reference. Skipped where no CUDA device is present, as in CI."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsefx
from helpers import blockdiag_case, diag_case, fanin_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

sizes = st.one_of(st.integers(1, 80), st.sampled_from([127, 129, 255, 257, 1000, 1024]))


def _cuda(tensor):
    return None if tensor is None else tensor.cuda()


@settings(max_examples=60)
@given(out_features=sizes, in_features=sizes, rows=st.integers(0, 300),
       sparsity=st.sampled_from([0.5, 0.9, 0.95]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cuda_ops_match_dense(out_features, in_features, rows, sparsity, dtype, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    values, offsets, check = diag_case(out_features, in_features, sparsity, dtype, generator)
    check.weight = check.weight.cuda()
    check.stored = tuple(t.cuda() for t in check.stored)
    offsets = offsets.cuda()
    check.compare(lambda x, v, b: torch.ops.sparsefx.diag_linear(x, v, offsets, out_features, b),
                  x.cuda(), values.cuda(), _cuda(bias), seed)
    values, indices, check = fanin_case(out_features, in_features, sparsity, dtype, generator)
    check.weight = check.weight.cuda()
    check.stored = tuple(t.cuda() for t in check.stored)
    indices = indices.cuda()
    check.compare(lambda x, v, b: torch.ops.sparsefx.fanin_linear(x, v, indices, b),
                  x.cuda(), values.cuda(), _cuda(bias), seed)


@settings(max_examples=40)
@given(groups=st.sampled_from([1, 2, 4, 8, 32]), out_block=st.sampled_from([1, 16, 24, 96, 130]),
       in_block=st.sampled_from([1, 16, 24, 96, 130]),
       rows=st.sampled_from([0, 1, 15, 16, 256, 300]),
       sparsity=st.sampled_from([0.5, 0.9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cuda_blockdiag_matches_dense(groups, out_block, in_block, rows, sparsity, dtype,
                                      with_bias, seed):
    """The tensor-core kernels (from 16 rows) and the diag kernels below."""
    generator = torch.Generator().manual_seed(seed)
    values, offsets, check = blockdiag_case(groups, out_block, in_block, sparsity, dtype,
                                            generator)
    out_features = groups * out_block
    x = torch.randn(rows, groups * in_block, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    check.weight = check.weight.cuda()
    check.stored = tuple(t.cuda() for t in check.stored)
    offsets = offsets.cuda()
    check.compare(lambda x, v, b: torch.ops.sparsefx.blockdiag_linear(x, v, offsets, out_features,
                                                                      groups, b),
                  x.cuda(), values.cuda(), _cuda(bias), seed)


def test_cuda_compile_fullgraph():
    values = torch.randn(4, 32, device="cuda", requires_grad=True)
    offsets = torch.tensor([0, 5, 9, 30], device="cuda")
    x = torch.randn(8, 32, device="cuda")

    @torch.compile(fullgraph=True)
    def step(x, values):
        return torch.ops.sparsefx.diag_linear(x, values, offsets, 64).square().sum()

    step(x, values).backward()
    reference = values.grad.clone()
    values.grad = None
    torch.ops.sparsefx.diag_linear(x, values, offsets, 64).square().sum().backward()
    torch.testing.assert_close(reference, values.grad)


@pytest.mark.parametrize("pattern", ["diag", "fanin", "blockdiag"])
def test_cuda_graphs_replay_the_ops_across_structure_updates(pattern):
    """torch.compile(mode="reduce-overhead") records the ops into CUDA graphs; a structure
    written in place between replays (as DST writes it) must reach the next replay."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64))
    model = sparsefx.transform(dense, pattern, 0.75).cuda()
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(32, 64, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            torch.testing.assert_close(compiled(x).clone(), model(x))
        for layer in (model[0], model[2]):  # a new structure, written in place
            options = {"groups": layer.groups} if pattern == "blockdiag" else {}
            fresh = type(layer).from_dense(torch.randn(layer.out_features, layer.in_features),
                                           sparsity=0.75, init="random",
                                           generator=torch.Generator().manual_seed(1),
                                           **options)
            layer.structure.copy_(fresh.structure)
        for _ in range(2):
            torch.testing.assert_close(compiled(x).clone(), model(x))
