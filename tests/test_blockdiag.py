"""The blockdiag pattern end to end: the layer against its dense reference, and DST moving
whole cosets (the generic methods), with the invariants the other patterns keep."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparsefx
from sparsefx.kernels import patterns
from sparsefx.layers import BlockDiagLinear


@settings(deadline=None, max_examples=30)
@given(groups=st.sampled_from([1, 2, 3, 4, 8]), out_blocks=st.integers(1, 5),
       in_blocks=st.integers(1, 5), sparsity=st.sampled_from([0.5, 0.75, 0.9]),
       init=st.sampled_from(["magnitude", "random"]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_the_layer_computes_its_dense_weight(groups, out_blocks, in_blocks, sparsity, init,
                                             bias, seed):
    torch.manual_seed(seed)
    out_features, in_features = groups * out_blocks, groups * in_blocks
    weight = torch.randn(out_features, in_features)
    layer = BlockDiagLinear.from_dense(weight, torch.randn(out_features) if bias else None,
                                       sparsity=sparsity, groups=groups, init=init)
    assert layer.num_cosets == patterns.blockdiag_num_cosets(groups, sparsity)
    patterns.check_blockdiag_offsets(layer.offsets, out_features, in_features, groups)
    x = torch.randn(2, 3, in_features, requires_grad=True)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    if init == "magnitude":  # the kept cosets are those of largest norm
        norms = patterns.diag_norms(weight).square().view(-1, groups).sum(0)
        kept = set(layer.slots()[0].tolist())
        assert min(norms[list(kept)]) >= max([norms[r] for r in range(groups)
                                              if r not in kept], default=-1.0)


def test_transform_chooses_the_blocks_and_densify_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sparse = sparsefx.transform(model, pattern="blockdiag", sparsity=0.75)
    layer = sparse.get_submodule("0")
    assert isinstance(layer, BlockDiagLinear)
    assert layer.groups == patterns.blockdiag_groups(128, 64, 0.75)
    assert layer.in_features // layer.groups >= 16
    x = torch.randn(4, 64)
    torch.testing.assert_close(sparsefx.densify(sparse)(x), sparse(x))
    assert "blockdiag" in str(sparsefx.report(sparse))


@pytest.mark.parametrize("method", ["set", "rigl", "dynadiag"])
def test_dst_moves_whole_cosets(method):
    torch.manual_seed(0)
    # g = 8, 3 cosets kept: room for updates to move some (transform's choice of g keeps
    # blocks of 16 or more, so layers this small would get 1 coset)
    layers = [BlockDiagLinear.from_dense(torch.randn(out_features, in_features) / 6,
                                         torch.zeros(out_features), sparsity=0.625, groups=8,
                                         init="random")
              for out_features, in_features in [(64, 32), (32, 64)]]
    sparse = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), nn.Linear(32, 10))
    assert [layer.num_cosets for layer in layers] == [3, 3]
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=0.05)
    dst = sparsefx.DST(sparse, optimizer, method=method, total_steps=40, delta_t=4, alpha=0.5,
                       t_end=0.9)
    counts = [layer.num_cosets for layer in layers]
    moved = 0
    for step in range(40):
        optimizer.zero_grad()
        F.cross_entropy(sparse(torch.randn(8, 32)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
        before = [(layer.slots().clone(), layer.values.detach().clone()) for layer in layers]
        changed = dst.step()
        moved += changed
        for layer, (slots, values) in zip(layers, before, strict=True):
            patterns.check_blockdiag_offsets(layer.offsets, layer.out_features,
                                             layer.in_features, layer.groups)
            assert layer.num_cosets == counts[layers.index(layer)]
            new = (layer.slots() != slots)[0].repeat_interleave(layer._per_coset)
            assert torch.all(layer.values[new] == 0), "grown cosets start at zero"
            for state in optimizer.state[layer.values].values():
                if torch.is_tensor(state) and state.shape == layer.values.shape:
                    assert torch.all(state[new] == 0)
            assert torch.equal(layer.values[~new], values[~new]), "kept cosets keep values"
    assert moved >= 2, "the run must cross structure updates that move cosets"
    assert "cosets" in repr(dst)


def test_dynadiag_gates_whole_cosets_and_folds_them_away():
    torch.manual_seed(0)
    layer = BlockDiagLinear.from_dense(torch.randn(64, 32) / 6, None, sparsity=0.625,
                                       groups=8, init="random")
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, method="dynadiag", total_steps=12, delta_t=3)
    x = torch.randn(5, 32)
    for step in range(12):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
        if step == 4:  # the importances have moved apart by now
            with torch.no_grad():
                gates = layer.value_transform.gates().view(3, -1)
            assert gates.shape[1] == 64 // 8 and len(set(gates[:, 0].tolist())) > 1
            assert torch.equal(gates, gates[:, :1].expand_as(gates)), \
                "one gate per coset, on all of its diagonals"
        if step == 11:
            with torch.no_grad():
                before = model(x)
        dst.step()
    assert layer.value_transform is None, "the gates are folded into the values at the end"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    patterns.check_blockdiag_offsets(layer.offsets, 64, 32, 8)


def test_transform_overrides_choose_the_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sparse = sparsefx.transform(model, pattern="blockdiag", sparsity=0.75, overrides={
        "0": {"pattern": "blockdiag", "sparsity": 0.75, "groups": 8}})
    assert sparse.get_submodule("0").groups == 8
    assert sparse.get_submodule("2").groups == patterns.blockdiag_groups(64, 128, 0.75)
    with pytest.raises(ValueError, match=r"layer 0: groups=5: expected a positive divisor"):
        sparsefx.transform(model, pattern="blockdiag", sparsity=0.75,
                           overrides={"0": {"sparsity": 0.75, "groups": 5}})
    with pytest.raises(ValueError, match=r"has keys \['groups'\]: expected pattern, sparsity, "
                                         r"nm \(for pattern 'diag'\)"):
        sparsefx.transform(model, pattern="diag", sparsity=0.75,
                           overrides={"0": {"sparsity": 0.75, "groups": 8}})


# ------------------------------------------------------------------------------------ ops
# sparsefx::blockdiag_linear runs batched GEMMs from 128 rows and 64-output blocks, the diag
# kernels below: both sides of that line, on the native and the PyTorch kernels.

OPS = torch.ops.sparsefx


def _op_inputs(groups, out_block, in_block, rows, sparsity, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = groups * out_block, groups * in_block
    cosets = torch.randperm(groups, generator=generator)[
        :patterns.blockdiag_num_cosets(groups, sparsity)]
    offsets = patterns.blockdiag_offsets(out_features, in_features, groups, cosets)
    _, length = patterns.diag_geometry(out_features, in_features)
    values = torch.randn(offsets.numel(), length, generator=generator, dtype=dtype)
    x = torch.randn(rows, in_features, generator=generator, dtype=dtype)
    bias = torch.randn(out_features, generator=generator, dtype=dtype)
    return x, values, offsets, bias


@pytest.mark.parametrize("kernels", ["native", "torch"])
@settings(deadline=None, max_examples=20)
@given(groups=st.sampled_from([1, 2, 3, 4]), out_block=st.sampled_from([1, 5, 64, 70]),
       in_block=st.integers(1, 40), rows=st.sampled_from([1, 7, 128, 150]),
       sparsity=st.sampled_from([0.5, 0.75]), seed=st.integers(0, 2**16))
def test_the_op_and_its_gradients_match_the_dense_reference(kernels, groups, out_block,
                                                            in_block, rows, sparsity, seed):
    x, values, offsets, bias = _op_inputs(groups, out_block, in_block, rows, sparsity,
                                          torch.float64, seed)
    out_features, in_features = groups * out_block, groups * in_block
    x.requires_grad_()
    values.requires_grad_()
    with sparsefx.kernels.use_cpu_kernels(kernels):
        y = OPS.blockdiag_linear(x, values, offsets, out_features, groups, bias)
        grad_out = torch.randn_like(y)
        grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_out)
    weight = patterns.diag_to_dense(values.detach(), offsets, out_features, in_features)
    weight.requires_grad_()
    x_dense = x.detach().requires_grad_()
    reference = F.linear(x_dense, weight, bias)
    ref_grad_x, ref_grad_weight = torch.autograd.grad(reference, (x_dense, weight), grad_out)
    rows_ids, cols_ids = patterns.diag_coordinates(offsets, out_features, in_features)
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(grad_x, ref_grad_x)
    torch.testing.assert_close(grad_values, ref_grad_weight[rows_ids, cols_ids])


@pytest.mark.parametrize("groups,out_block,in_block,rows", [(2, 3, 4, 5), (4, 64, 2, 130),
                                                            (2, 64, 6, 128)])
def test_opcheck_and_gradcheck(groups, out_block, in_block, rows):
    x, values, offsets, bias = _op_inputs(groups, out_block, in_block, rows, 0.5)
    out_features, in_features = groups * out_block, groups * in_block
    torch.library.opcheck(OPS.blockdiag_linear,
                          (x.requires_grad_(), values.requires_grad_(), offsets, out_features,
                           groups, bias))
    grad_out = torch.randn(rows, out_features)
    torch.library.opcheck(OPS.blockdiag_linear_grad_input,
                          (grad_out, values.detach(), offsets, in_features, groups))
    torch.library.opcheck(OPS.blockdiag_linear_grad_values,
                          (grad_out, x.detach(), values.detach(), offsets, groups))
    inputs = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    assert torch.autograd.gradcheck(
        lambda x, v, b: OPS.blockdiag_linear(x, v, offsets, out_features, groups, b), inputs)


def test_compiled_model_matches_eager_with_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sparsefx.transform(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 8)),
                               "blockdiag", 0.75, keep_last_dense=True)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(130, 32)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    for compiled_grad, param in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(compiled_grad, param.grad)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_errors_name_groups_and_partial_cosets(kernels):
    x, values, offsets, bias = _op_inputs(4, 3, 2, 5, 0.5)
    with sparsefx.kernels.use_cpu_kernels(kernels):
        with pytest.raises(ValueError, match=r"sparsefx.blockdiag_linear: groups=5: expected a "
                                             r"positive divisor of both out_features=12"):
            OPS.blockdiag_linear(x, values, offsets, 12, 5, bias)
        partial = offsets[1:].clone()  # one diagonal of a coset dropped
        with pytest.raises(ValueError, match=r"sparsefx.blockdiag_linear: offsets holds 2 of "
                                             r"the 3 diagonals of coset \d \(mod g = 4\): "
                                             r"expected whole cosets"):
            OPS.blockdiag_linear(x, values[1:], partial, 12, 4, bias)


def test_flop_counter_counts_stored_multiply_adds():
    from torch.utils.flop_counter import FlopCounterMode

    x, values, offsets, bias = _op_inputs(2, 64, 4, 130, 0.5)
    x.requires_grad_()
    values.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        y = OPS.blockdiag_linear(x, values, offsets, 128, 2, bias)
    assert counter.get_total_flops() == 2 * 130 * values.numel()
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * 2 * 130 * values.numel()


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_blocks_follow_in_place_changes_to_values_and_structure(kernels):
    """The kernels keep the values laid out as blocks (and the layout) between calls: an
    in-place write to either, as an optimizer step or DST makes, is seen by the next call."""
    x, values, offsets, bias = _op_inputs(4, 64, 8, 130, 0.5)  # blocked: 130 rows, 64 outputs

    def check():
        weight = patterns.diag_to_dense(values, offsets, 256, 32)
        with sparsefx.kernels.use_cpu_kernels(kernels):
            torch.testing.assert_close(OPS.blockdiag_linear(x, values, offsets, 256, 4, bias),
                                       F.linear(x, weight, bias))

    check()
    values.mul_(-2.0)  # an optimizer step
    check()
    kept = patterns.blockdiag_cosets(offsets, 4)
    moved = torch.tensor([r for r in range(4) if r not in kept.tolist()][:kept.numel()])
    offsets.copy_(patterns.blockdiag_offsets(256, 32, 4, moved))  # DST moves the cosets
    check()


def test_groups_may_be_symbolic_under_compile():
    """Under torch.compile ``groups`` may arrive as a SymInt: code shared by layers of other
    groups (FSDP2's per-layer hooks make dynamo trace each layer's forward on its own), or
    ``dynamic=True``. The checks take it."""
    layer = sparsefx.transform(torch.nn.Sequential(torch.nn.Linear(128, 128)), "blockdiag",
                               0.75, overrides={"0": {"groups": 8}})[0]
    run = torch.compile(lambda x, groups: torch.ops.sparsefx.blockdiag_linear(
        x, layer.values, layer.offsets, 128, groups, layer.bias), dynamic=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(run(x, 8), layer(x))
