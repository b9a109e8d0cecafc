"""SRigL as its reference code (``RigLConstFanScheduler``) defines it, checked on small weights
and gradients whose expected masks were worked out by hand from the reference's rule: the
layer-wide drop, the salience of a row (kept set united with the top gradients over every
position), the floor on live rows, the fan-in recomputed from the live rows, the per-row
refill; and sparsefx 0.1's per-row drop and fixed fan-in, kept as options."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import sparsefx
from sparsefx import regrow


def _layer(in_features, out_features, sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    return sparsefx.transform(model, "fanin", sparsity, init="random")


def _update_once(model, method, indices, values, dense_grad, lr=0.0):
    """Plant the structure, the weights and the dense gradient, then one DST update (step 1
    of 100, so f = 0.3 * (1 + cos(pi / 50)) / 2 = 0.2996). Adam at lr=0 keeps the values."""
    layer = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=100, delta_t=1,
                       t_end=0.5)
    with torch.no_grad():
        layer.indices.copy_(indices)
        layer.values.copy_(values)
    model(torch.eye(layer.in_features)).mul(dense_grad.T).sum().backward()
    optimizer.step()
    changed = dst.step()
    return dst, optimizer, changed


# a (4, 8) layer at 50 %: k0 = 4, budget 16; every row on columns 0-3 to begin with
INDICES = torch.arange(4).expand(4, 4).clone()
VALUES = torch.tensor([[9, 8, 7, 6], [5, .1, .2, 4], [.3, .4, .5, 3], [2, 1.5, 1.2, 1.1]])


def _dense_gradient():
    grad = torch.zeros(4, 8)
    grad[0, 4:] = torch.tensor([.5, .1, .2, .3])
    grad[1] = torch.tensor([0, 3., 0, 0, .05, 2., 1., .01])  # column 1 (dropped) is hot
    grad[3, 6] = .6
    return grad  # row 2: no gradient at all


def _sorted_rows(layer):
    return [sorted(row) for row in layer.indices.tolist()]


def test_reference_rule_drops_layer_wide_ablates_and_spreads_the_budget():
    """Drop round(0.2996 * 16) = 5 smallest layer-wide: .1 .2 (row 1), .3 .4 .5 (row 2).
    Grow set, the top 5 |G| over all 32 positions: (1,1) 3, (1,5) 2, (1,6) 1, (3,6) .6,
    (0,4) .5. Salience (kept united with grow): rows 5, 5, 1, 5; the minimum is
    floor(0.5 * 4) = 2 and at least 16 // 8 + 1 = 3 rows stay: row 2 is ablated. The three
    live rows share the 16 weights: fan-in 16 // 3 = 5. Refill by |G| among the positions
    not kept: row 0 takes 4; row 1 takes 1 (dropped, grown back with its value .1), 5, 6;
    row 3 takes 6."""
    model = _layer(8, 4, 0.5)
    layer = model[0]
    values = layer.values
    dst, _, changed = _update_once(model, sparsefx.SRigL(gamma_sal=0.5, output_layers=()),
                                   INDICES, VALUES, _dense_gradient())
    assert changed
    assert layer.values is values, "the same Parameter, resized"
    assert layer.indices.shape == (4, 5)
    assert dst.method.row_active["0"].tolist() == [True, True, False, True]
    assert _sorted_rows(layer)[0] == [0, 1, 2, 3, 4]
    assert _sorted_rows(layer)[1] == [0, 1, 3, 5, 6]
    assert _sorted_rows(layer)[3] == [0, 1, 2, 3, 6]
    dense = layer.dense_weight()
    assert dense[0].tolist() == [9, 8, 7, 6, 0, 0, 0, 0]
    torch.testing.assert_close(dense[1], torch.tensor([5, .1, 0, 4, 0, 0, 0, 0]))
    assert torch.all(dense[2] == 0), "the ablated row holds zeros"
    torch.testing.assert_close(dense[3], torch.tensor([2, 1.5, 1.2, 1.1, 0, 0, 0, 0]))
    assert "1 rows ablated" in repr(dst)


def test_layer_wide_drop_with_fixed_fan_in():
    """As above, but the fan-in stays 4: row 1 refills 2 (column 1 back, then 5); row 2 is
    ablated; rows 0 and 3 kept everything."""
    model = _layer(8, 4, 0.5)
    layer = model[0]
    dst, _, _ = _update_once(model, sparsefx.SRigL(gamma_sal=0.5, output_layers=(),
                                                   fan_in="fixed"),
                             INDICES, VALUES, _dense_gradient())
    assert layer.indices.shape == (4, 4)
    assert dst.method.row_active["0"].tolist() == [True, True, False, True]
    assert layer.indices.tolist()[1] == [0, 1, 5, 3], "kept entries keep their slots"
    torch.testing.assert_close(layer.values[1], torch.tensor([5, .1, 0, 4]))
    assert torch.all(layer.values[2] == 0)
    assert torch.equal(layer.values[0], VALUES[0]) and torch.equal(layer.values[3], VALUES[3])


def test_per_row_drop_with_fixed_fan_in_is_sparsefx_0_1s_rule():
    """round(0.2996 * 4) = 1 dropped in every row: 6, .1, .3, 1.1. Every row keeps 3 >= the
    minimum 2, so nothing is ablated. Refill one each: row 0 column 4; row 1 column 1 back
    (its value .1); row 2 nothing is hot, so the tie goes to the lowest candidate, its own
    dropped slot (column 0, value .3); row 3 column 6."""
    model = _layer(8, 4, 0.5)
    layer = model[0]
    dst, _, _ = _update_once(model, sparsefx.SRigL(gamma_sal=0.5, output_layers=(),
                                                   drop="row", fan_in="fixed"),
                             INDICES, VALUES, _dense_gradient())
    assert bool(dst.method.row_active["0"].all())
    assert layer.indices.tolist() == [[0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 6]]
    torch.testing.assert_close(layer.values, torch.tensor(
        [[9, 8, 7, 0], [5, .1, .2, 4], [.3, .4, .5, 3], [2, 1.5, 1.2, 0]]))


def test_too_few_salient_rows_lower_the_threshold_to_keep_the_floor():
    """A (4, 8) layer at 75 %: k0 = 2, budget 8, so at least 8 // 8 + 1 = 2 rows stay.
    Drop round(0.2996 * 8) = 2: .1 (row 1) and .2 (row 2). The top 2 |G|: (3, 0) 5, then
    a tie at 0 won by the lowest position (0, 0), a kept entry (counted once). Salience 2,
    1, 1, 3 against a minimum of floor(1.0 * 2) = 2: rows 0 and 3 live, fan-in 8 // 2 = 4;
    row 3 takes column 0 (hot), then 1 (the tie's lowest)."""
    model = _layer(8, 4, 0.75)
    layer = model[0]
    indices = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    values = torch.tensor([[4., 3.], [.1, 2.], [.2, 1.], [.3, .4]])
    grad = torch.zeros(4, 8)
    grad[3, 0] = 5.0
    dst, _, _ = _update_once(model, sparsefx.SRigL(gamma_sal=1.0, output_layers=()),
                             indices, values, grad)
    assert dst.method.row_active["0"].tolist() == [True, False, False, True]
    assert layer.indices.tolist()[0] == [0, 1, 2, 3]
    assert layer.indices.tolist()[3] == [6, 7, 0, 1]
    assert torch.all(layer.values[1:3] == 0)


@given(salient=st.lists(st.integers(0, 9), min_size=1, max_size=12),
       minimum=st.integers(1, 9), fewest=st.integers(1, 12))
def test_live_rows_follow_the_reference_threshold(salient, minimum, fewest):
    """The reference sorts the rows by salience; if the row at position ``fewest - 1`` is
    below the minimum, the minimum drops to its salience; rows below the minimum go."""
    counts = torch.tensor(salient)
    ranked = sorted(salient, reverse=True)
    position = min(fewest, len(salient)) - 1
    threshold = ranked[position] if ranked[position] < minimum else minimum
    expected = [count >= threshold for count in salient]
    live = regrow.live_rows(counts, minimum, fewest)
    assert live.tolist() == expected
    assert int(live.sum()) >= min(fewest, len(salient))


def test_the_output_head_is_never_ablated():
    model = _layer(8, 4, 0.5)  # its one layer is the last one: the head
    dst, _, _ = _update_once(model, "srigl", INDICES, VALUES, _dense_gradient())
    assert bool(dst.method.row_active["0"].all())
    assert model[0].indices.shape == (4, 4), "no ablation, no new fan-in"


def test_a_resize_carries_the_optimizer_state_with_the_units():
    """Adam's moments follow each unit to its new slot; a new unit's are zero."""
    model = _layer(8, 4, 0.5)
    layer = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dst = sparsefx.DST(model, optimizer, method=sparsefx.SRigL(gamma_sal=0.5,
                                                               output_layers=()),
                       total_steps=100, delta_t=2, t_end=0.5)
    model(torch.randn(3, 8)).sum().backward()  # step 1: Adam's state exists
    optimizer.step()
    dst.step()
    optimizer.zero_grad()
    with torch.no_grad():
        layer.indices.copy_(INDICES)
        layer.values.copy_(VALUES)
    state = optimizer.state[layer.values]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key].copy_(torch.arange(16.0).view(4, 4) + 1)
    before = {key: _dense_state(layer, state[key]) for key in ("exp_avg", "exp_avg_sq")}
    model(torch.eye(8)).mul(_dense_gradient().T).sum().backward()
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the step leaves the values (not the moments) as planted
    optimizer.step()
    after_step = {key: _dense_state(layer, state[key]) for key in before}
    old_active = _dense_active(layer)
    assert dst.step()
    assert layer.indices.shape == (4, 5)
    state = optimizer.state[layer.values]
    new_active = _dense_active(layer)
    stayed = old_active & new_active
    stayed[2] = False
    for key in before:
        assert state[key].shape == layer.values.shape
        moved = _dense_state(layer, state[key])
        assert torch.equal(moved[stayed], after_step[key][stayed])
        assert torch.all(moved[new_active & ~old_active] == 0)


