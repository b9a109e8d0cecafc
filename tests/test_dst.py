"""sparsefx.DST: planted drop/grow decisions, the schedule, checkpoints, safety and errors.
The invariants after every step (stateful hypothesis) are in test_dst_stateful.py, the edges
(sparsities near 0 and 1, shared layers, copies) in test_dst_edges.py, SRigL's rules in
test_srigl.py, compiled training in test_dst_compile.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.kernels import patterns

# (pattern, transform options, methods valid for it)
CASES = [
    ("diag", {}, ["static", "set", "rigl", "dynadiag"]),
    ("fanin", {}, ["static", "set", "rigl", "srigl"]),
    ("nm", {"nm": (2, 4)}, ["set", "rigl"]),
    ("unstructured", {}, ["set", "rigl"]),
]
PATTERN_METHODS = [(pattern, options, method) for pattern, options, methods in CASES
                   for method in methods]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # odd, tall and wide layers; 12 -> 20 -> 8 -> 6
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8), nn.Tanh(),
                         nn.Linear(8, 6))


def _sparse_mlp(pattern, options, seed=0, sparsity=0.75):
    return sparsefx.transform(_mlp(seed), pattern=pattern, sparsity=sparsity, init="random",
                              seed=seed, **options)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, sparsefx.layers.SPARSE_LAYERS)]


def _structure(layer) -> torch.Tensor:
    if isinstance(layer, sparsefx.DiagLinear):
        return layer.offsets.clone()
    if isinstance(layer, sparsefx.FanInLinear):
        return layer.indices.clone()
    return layer.mask.clone()


def _param(layer) -> torch.Tensor:
    return layer.weight if isinstance(layer, sparsefx.MaskedLinear) else layer.values


def _storage(layer) -> list[int]:
    return [_param(layer).data_ptr(), _structure_tensor(layer).data_ptr()]


def _structure_tensor(layer) -> torch.Tensor:
    for name in ("offsets", "indices", "mask"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise AssertionError(layer)


def _new_units(layer, before: torch.Tensor) -> torch.Tensor:
    """Bool, broadcastable to the layer's parameter: where a unit that was not active sits."""
    after = _structure(layer)
    if isinstance(layer, sparsefx.DiagLinear):
        return ~torch.isin(after, before)[:, None]
    if isinstance(layer, sparsefx.FanInLinear):
        return ~(after.long()[:, :, None] == before.long()[:, None, :]).any(dim=2)
    return after & ~before


