"""sparsefx.DST under random training sequences (stateful hypothesis): the spec's invariants
after every step, at sparsities from 5 % to 99 %, with copies of the model taken on any step
and a layer called twice in a forward on any step.

Units are compared as dense positions, not slots, so the checks hold whatever the layout
(SRigL's fan-in changes move units to new slots): after every step, a unit active before
and after keeps its value and optimizer state, a new unit starts at zero with zero state,
ablated rows hold zeros, and nothing changes on a step that is not an update."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

import sparsefx
from sparsefx.kernels import patterns

METHODS = {
    "static": lambda seed: "static",
    "set": lambda seed: sparsefx.SET(seed=seed),
    "rigl": lambda seed: "rigl",
    "srigl": lambda seed: sparsefx.SRigL(gamma_sal=0.5),
    "srigl-row-fixed": lambda seed: sparsefx.SRigL(gamma_sal=0.5, drop="row", fan_in="fixed"),
    "dynadiag": lambda seed: "dynadiag",
}
CASES = [("diag", "static"), ("diag", "set"), ("diag", "rigl"), ("diag", "dynadiag"),
         ("blockdiag", "set"), ("blockdiag", "rigl"), ("blockdiag", "dynadiag"),
         ("fanin", "static"), ("fanin", "set"), ("fanin", "rigl"), ("fanin", "srigl"),
         ("fanin", "srigl-row-fixed"), ("nm", "set"), ("nm", "rigl"),
         ("unstructured", "set"), ("unstructured", "rigl")]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # odd, tall and wide layers; 12 -> 20 -> 8 -> 6
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8), nn.Tanh(),
                         nn.Linear(8, 6))


def _param(layer) -> torch.Tensor:
    return layer.weight if isinstance(layer, sparsefx.MaskedLinear) else layer.values


def _dense(layer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like the layer's trained weights) at the dense positions."""
    tensor = tensor.detach().float()
    if isinstance(layer, sparsefx.MaskedLinear):
        return tensor * layer.mask
    if isinstance(layer, sparsefx.DiagLinear):
        return patterns.diag_to_dense(tensor, layer.offsets, layer.out_features,
                                      layer.in_features)
    return patterns.fanin_to_dense(tensor, layer.indices, layer.in_features)


def _active(layer) -> torch.Tensor:
    if isinstance(layer, sparsefx.MaskedLinear):
        return layer.mask.clone()
    ones = torch.ones_like(_param(layer), dtype=torch.float32)
    return _dense(layer, ones) != 0


