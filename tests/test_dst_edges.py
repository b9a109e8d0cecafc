"""DST at the edges a user reaches, each a silent no-op or corruption once: sparsities near 0
and 1, default seeds, a layer called twice in one forward, a copy taken on an armed step."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.kernels import growth

PATTERN_METHODS = [("diag", "static"), ("diag", "set"), ("diag", "rigl"), ("diag", "dynadiag"),
                   ("blockdiag", "set"), ("blockdiag", "rigl"), ("blockdiag", "dynadiag"),
                   ("fanin", "set"), ("fanin", "rigl"), ("fanin", "srigl"),
                   ("nm", "set"), ("nm", "rigl"),
                   ("unstructured", "set"), ("unstructured", "rigl")]
SPARSITIES = [0.05, 0.2, 0.25, 0.5, 0.9, 0.99]
# N:M at the same densities, as near as groups of 4 to 16 allow
NM = {0.05: (15, 16), 0.2: (4, 5), 0.25: (3, 4), 0.5: (2, 4), 0.9: (1, 8), 0.99: (1, 16)}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(80, 160), nn.ReLU(), nn.Linear(160, 80), nn.ReLU(),
                         nn.Linear(80, 10))


def _structures(model):
    return [layer.structure.clone() for layer in model.modules()
            if isinstance(layer, sparsefx.layers.SPARSE_LAYERS)]


def _batches(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(32, 80, generator=generator), torch.randint(0, 10, (32,),
                                                                      generator=generator)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("pattern,method", PATTERN_METHODS,
                         ids=[f"{p}-{m}" for p, m in PATTERN_METHODS])
def test_updates_move_the_structure_at_any_sparsity(pattern, method, sparsity):
    """Every update moves what the schedule says, at every sparsity: no update is skipped
    for lack of candidates (the growth lists were once longer than a row's inactive
    entries, padded with -inf, and read as non-finite gradients), and a layer of few units
    moves too, every few updates. Nothing warns."""
    options = {"nm": NM[sparsity]} if pattern == "nm" else {}
    model = sparsefx.transform(_mlp(), pattern, sparsity, init="random", **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = sparsefx.DST(model, optimizer, method, total_steps=200, delta_t=5)
    moved_layers = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in _batches(200):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            before = _structures(model)
            changed = dst.step()
            after = _structures(model)
            moved = [i for i, (b, a) in enumerate(zip(before, after, strict=True))
                     if b.shape != a.shape or not torch.equal(b, a)]
            moved_layers.update(moved)
            assert changed == bool(moved) or method == "srigl"
    if method == "static":
        assert not moved_layers
        return
    # a layer with one candidate besides its units may well grow back what it dropped
    movable = [i for i, layer in enumerate(dst.layers)
               if layer.module.num_candidates > layer.module.slots().shape[1] + 1]
    if not movable:  # blocked diagonals: c = round(0.95 g) = g cosets at 5 %; g = 2 here
        assert pattern == "blockdiag"
    assert set(movable) <= moved_layers, f"layers {set(movable) - moved_layers} never moved"


@pytest.mark.parametrize("units", [1, 2, 3, 7, 40, 1000])
def test_over_a_run_a_layer_moves_what_the_fractions_add_up_to(units):
    schedule = sparsefx.schedule.CosineSchedule(total_steps=1000, delta_t=10)
    moved = [schedule.units_moved(step, units) for step in range(1001)]
    fractions = sum(schedule.drop_fraction(step) for step in range(1001)
                    if schedule.is_update_step(step))
    assert sum(moved) == int(units * fractions + 0.5)
    assert all(0 <= count <= -(-units * schedule.drop_fraction(step) // 1)
               for step, count in enumerate(moved))
    if units >= 40:  # round(f * units), give or take one
        assert all(abs(count - units * schedule.drop_fraction(step)) <= 1.5
                   for step, count in enumerate(moved) if schedule.is_update_step(step))


@pytest.mark.parametrize("pattern,options", [("fanin", {}), ("nm", {"nm": (2, 4)}),
                                             ("unstructured", {}), ("diag", {})])
def test_set_on_the_default_seeds_changes_the_structure_at_its_first_update(pattern, options):
    """transform(init="random") and SET both default to seed 0; SET's first draw once was the
    transform's, so its first update grew back exactly what it dropped."""
    model = sparsefx.transform(_mlp(), pattern, 0.5, init="random", **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dst = sparsefx.DST(model, optimizer, "set", total_steps=100, delta_t=10)
    for step, (x, y) in enumerate(_batches(10)):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = _structures(model)
        assert dst.step() == (step == 9)
    after = _structures(model)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


class _CalledTwice(nn.Module):
    """A block applied twice (weight sharing across depth, as ALBERT does)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for _ in range(2):
            x = torch.relu(self.shared(x))
        return self.head(x)


@pytest.mark.parametrize("pattern,method", [("diag", "rigl"), ("diag", "dynadiag"),
                                            ("fanin", "rigl"), ("fanin", "srigl"),
                                            ("nm", "rigl"), ("unstructured", "rigl")])
def test_a_layer_called_twice_is_refused_before_the_update_touches_anything(pattern, method):
    """The growth scores of two calls, added by autograd, mean nothing (fan-in column ids
    summed past the layer's width, diagonal norms added): the update refuses, naming the
    layer, and leaves every structure and weight as it was."""
    torch.manual_seed(0)
    model = sparsefx.transform(_CalledTwice(), pattern, 0.5, init="random",
                               **({"nm": (2, 4)} if pattern == "nm" else {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = sparsefx.DST(model, optimizer, method, total_steps=20, delta_t=2)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    dst.step()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"layer shared \(2 times\) called more than once "
                                           r"in one forward \(a shared module\)"):
        dst.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("method", ["set", "static"])
def test_a_layer_called_twice_trains_under_the_methods_that_read_no_gradient(method):
    torch.manual_seed(0)
    model = sparsefx.transform(_CalledTwice(), "diag", 0.5, init="random")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = sparsefx.DST(model, optimizer, method, total_steps=20, delta_t=2)
    for _ in range(6):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
        optimizer.step()
        dst.step()


def test_a_traced_layer_called_twice_is_refused_when_dst_is_made():
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, sparsefx.layers.SPARSE_LAYERS) or super().is_leaf_module(
                module, name)

    torch.manual_seed(0)
    sparse = sparsefx.transform(_CalledTwice(), "fanin", 0.5, init="random")
    graph = torch.fx.GraphModule(sparse, LeafTracer().trace(sparse))
    optimizer = torch.optim.SGD(graph.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"sparsefx.DST: layer shared \(2 times\) called more "
                                         "than once"):
        sparsefx.DST(graph, optimizer, "rigl", total_steps=10)
    sparsefx.DST(graph, optimizer, "set", total_steps=10)


def _copies():
    def deep(model):
        return copy.deepcopy(model)

    def pickled(model):
        return pickle.loads(pickle.dumps(model))

    def saved(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return [deep, pickled, saved]


@pytest.mark.parametrize("take_copy", _copies(), ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("pattern,method", [("diag", "rigl"), ("fanin", "srigl"),
                                            ("unstructured", "rigl"), ("nm", "rigl")])
def test_a_copy_taken_on_an_armed_step_is_not_armed(pattern, method, take_copy):
    """A copy of the model taken the step before an update belongs to no manager: it must
    not keep routing its backwards through the growth tap (forming the dense gradient, 5
    to 11 times slower), and the run it was taken from goes on as if it had not been."""
    def run(copy_at=None):
        torch.manual_seed(0)
        model = sparsefx.transform(_mlp(), pattern, 0.75, init="random",
                                   **({"nm": (1, 4)} if pattern == "nm" else {}))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        dst = sparsefx.DST(model, optimizer, method, total_steps=40, delta_t=4)
        copies = []
        for step, (x, y) in enumerate(_batches(12)):
            if step == copy_at:
                assert any(layer.module._growth_probe is not None for layer in dst.layers)
                copies.append(take_copy(model))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            dst.step()
        return model, copies

    reference, _ = run()
    model, (copied,) = run(copy_at=3)  # step 4 is an update: step 3's backward is armed
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    layers = [m for m in copied.modules() if isinstance(m, sparsefx.layers.SPARSE_LAYERS)]
    assert all(layer._growth_probe is None for layer in layers)
    calls = []
    original = growth.growth_scores

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    growth.growth_scores = counting
    try:
        copied(torch.randn(4, 80)).sum().backward()
    finally:
        growth.growth_scores = original
    assert not calls, "the copy's backward formed the dense gradient"


def test_dynadiag_grows_diagonals_at_the_median_importance_of_the_old_ones():
    """A grown diagonal starts at the median importance of the diagonals active before the
    update."""
    model = sparsefx.transform(_mlp(), "diag", 0.9, init="random")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    method = sparsefx.DynaDiag()
    dst = sparsefx.DST(model, optimizer, method, total_steps=200, delta_t=5)
    before = {}

    def recording(layer, write):
        def recording_write(new_active, grown):
            gates = method.gates[layer.name]
            before[layer.name] = (gates.importance.detach().clone(),
                                  layer.module.offsets.clone(), new_active[0][grown[0]].clone())
            write(new_active, grown)
        return recording_write

    for layer in dst.layers:
        layer.write = recording(layer, layer.write)
    for x, y in _batches(6):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        dst.step()
        for name, (importance, old, grown_offsets) in before.items():
            assert grown_offsets.numel() > 0
            assert torch.equal(method.gates[name].importance.detach()[grown_offsets],
                               importance[old].median().expand(grown_offsets.numel()))
        if before:
            return
    raise AssertionError("no update wrote a structure")