def _dense_active(layer):
    active = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool)
    return active.scatter_(1, layer.indices.long(), True)


def _dense_state(layer, state):
    return torch.zeros(layer.out_features, layer.in_features).scatter_(
        1, layer.indices.long(), state.detach())


def test_a_compiled_model_recompiles_once_per_fan_in_change():
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(0)
    model = sparsefx.transform(nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU(),
                                             nn.Linear(4, 3, bias=False)),
                               "fanin", 0.5, init="random")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, method=sparsefx.SRigL(gamma_sal=0.5),
                       total_steps=100, delta_t=1, t_end=0.5)
    layer = model[0]
    with torch.no_grad():
        layer.indices.copy_(INDICES)
        layer.values.copy_(VALUES)
    fan_ins = [layer.indices.shape[1]]
    for step in range(4):
        optimizer.zero_grad()
        compiled(torch.eye(8)).sum().backward()
        optimizer.step()
        dst.step()
        fan_ins.append(layer.indices.shape[1])
    compiled(torch.eye(8)).sum().backward()
    changes = sum(a != b for a, b in zip(fan_ins, fan_ins[1:]))
    assert changes >= 1, fan_ins
    # one graph for the plain steps and one for the armed ones, then one per new fan-in
    assert counter.frame_count <= 2 + 2 * changes, (counter.frame_count, fan_ins)


