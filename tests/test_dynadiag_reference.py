"""DynaDiag(selection="reference"): the selection rule of DynaDiag's reference code, offered
for measuring the sparse-to-sparse default against. Every one of the P diagonals computes,
gated by clamp(K * softmax(a / T), 0, 1), until t_end; then the K of largest importance stay,
with gates of 1."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.kernels import patterns


def _model(seed=0):
    torch.manual_seed(seed)
    return sparsefx.transform(nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6)),
                              "diag", 0.75, init="random", seed=seed)


def _reference_weight(layer) -> torch.Tensor:
    """The reference layer's dense weight, from its definition: every diagonal d of all P
    carries its values times min(1, K * softmax(a / T)_d)."""
    gates = layer.value_transform
    num_kept = layer.offsets.numel()
    weight = torch.zeros(layer.out_features, layer.in_features)
    softmax = torch.softmax(gates.importance.detach() / gates.temperature, dim=0)
    values = dict(zip(layer.offsets.tolist(), layer.values.detach()))
    values.update(zip(gates.bank_offsets.tolist(), gates.bank.detach()))
    for offset, diagonal in values.items():
        rows, cols = patterns.diag_coordinates(torch.tensor([offset]), layer.out_features,
                                               layer.in_features)
        weight[rows[0], cols[0]] = diagonal * min(1.0, num_kept * softmax[offset].item())
    return weight


def _step(model, optimizer, dst, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(8, 12, generator=generator)),
                    torch.randint(0, 6, (8,), generator=generator)).backward()
    optimizer.step()
    dst.step()


def test_every_diagonal_computes_through_the_softmax_gates_until_t_end():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, sparsefx.DynaDiag(selection="reference",
                                                           temperature=5.0),
                       total_steps=20, delta_t=5, t_end=0.75)
    layer = model[0]
    assert layer.value_transform.bank.shape == (20 - 5, 12), "P - K diagonals in the bank"
    x = torch.randn(4, 12)
    for seed in range(14):
        torch.testing.assert_close(layer(x), F.linear(x, _reference_weight(layer), layer.bias))
        bank_before = layer.value_transform.bank.detach().clone()
        _step(model, optimizer, dst, seed)
        assert not torch.equal(layer.value_transform.bank, bank_before), "the bank trains"
        progress = dst.step_count / dst.end_step
        expected = 0.05 + (5.0 - 0.05) * (1 + math.cos(math.pi * progress)) / 2
        assert layer.value_transform.temperature.item() == pytest.approx(expected)


def test_at_t_end_the_top_k_importances_stay_with_their_values_and_state():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, sparsefx.DynaDiag(selection="reference"),
                       total_steps=20, delta_t=5, t_end=0.5)
    layer = model[0]
    for seed in range(9):
        _step(model, optimizer, dst, seed)
    gates = layer.value_transform
    bank_optimizer = dst.method._bank_optimizer
    _step(model, optimizer, dst, 9)  # step 10 = t_end: after its training step, the freeze
    assert layer.value_transform is None
    # what the freeze saw: the importances and bank after step 10's own updates
    importance = gates.importance.detach()
    top = importance.argsort(descending=True, stable=True)[:5]
    assert sorted(layer.offsets.tolist()) == sorted(top.tolist())
    bank_rows = {offset: row for row, offset in enumerate(gates.bank_offsets.tolist())}
    state = optimizer.state[layer.values]
    bank_state = bank_optimizer.state[gates.bank]
    for slot, offset in enumerate(layer.offsets.tolist()):
        if offset in bank_rows:
            row = bank_rows[offset]
            assert torch.equal(layer.values[slot], gates.bank[row].detach())
            assert torch.equal(state["exp_avg"][slot], bank_state["exp_avg"][row])
    assert "5 of 20 diagonals" in repr(dst)
    x = torch.randn(3, 12)
    dense = patterns.diag_to_dense(layer.values.detach(), layer.offsets, 20, 12)
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias))


def test_the_bank_follows_the_model_optimizers_schedule():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    dst = sparsefx.DST(model, optimizer, sparsefx.DynaDiag(selection="reference"),
                       total_steps=20, delta_t=5)
    assert isinstance(dst.method._bank_optimizer, torch.optim.AdamW)
    rates = set()
    for seed in range(6):
        group = dict(optimizer.param_groups[0])  # as the schedule set it for this step
        _step(model, optimizer, dst, seed)
        bank_group = dst.method._bank_optimizer.param_groups[0]
        assert bank_group["lr"] == group["lr"] and bank_group["betas"] == group["betas"]
        assert bank_group["weight_decay"] == 0.1
        rates.add(group["lr"])
        schedule.step()
    assert len(rates) == 6, "the schedule moved the learning rate every step"


def test_resume_mid_selection_gives_the_same_trajectory():
    def build():
        model = _model(3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        dst = sparsefx.DST(model, optimizer, sparsefx.DynaDiag(selection="reference"),
                           total_steps=20, delta_t=5)
        return model, optimizer, dst

    model, optimizer, dst = build()
    for seed in range(6):
        _step(model, optimizer, dst, seed)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "dst": dst.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    for seed in range(6, 20):
        _step(model, optimizer, dst, seed)
    resumed, resumed_optimizer, resumed_dst = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_dst.load_state_dict(checkpoint["dst"])
    for seed in range(6, 20):
        _step(resumed, resumed_optimizer, resumed_dst, seed)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_the_reference_rule_is_for_single_diagonals():
    torch.manual_seed(0)
    model = sparsefx.transform(nn.Sequential(nn.Linear(16, 16)), "blockdiag", 0.5,
                               init="random")
    with pytest.raises(ValueError, match=r"selection='reference'\) gates single diagonals: "
                                         r"layers \['0'\] are blockdiag"):
        sparsefx.DST(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     sparsefx.DynaDiag(selection="reference"), total_steps=10)
    with pytest.raises(ValueError, match=r"selection='dense': expected one of"):
        sparsefx.DynaDiag(selection="dense")