class DSTMachine(RuleBasedStateMachine):
    pattern, method = "diag", "rigl"

    @initialize(seed=st.integers(0, 2**16), delta_t=st.integers(1, 4),
                alpha=st.sampled_from([0.1, 0.3, 0.7, 1.0]),
                sparsity=st.sampled_from([0.05, 0.5, 0.75, 0.9, 0.99]),
                nm=st.sampled_from([(1, 4), (2, 4), (3, 4)]),
                optimizer_name=st.sampled_from(["adamw", "adam", "sgd"]))
    def build(self, seed, delta_t, alpha, sparsity, nm, optimizer_name):
        options = {"nm": nm} if self.pattern == "nm" else {}
        self.model = sparsefx.transform(_mlp(seed), self.pattern, sparsity, init="random",
                                        seed=seed, **options)
        params = self.model.parameters()
        self.optimizer = {
            "adamw": lambda: torch.optim.AdamW(params, lr=0.05),
            "adam": lambda: torch.optim.Adam(params, lr=0.05),
            "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        }[optimizer_name]()
        self.dst = sparsefx.DST(self.model, self.optimizer, method=METHODS[self.method](seed),
                                total_steps=24, delta_t=delta_t, alpha=alpha)
        self.layers = [layer.module for layer in self.dst.layers]
        self.params = [_param(layer) for layer in self.layers]
        self.pointers = [_param(layer).data_ptr() for layer in self.layers]
        self.counts = [int(_active(layer).sum()) for layer in self.layers]
        self.budgets = [layer.fan_in_budget if isinstance(layer, sparsefx.FanInLinear)
                        else None for layer in self.layers]

    def _live(self, i: int) -> torch.Tensor:
        rows = getattr(self.dst.method, "row_active", {}).get(self.dst.layers[i].name)
        return (torch.ones(self.layers[i].out_features, dtype=torch.bool) if rows is None
                else rows.clone())

    def _state(self, i: int) -> dict:
        param = self.params[i]
        return {key: _dense(self.layers[i], value) for key, value in
                self.optimizer.state[param].items()
                if torch.is_tensor(value) and value.shape == param.shape}

    refused = False  # a shared-layer step was refused: the run is over

    @precondition(lambda self: not self.refused)
    @rule(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 10.0]))
    def train(self, seed, scale):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 12, generator=generator) * scale
        target = torch.randint(0, 6, (16,), generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), target).backward()
        self.optimizer.step()
        before = [(_active(layer), _dense(layer, _param(layer)), self._state(i), self._live(i))
                  for i, layer in enumerate(self.layers)]
        changed = self.dst.step()
        step = self.dst.step_count
        is_update = step % self.dst.delta_t == 0 and step < self.dst.end_step
        after = [(_active(layer), _dense(layer, _param(layer)), self._state(i), self._live(i))
                 for i, layer in enumerate(self.layers)]
        moved = [not torch.equal(b[0], a[0]) or not torch.equal(b[3], a[3])
                 for b, a in zip(before, after, strict=True)]
        assert changed == any(moved), "dst.step() says whether the structure changed"
        if not is_update or self.method == "static":
            assert not changed, f"structure changed at step {step}, not an update step"
        folded = self.method == "dynadiag" and step == self.dst.total_steps  # gates, folded
        for (active, values, state, live), (active_now, values_now, state_now, live_now) \
                in zip(before, after, strict=True):
            stayed = active & active_now & live[:, None] & live_now[:, None]
            new = active_now & live_now[:, None] & ~(active & live[:, None])
            assert torch.all(values_now[new] == 0), "grown units start at zero"
            assert torch.all(values_now[~live_now] == 0), "ablated rows hold zeros"
            if not folded:
                assert torch.equal(values_now[stayed], values[stayed]), "kept units' values"
            for key, value in state_now.items():
                assert torch.all(value[new] == 0), f"optimizer {key} of grown units"
                if key in state:
                    assert torch.equal(value[stayed], state[key][stayed]), \
                        f"optimizer {key} of kept units changed"

    @precondition(lambda self: not self.refused)
    @rule(seed=st.integers(0, 2**16))
    def train_with_a_shared_layer(self, seed):
        """The first sparse layer called three times in one forward (on its own twice, then in
        the model). On a step whose growth taps are armed, a method that grows by the
        gradient refuses it, naming the layer, before anything changes; otherwise the step
        trains as any other."""
        generator = torch.Generator().manual_seed(seed)
        x, again = torch.randn(2, 16, 12, generator=generator)
        target = torch.randint(0, 6, (16,), generator=generator)
        shared = self.layers[0]
        armed = shared.armed
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), target) + shared(again).square().mean()
        (loss + shared(x).square().mean()).backward()
        self.optimizer.step()
        before = [(_active(layer), _dense(layer, _param(layer))) for layer in self.layers]
        if not armed:
            self.dst.step()
            return
        with pytest.raises(RuntimeError, match=rf"{self.dst.layers[0].name} \(3 times\) "
                                               "called more than once in one forward"):
            self.dst.step()
        for (active, values), layer in zip(before, self.layers, strict=True):
            assert torch.equal(_active(layer), active), "a refused step moved nothing"
            assert torch.equal(_dense(layer, _param(layer)), values)
        self.refused = True

    @rule()
    def forward_without_backward(self):
        with torch.no_grad():
            self.model(torch.randn(3, 12))

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def take_a_copy(self, how):
        """A copy on any step, armed or not, is never armed and computes what the model
        computes; the run goes on (the other rules check it is untouched)."""
        duplicate = (copy.deepcopy(self.model) if how == "deepcopy"
                     else pickle.loads(pickle.dumps(self.model)))
        layers = [m for m in duplicate.modules() if isinstance(m, sparsefx.layers.SPARSE_LAYERS)]
        assert all(layer._growth_probe is None for layer in layers)
        x = torch.randn(3, 12)
        with torch.no_grad():
            assert torch.equal(duplicate(x), self.model(x))

    @invariant()
    def structure_is_valid(self):
        if not hasattr(self, "dst"):
            return
        for i, layer in enumerate(self.layers):
            assert _param(layer) is self.params[i], "the optimizer's Parameter, always"
            if self.budgets[i] is None:
                assert _param(layer).data_ptr() == self.pointers[i], "storage reallocated"
            live = self._live(i)
            if isinstance(layer, sparsefx.DiagLinear):
                patterns.check_diag_offsets(layer.offsets, layer.out_features, layer.in_features)
                assert layer.offsets.numel() * min(layer.out_features, layer.in_features) \
                    == self.counts[i]
            elif isinstance(layer, sparsefx.FanInLinear):
                if layer.nm is None:
                    patterns.check_fanin_indices(layer.indices, layer.in_features)
                else:
                    patterns.check_nm_indices(layer.indices, layer.in_features, *layer.nm)
                fan_in = layer.indices.shape[1]
                if self.budgets[i] is not None:  # the live rows share the budget
                    assert fan_in == self.budgets[i] // int(live.sum())
                else:
                    assert layer.indices.numel() == self.counts[i]
                if not self.refused:  # (the refused step's optimizer step moved them)
                    assert torch.all(layer.values[~live] == 0), "ablated rows hold zeros"
                method = self.dst.method
                if hasattr(method, "may_ablate") and not method.may_ablate(self.dst.layers[i]):
                    assert bool(live.all()), "the output head is never ablated"
            else:
                assert int(layer.mask.sum()) == self.counts[i]
                assert torch.all(layer.weight[~layer.mask] == 0)


@pytest.mark.parametrize("pattern,method", CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_invariants_after_every_step(pattern, method):
    machine = type(f"DST_{pattern}_{method}", (DSTMachine,),
                   {"pattern": pattern, "method": method})
    machine.TestCase.settings = settings(settings.default, max_examples=12,
                                         stateful_step_count=30)
    machine.TestCase().runTest()