def test_resume_after_a_resize_gives_the_same_trajectory():
    def build():
        torch.manual_seed(3)
        model = sparsefx.transform(nn.Sequential(nn.Linear(12, 16), nn.ReLU(),
                                                 nn.Linear(16, 6)), "fanin", 0.75,
                                   init="random", seed=3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        dst = sparsefx.DST(model, optimizer, method=sparsefx.SRigL(gamma_sal=0.9),
                           total_steps=40, delta_t=2)
        return model, optimizer, dst

    def train(model, optimizer, dst, seeds):
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(8, 12, generator=generator) * (0.1 if seed % 3 else 3.0)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), torch.randint(0, 6, (8,),
                                                                generator=generator)).backward()
            optimizer.step()
            dst.step()

    model, optimizer, dst = build()
    train(model, optimizer, dst, range(12))
    assert model[0].indices.shape[1] != 3, "the run ablated rows and resized the layer"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "dst": dst.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    train(model, optimizer, dst, range(12, 24))
    resumed, resumed_optimizer, resumed_dst = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_dst.load_state_dict(checkpoint["dst"])
    train(resumed, resumed_optimizer, resumed_dst, range(12, 24))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert repr(dst) == repr(resumed_dst)


def test_a_checkpoint_of_a_resized_layer_is_refused_by_a_fixed_fan_in_layer():
    model = _layer(8, 4, 0.5)
    _update_once(model, sparsefx.SRigL(gamma_sal=0.5, output_layers=()), INDICES, VALUES,
                 _dense_gradient())
    state = model.state_dict()
    fresh = _layer(8, 4, 0.5)  # no SRigL(fan_in="budget") attached: the fan-in is fixed
    with pytest.raises(ValueError, match=r"layer 0: values has shape \(4, 5\) in the "
                                         r"checkpoint and \(4, 4\) here"):
        fresh.load_state_dict(state)