def _train_step(model, optimizer, seed: int, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 12, generator=generator) * scale
    target = torch.randint(0, 6, (16,), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()
    optimizer.step()


# ------------------------------------------------------------------- planted scores


def _one_layer(pattern, in_features, out_features, sparsity, options=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    return sparsefx.transform(model, pattern=pattern, sparsity=sparsity, init="random",
                              seed=seed, **(options or {}))


def _planted_backward(model, dense_grad: torch.Tensor) -> None:
    """A backward whose dense weight gradient is exactly ``dense_grad [out, in]``:
    with x = I, y = W, and loss = sum(y * dense_grad.T)."""
    out_features, in_features = dense_grad.shape
    model(torch.eye(in_features)).mul(dense_grad.T).sum().backward()


def _planted_update(model, method, **dst_options):
    """One DST update at step 1 with Adam at lr=0 (so the planted values stay put)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=100, delta_t=1, t_end=0.5,
                       **dst_options)
    return dst, optimizer


def _hot_diagonals(out_features, in_features, offsets) -> torch.Tensor:
    """A dense gradient that is small everywhere but large along the diagonals ``offsets``."""
    dense_grad = torch.rand(out_features, in_features) * 0.01
    rows, cols = patterns.diag_coordinates(torch.tensor(offsets), out_features, in_features)
    dense_grad[rows, cols] = 5.0
    return dense_grad


def _moved(dst, layer_size):
    return round(dst.drop_fraction(1) * layer_size)


def test_planted_diag_rigl_drops_smallest_norm_grows_largest_gradient_norm():
    model = _one_layer("diag", 20, 20, sparsity=0.6)  # K = 8 of P = 20
    layer = model[0]
    dst, optimizer = _planted_update(model, "rigl")
    num_kept = layer.offsets.numel()
    n = _moved(dst, num_kept)
    assert n == 2
    with torch.no_grad():  # slot j's diagonal has norm j + 1: slots 0, 1 are the smallest
        layer.values.copy_(torch.arange(1, num_kept + 1.0)[:, None].expand_as(layer.values))
    old = layer.offsets.clone()
    inactive = [d for d in range(20) if d not in old.tolist()]
    planted = [inactive[3], inactive[7]]
    _planted_backward(model, _hot_diagonals(20, 20, planted))
    optimizer.step()
    assert dst.step()
    assert set(layer.offsets.tolist()) == set(old[2:].tolist()) | set(planted)
    assert layer.offsets[2:].tolist() == old[2:].tolist(), "kept diagonals keep their slots"
    assert torch.all(layer.values[:2] == 0) and torch.all(layer.values[2:] > 0)


def test_planted_diag_dynadiag_drops_lowest_importance():
    model = _one_layer("diag", 16, 24, sparsity=0.75)  # tall: P = 24, K = 6
    layer = model[0]
    dst, optimizer = _planted_update(model, "dynadiag")
    old = layer.offsets.clone()
    n = _moved(dst, old.numel())
    assert n == 2
    with torch.no_grad():  # importances far apart: one Adam step (lr 1e-2) cannot reorder them
        layer.value_transform.importance[old] = torch.tensor([5.0, 1.0, 6.0, 7.0, 2.0, 8.0])
        layer.values.fill_(1.0)
    inactive = [d for d in range(24) if d not in old.tolist()]
    planted = [inactive[0], inactive[-1]]
    _planted_backward(model, _hot_diagonals(24, 16, planted))
    optimizer.step()
    assert dst.step()
    kept = [old[i].item() for i in (0, 2, 3, 5)]
    assert set(layer.offsets.tolist()) == set(kept) | set(planted)
    grown = torch.isin(layer.offsets, torch.tensor(planted))
    assert torch.all(layer.values[grown] == 0)
    importance = layer.value_transform.importance.detach()
    assert torch.all(importance[layer.offsets[grown]] == 5.0), "median of the old active set"
    inactive_now = torch.ones(24, dtype=torch.bool)
    inactive_now[layer.offsets] = False
    assert torch.all(importance[inactive_now] == importance[layer.offsets].min() - 1)


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_planted_fanin_per_row(method):
    model = _one_layer("fanin", 16, 6, sparsity=0.5)  # k = 8 per row
    layer = model[0]
    if method == "srigl":  # its per-row drop (sparsefx 0.1's rule)
        method = sparsefx.SRigL(drop="row")
    dst, optimizer = _planted_update(model, method)
    n = _moved(dst, 8)
    assert n == 2
    with torch.no_grad():
        layer.values.copy_(torch.arange(1, 9.0).expand(6, 8))  # slots 0, 1 smallest
    old = layer.indices.long().clone()
    dense_grad = torch.rand(6, 16) * 0.01
    planted = []
    for row in range(6):
        inactive = [c for c in range(16) if c not in old[row].tolist()]
        planted.append({inactive[row % 8], inactive[(row + 3) % 8]})
        dense_grad[row, sorted(planted[-1])] = 5.0
    _planted_backward(model, dense_grad)
    optimizer.step()
    assert dst.step()
    for row in range(6):
        assert set(layer.indices[row].tolist()) == set(old[row, 2:].tolist()) | planted[row]
        assert layer.indices[row, 2:].tolist() == old[row, 2:].tolist()
    assert torch.all(layer.values[:, :2] == 0)


def _plant_row_2_without_salient_entries(model):
    """For a (6, 16) fan-in layer with k = 8 at alpha 0.3 (14 entries moved layer-wide):
    row r, slot j holds j + 1 + r / 100, and row 2 the 8 smallest values of the layer; the
    other 6 drops take slot 0 of 5 rows and one slot 1, so every other row keeps >= 6 salient
    entries. Row 2 also gets no gradient, so it wins no growth either."""
    layer = model[0]
    with torch.no_grad():
        layer.values.copy_(torch.arange(1, 9.0)[None, :] + torch.arange(6.0)[:, None] / 100)
        layer.values[2] = 1e-3
    dense_grad = 1 + torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    dense_grad[2] = 0.0
    _planted_backward(model, dense_grad)


def test_planted_srigl_ablates_the_row_without_salient_entries():
    model = _one_layer("fanin", 16, 6, sparsity=0.5)  # k = 8, salient minimum floor(.5*8)=4
    layer = model[0]
    dst, optimizer = _planted_update(model, "srigl", output_layers=(), gamma_sal=0.5)
    assert round(dst.drop_fraction(1) * 48) == 14  # moved layer-wide
    _plant_row_2_without_salient_entries(model)
    optimizer.step()
    assert dst.step()
    row_active = dst.method.row_active["0"]
    assert row_active.tolist() == [True, True, False, True, True, True]
    assert torch.all(layer.values[2] == 0)
    assert "1 rows ablated" in repr(dst)


def test_planted_srigl_never_ablates_the_output_head():
    model = _one_layer("fanin", 16, 6, sparsity=0.5)
    dst, optimizer = _planted_update(model, "srigl", gamma_sal=0.5)  # default: head
    _plant_row_2_without_salient_entries(model)
    optimizer.step()
    assert dst.step()
    assert bool(dst.method.row_active["0"].all())


def test_srigl_ablated_row_comes_back_at_zero():
    model = _one_layer("fanin", 16, 6, sparsity=0.5)
    layer = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, method="srigl", total_steps=100, delta_t=1,
                       t_end=0.5, output_layers=(), gamma_sal=0.5)
    _plant_row_2_without_salient_entries(model)
    optimizer.step()
    dst.step()
    assert dst.method.row_active["0"].tolist() == [True, True, False, True, True, True]
    optimizer.zero_grad()
    dense_grad = torch.zeros(6, 16)
    dense_grad[2, :] = 10.0 + torch.arange(16.0)  # row 2 now wins all the growth
    _planted_backward(model, dense_grad)
    optimizer.step()
    assert dst.step()
    assert bool(dst.method.row_active["0"][2])
    assert sorted(layer.indices[2].tolist()) == list(range(8, 16)), "its best 8 columns"
    assert torch.all(layer.values[2] == 0)


def test_planted_nm_regrows_within_the_groups_that_lost_entries():
    model = _one_layer("nm", 16, 4, sparsity=0.5, options={"nm": (2, 4)})  # k = 8
    layer = model[0]
    dst, optimizer = _planted_update(model, "rigl")
    assert _moved(dst, 8) == 2
    old = layer.indices.long().clone()
    with torch.no_grad():
        layer.values.fill_(1.0)
        # per row, the two smallest entries sit in group 0 and group 2
        for row in range(4):
            for group in (0, 2):
                slot = int(((old[row] // 4) == group).nonzero()[0])
                layer.values[row, slot] = 1e-3
    dense_grad = torch.rand(4, 16) * 0.01
    dense_grad[:, 4:8] = 9.0  # group 1 is hot, but lost nothing: must not grow
    expected = []
    for row in range(4):
        chosen = set()
        for group in (0, 2):
            columns = [c for c in range(4 * group, 4 * group + 4) if c not in old[row].tolist()]
            dense_grad[row, columns[0]] = 5.0
            chosen.add(columns[0])
        expected.append(chosen)
    _planted_backward(model, dense_grad)
    optimizer.step()
    assert dst.step()
    patterns.check_nm_indices(layer.indices, 16, 2, 4)
    for row in range(4):
        dropped = {old[row, s].item() for s in range(8) if layer.values[row, s] == 0}
        assert expected[row] <= set(layer.indices[row].tolist())
        assert not (set(layer.indices[row].tolist()) & (set(range(4, 8)) - set(old[row].tolist())))
        assert len(dropped) == 2


def test_planted_unstructured_rigl_layerwise():
    model = _one_layer("unstructured", 10, 10, sparsity=0.8)  # 20 of 100
    layer = model[0]
    dst, optimizer = _planted_update(model, "rigl")
    n = _moved(dst, 20)
    assert n == 6
    active = layer.mask.view(-1).nonzero()[:, 0]
    with torch.no_grad():
        layer.weight.view(-1)[active] = torch.arange(1, 21.0)  # first 6 smallest
    inactive = (~layer.mask).view(-1).nonzero()[:, 0]
    planted = inactive[torch.randperm(inactive.numel(), generator=torch.Generator()
                                      .manual_seed(1))[:6]]
    dense_grad = torch.rand(100) * 0.01
    dense_grad[planted] = 5.0
    _planted_backward(model, dense_grad.view(10, 10))
    optimizer.step()
    assert dst.step()
    now = set(layer.mask.view(-1).nonzero()[:, 0].tolist())
    assert now == set(active[6:].tolist()) | set(planted.tolist())
    assert torch.all(layer.weight.view(-1)[planted] == 0)


@pytest.mark.parametrize("pattern,options", [("diag", {}), ("fanin", {}), ("nm", {"nm": (2, 4)}),
                                             ("unstructured", {})])
def test_planted_set_drops_smallest_and_grows_random_seeded(pattern, options):
    results = []
    for _ in range(2):
        model = _one_layer(pattern, 16, 16, sparsity=0.5, options=options)
        layer = model[0]
        dst, optimizer = _planted_update(model, "set", seed=7)
        param = _param(layer)
        with torch.no_grad():
            param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(3)))
        magnitude_before = _structure(layer), param.detach().clone()
        model(torch.randn(2, 16)).sum().backward()
        optimizer.step()
        assert dst.step()
        results.append(_structure(layer))
        before, values = magnitude_before
        new = _new_units(layer, before).expand_as(param)
        assert torch.all(param[new] == 0)
    assert torch.equal(results[0], results[1]), "SET with one seed is reproducible"


def test_a_dropped_unit_grown_back_keeps_its_value():
    model = _one_layer("diag", 8, 8, sparsity=0.5)  # K = 4
    layer = model[0]
    dst, optimizer = _planted_update(model, "rigl", alpha=0.5)
    assert _moved(dst, 4) == 2
    old = layer.offsets.clone()
    with torch.no_grad():
        layer.values.copy_(torch.arange(1, 5.0)[:, None].expand_as(layer.values))
    dense_grad = torch.zeros(8, 8)
    inactive = [d for d in range(8) if d not in old.tolist()]
    for offset, size in [(old[0].item(), 9.0), (inactive[0], 5.0)]:  # slot 0 dropped, regrown
        rows, cols = patterns.diag_coordinates(torch.tensor([offset]), 8, 8)
        dense_grad[rows, cols] = size
    _planted_backward(model, dense_grad)
    optimizer.step()
    assert dst.step()
    assert layer.offsets[0] == old[0] and torch.all(layer.values[0] == 1.0)
    assert layer.offsets[1] == inactive[0] and torch.all(layer.values[1] == 0)


# --------------------------------------------------------------------------- schedule


def test_cosine_schedule_and_no_updates_after_t_end():
    model = _sparse_mlp("diag", {})
    dst = sparsefx.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), method="rigl",
                       total_steps=1000, delta_t=100, alpha=0.3, t_end=0.75)
    assert dst.end_step == 750
    for step in (0, 100, 375, 700):
        assert dst.drop_fraction(step) == pytest.approx(0.15 * (1 + math.cos(math.pi * step /
                                                                              750)))
    assert [s for s in range(1001) if dst.is_update_step(s)] == [100, 200, 300, 400, 500, 600,
                                                                   700]
    assert dst.drop_fraction(750) == 0 and dst.drop_fraction(900) == 0


def test_only_the_step_before_an_update_is_armed():
    model = _sparse_mlp("fanin", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sparsefx.DST(model, optimizer, method="rigl", total_steps=20, delta_t=4)
    armed = []
    for seed in range(12):
        armed.append(any(layer._growth_probe is not None for layer in _layers(model)))
        _train_step(model, optimizer, seed)
        dst.step()
    # the forward/backward of steps 4, 8, 12 (entered after 3, 7, 11 dst.step calls)
    assert [i + 1 for i, a in enumerate(armed) if a] == [4, 8, 12]


def test_repr_shows_budget_step_and_next_update():
    model = _sparse_mlp("diag", {})
    dst = sparsefx.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), method="dynadiag",
                       total_steps=300, delta_t=50)
    text = repr(dst)
    assert "method=dynadiag" in text and "step=0/300" in text and "next update=50" in text
    assert "0: diag (20, 12): 5 of 20 diagonals" in text, text


# ------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("pattern,options,method", [("diag", {}, "dynadiag"),
                                                    ("fanin", {}, "srigl"),
                                                    ("diag", {}, "set"),
                                                    ("unstructured", {}, "rigl")])
def test_resume_gives_the_same_trajectory(pattern, options, method):
    def build():
        model = _sparse_mlp(pattern, options, seed=3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        dst = sparsefx.DST(model, optimizer, method=method, total_steps=30, delta_t=3,
                           gamma_sal=0.6)
        return model, optimizer, dst

    model, optimizer, dst = build()
    for seed in range(10):
        _train_step(model, optimizer, seed)
        dst.step()
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "dst": dst.state_dict()}
    checkpoint = _roundtrip(checkpoint)
    for seed in range(10, 20):
        _train_step(model, optimizer, seed)
        dst.step()

    resumed, resumed_optimizer, resumed_dst = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_dst.load_state_dict(checkpoint["dst"])
    for seed in range(10, 20):
        _train_step(resumed, resumed_optimizer, seed)
        resumed_dst.step()
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert repr(dst) == repr(resumed_dst)


def _roundtrip(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_load_state_dict_refuses_other_settings():
    model = _sparse_mlp("diag", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = sparsefx.DST(model, optimizer, method="rigl", total_steps=30).state_dict()
    other = sparsefx.DST(model, optimizer, method="rigl", total_steps=60)
    with pytest.raises(ValueError, match="total_steps"):
        other.load_state_dict(state)


@pytest.mark.parametrize("name,method", [
    ("srigl", lambda: sparsefx.SRigL(gamma_sal=0.5, output_layers=())),
    ("dynadiag", lambda: sparsefx.DynaDiag(temperature=0.5, importance_lr=0.05)),
    ("set", lambda: sparsefx.SET(seed=3)),
])
def test_a_method_object_trains_as_its_name_with_the_same_options(name, method):
    pattern = "fanin" if name == "srigl" else "diag"
    options = {"srigl": dict(gamma_sal=0.5, output_layers=()),
               "dynadiag": dict(temperature=0.5, importance_lr=0.05),
               "set": dict(seed=3)}[name]
    states = []
    for how in (name, method()):
        model = _sparse_mlp(pattern, {})
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        dst = sparsefx.DST(model, optimizer, method=how, total_steps=12, delta_t=3,
                           **(options if isinstance(how, str) else {}))
        for seed in range(12):
            _train_step(model, optimizer, seed)
            dst.step()
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_method_options_go_to_the_method_object():
    model = _sparse_mlp("fanin", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"gamma_sal given with a method object SRigL\("):
        sparsefx.DST(model, optimizer, method=sparsefx.SRigL(), gamma_sal=0.5, total_steps=5)
    with pytest.raises(ValueError, match=r"gamma_sal=1.5: expected 0 <= gamma_sal <= 1"):
        sparsefx.SRigL(gamma_sal=1.5)


def test_checkpoints_carry_a_format_and_the_first_format_still_loads():
    model = _sparse_mlp("fanin", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sparsefx.DST(model, optimizer, method="srigl", total_steps=30, delta_t=5)
    for _ in range(7):
        _train_step(model, optimizer, 0, 1.0)
        dst.step()
    state = dst.state_dict()
    assert state["format"] == sparsefx.dst.CHECKPOINT_FORMAT
    # what sparsefx 0.1 wrote: no format key, every method's options in the config, and
    # every method's state (SET's generator, DynaDiag's importances) whatever the method
    first_format = {key: value for key, value in state.items() if key != "format"}
    first_format["config"] = {**state["config"], "temperature": 0.25, "importance_lr": 1e-2,
                              "seed": 0}
    first_format.update(generator=torch.Generator().get_state(), importance={})
    resumed = sparsefx.DST(model, optimizer, method="srigl", total_steps=30, delta_t=5)
    resumed.load_state_dict(_roundtrip(first_format))
    assert resumed.step_count == 7 and repr(resumed) == repr(dst)
    with pytest.raises(ValueError, match=r"checkpoint format 99: this sparsefx reads formats "
                                         r"1 to \d \(a checkpoint from a newer sparsefx\?\)"):
        resumed.load_state_dict({**state, "format": 99})


def test_the_schedule_moves_a_cosine_fraction_until_t_end():
    schedule = sparsefx.schedule.CosineSchedule(total_steps=1000, delta_t=100, alpha=0.4,
                                                t_end=0.5)
    assert schedule.end_step == 500
    assert [t for t in range(1001) if schedule.is_update_step(t)] == [100, 200, 300, 400]
    assert schedule.drop_fraction(0) == pytest.approx(0.4)
    assert schedule.drop_fraction(250) == pytest.approx(0.2)
    assert schedule.drop_fraction(500) == 0.0
    with pytest.raises(ValueError, match=r"sparsefx.DST: t_end=1.5: expected 0 < t_end <= 1"):
        sparsefx.schedule.CosineSchedule(total_steps=10, t_end=1.5)


# ---------------------------------------------------------------------------- safety


def test_non_finite_gradients_skip_the_update_with_a_warning():
    model = _sparse_mlp("diag", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, method="rigl", total_steps=40, delta_t=1)
    before = [_structure(layer) for layer in _layers(model)]
    x = torch.randn(4, 12)
    x[0, 0] = float("nan")
    model(x).sum().backward()  # a training loop (or GradScaler) skips optimizer.step here
    with pytest.warns(UserWarning, match="non-finite gradients"):
        assert dst.step() is False
    assert all(torch.equal(b, _structure(layer))
               for b, layer in zip(before, _layers(model), strict=True))
    optimizer.zero_grad()
    _train_step(model, optimizer, 0)
    assert dst.step() is True, "the next update runs normally"


def test_a_layer_without_gradient_is_left_alone_with_a_warning():
    model = _sparse_mlp("fanin", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sparsefx.DST(model, optimizer, method="rigl", total_steps=40, delta_t=1)
    before = [_structure(layer) for layer in _layers(model)]
    model[0](torch.randn(2, 12)).sum().backward()  # only the first layer is used
    optimizer.step()
    with pytest.warns(UserWarning, match="layer 2 got no gradient"):
        dst.step()
    assert all(torch.equal(b, _structure(layer))
               for b, layer in zip(before[1:], _layers(model)[1:], strict=True))


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "magic"}, "method='magic'"),
    ({"method": "srigl"}, "srigl.*0 \\(diag\\)"),
    ({"delta_t": 0}, "delta_t=0"),
    ({"delta_t": -5}, "delta_t=-5"),
    ({"alpha": 0.0}, "alpha=0.0"),
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"t_end": 0.0}, "t_end=0.0"),
    ({"total_steps": 0}, "total_steps=0"),
    ({"output_layers": ("nothing",), "method": "srigl", "pattern": "fanin"}, "match none"),
])
def test_bad_arguments_raise(kwargs, message):
    pattern = kwargs.pop("pattern", "diag")
    model = _sparse_mlp(pattern, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    arguments = {"method": "rigl", "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparsefx.DST(model, optimizer, **arguments)


def test_dynadiag_needs_diag_layers():
    model = _sparse_mlp("fanin", {})
    with pytest.raises(ValueError, match="dynadiag.*works on diag"):
        sparsefx.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), method="dynadiag",
                     total_steps=10)


def test_no_sparse_layers_raise():
    model = _mlp(0)
    with pytest.raises(ValueError, match="no sparse layer"):
        sparsefx.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def test_optimizer_without_the_sparse_weights_raises():
    model = _sparse_mlp("diag", {})
    with pytest.raises(ValueError, match="does not train the weights of 0, 2, 4"):
        sparsefx.DST(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                     total_steps=10)


def test_dynadiag_gates_harden_to_exactly_one_at_t_end():
    model = _sparse_mlp("diag", {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, method="dynadiag", total_steps=12, delta_t=3,
                       t_end=0.5)
    x = torch.randn(5, 12)
    for seed in range(6):
        with torch.no_grad():
            soft = [m.value_transform.gates() for m in _layers(model)]
        assert all(bool((g < 1).all()) for g in soft), "soft before t_end"
        _train_step(model, optimizer, seed)
        dst.step()
    for layer in _layers(model):
        gates = layer.value_transform.gates()
        assert torch.equal(gates, torch.ones_like(gates))
    dense = sparsefx.densify(model)
    torch.testing.assert_close(dense(x), model(x))


def test_dynadiag_gates_are_folded_away_at_the_last_step():
    model = _sparse_mlp("diag", {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, method="dynadiag", total_steps=8, delta_t=2)
    x = torch.randn(5, 12)
    for seed in range(7):
        _train_step(model, optimizer, seed)
        dst.step()
    assert all(layer.value_transform is not None for layer in _layers(model))
    _train_step(model, optimizer, 7)
    with torch.no_grad():
        before = model(x)
    dst.step()
    assert all(layer.value_transform is None for layer in _layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert dst.state_dict()["importance"] == {}


# -------------------------------------------------------------------------- fast paths


def test_dynadiag_importances_follow_fused_adam_exactly():
    """The importance step skips Adam's bookkeeping, not its arithmetic: the same numbers
    and state as torch.optim.Adam(fused=True), a non-finite step skipped, a layer without a
    gradient left alone (its step count included)."""
    from sparsefx.methods.dynadiag import _importance_adam_step
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(size, generator=generator).requires_grad_() for size in (7, 64, 33)]
    theirs = [tensor.detach().clone().requires_grad_() for tensor in ours]
    optimizer = torch.optim.Adam(ours, lr=1e-2, fused=True)
    reference = torch.optim.Adam(theirs, lr=1e-2, fused=True)
    found_inf, one = torch.zeros(()), torch.ones(())
    for step in range(12):
        non_finite = step == 5
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            a.grad = b.grad = None
            if (step + i) % 4 == 3:
                continue
            grad = torch.randn(a.shape, generator=generator) * 10.0 ** (step % 3 - 1)
            if non_finite:
                grad[0] = float("inf")
            a.grad, b.grad = grad.clone(), grad.clone()
        with torch.no_grad():
            _importance_adam_step(optimizer, found_inf, one, one)
        if not non_finite:
            reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), step
            assert optimizer.state[a].keys() == reference.state[b].keys()
            for key, value in optimizer.state[a].items():
                assert torch.equal(value, reference.state[b][key]), (step, key)


@pytest.mark.parametrize("pattern", ["diag", "fanin", "unstructured"])
def test_gradient_accumulation_scores_the_last_micro_batch(pattern):
    """Several backwards in the step before an update (gradient accumulation) leave the
    growth scores of the last one, never their sum (norms do not add, and the fan-in lists
    carry candidate ids)."""
    probes = []
    for micro_batches in ((0, 1), (1,)):
        model = _sparse_mlp(pattern, {})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        dst = sparsefx.DST(model, optimizer, method="rigl", total_steps=40, delta_t=1)
        for seed in micro_batches:
            generator = torch.Generator().manual_seed(seed)
            F.cross_entropy(model(torch.randn(16, 12, generator=generator)),
                            torch.randint(0, 6, (16,), generator=generator)).backward()
        probes.append([layer.probe.grad.clone() for layer in dst.layers])
    for accumulated, last in zip(*probes, strict=True):
        assert torch.equal(accumulated, last)