def test_options_are_checked_and_old_checkpoints_continue_the_old_rule():
    with pytest.raises(ValueError, match=r"drop='rows': expected one of \('layer', 'row'\)"):
        sparsefx.SRigL(drop="rows")
    with pytest.raises(ValueError, match=r"fan_in='free': expected one of"):
        sparsefx.SRigL(fan_in="free")
    with pytest.raises(ValueError, match=r"max_fan_in=0.5: expected >= 1"):
        sparsefx.SRigL(max_fan_in=0.5)
    model = _layer(8, 4, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = sparsefx.DST(model, optimizer, method="srigl", total_steps=10).state_dict()
    for key in ("drop", "fan_in", "max_fan_in"):  # what a checkpoint before them held
        del state["config"][key]
    with pytest.raises(ValueError, match="drop.*'row', 'layer'"):
        sparsefx.DST(model, optimizer, method="srigl", total_steps=10).load_state_dict(state)
    old_rule = sparsefx.SRigL(drop="row", fan_in="fixed")
    sparsefx.DST(model, optimizer, method=old_rule, total_steps=10).load_state_dict(state)


def test_the_reference_rule_keeps_the_parameter_count_over_a_run():
    torch.manual_seed(1)
    model = sparsefx.transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                                             nn.ReLU(), nn.Linear(32, 5)), "fanin", 0.9,
                               init="random", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    dst = sparsefx.DST(model, optimizer, method=sparsefx.SRigL(gamma_sal=0.9),
                       total_steps=60, delta_t=3)
    budgets = {layer.name: layer.module.indices.numel() for layer in dst.layers}
    resized = False
    for seed in range(60):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 32, generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 5, (16,),
                                                            generator=generator)).backward()
        optimizer.step()
        dst.step()
        for layer in dst.layers:
            live = int(dst.method.row_active[layer.name].sum())
            fan_in = layer.module.indices.shape[1]
            resized |= fan_in != budgets[layer.name] // layer.module.out_features
            assert fan_in == budgets[layer.name] // live
            assert live * fan_in > budgets[layer.name] - live, "at most live - 1 unused"
            assert live >= budgets[layer.name] // layer.module.in_features + 1
    assert resized


def test_the_fan_in_cap_bounds_ablation():
    """With ``max_fan_in=1.25``, a layer of fan-in 4 grows to at most 5 entries a row: out
    of 8 rows of budget 32, at least ceil(32 / 5) = 7 stay live."""
    method = sparsefx.SRigL(gamma_sal=1.0, output_layers=(), max_fan_in=1.25)
    torch.manual_seed(0)
    model = sparsefx.transform(nn.Sequential(nn.Linear(8, 8, bias=False)), "fanin", 0.5,
                               init="random")
    grad = torch.zeros(8, 8)
    values = torch.full((8, 4), 1e-3)
    values[0] = 5.0
    dst, _, _ = _update_once(model, method, model[0].indices.clone(), values, grad)
    assert int(dst.method.row_active["0"].sum()) == math.ceil(32 / 5)
    assert model[0].indices.shape[1] == 32 // 7


def test_a_resize_with_the_last_steps_graph_still_alive():
    """A training loop that keeps its loss in a variable keeps that step's graph (and the
    parameter's gradient accumulator, with its shape) alive into the next forward; the
    resized layer must still train."""
    model = _layer(8, 4, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, method=sparsefx.SRigL(gamma_sal=0.5,
                                                               output_layers=()),
                       total_steps=100, delta_t=1, t_end=0.5)
    with torch.no_grad():
        model[0].indices.copy_(INDICES)
        model[0].values.copy_(VALUES)
    loss = model(torch.eye(8)).mul(_dense_gradient().T).sum()
    loss.backward()
    optimizer.step()
    dst.step()
    assert model[0].indices.shape == (4, 5)
    optimizer.zero_grad()
    loss = model(torch.eye(8)).sum()  # the old loss is still referenced until here
    loss.backward()
    assert model[0].values.grad.shape == (4, 5)
