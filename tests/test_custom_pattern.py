"""A pattern defined entirely here, with no sparsefx file touched: "shift", ``K`` whole
wrap-around diagonals of ``W`` holding one shared value each (``y`` is a weighted sum of
``K`` circular shifts of ``x``). Its structure math, a torch-kernel op, a layer class and
``sparsefx.register_pattern``; then transform, report, densify, state_dict, save/load and
DST's generic methods, with the invariants every pattern keeps."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.kernels import growth, patterns
from sparsefx.layers import SparseLinear
from sparsefx.registry import PATTERNS, Pattern

# --------------------------------------------------------------------- structure math


def shift_dense(values: torch.Tensor, offsets: torch.Tensor, out_features: int,
                in_features: int) -> torch.Tensor:
    """The dense ``W [out, in]``: diagonal ``offsets[k]`` filled with ``values[k]``."""
    length = patterns.diag_geometry(out_features, in_features)[1]
    return patterns.diag_to_dense(values[:, None].expand(-1, length), offsets, out_features,
                                  in_features)


# ----------------------------------------------------------------- the op, torch kernels


@torch.library.custom_op("sparsefx_custom::shift_linear", mutates_args=())
def shift_linear(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    return x @ shift_dense(values, offsets, out_features, x.shape[-1]).T


@shift_linear.register_fake
def _(x, values, offsets, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _setup(ctx, inputs, output):
    x, values, offsets, out_features = inputs
    ctx.save_for_backward(x, values, offsets)
    ctx.out_features = out_features


def _backward(ctx, grad):
    x, values, offsets = ctx.saved_tensors
    out_features, in_features = ctx.out_features, x.shape[-1]
    weight = shift_dense(values, offsets, out_features, in_features)
    dense_grad = grad.reshape(-1, out_features).T @ x.reshape(-1, in_features)
    rows, cols = patterns.diag_coordinates(offsets, out_features, in_features)
    return grad @ weight, dense_grad[rows, cols].sum(dim=1), None, None


shift_linear.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------- the layer


class ShiftLinear(SparseLinear):
    """``values [K]`` (a parameter) on ``offsets [K]`` (a buffer DST rewrites in place)."""

    pattern = "shift"
    growth_granularity = "diagonals"  # the growth tap gives every diagonal's gradient norm
    structure_name = "offsets"

    def __init__(self, values, offsets, out_features, in_features, bias=None):
        super().__init__(in_features, out_features, bias)
        patterns.check_diag_offsets(offsets, out_features, in_features)
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("offsets", offsets.detach().to(torch.int64).clone())

    @classmethod
    def from_dense(cls, weight, bias=None, *, sparsity, init="magnitude", generator=None):
        out_features, in_features = weight.shape
        kept = patterns.diag_num_kept(out_features, in_features, sparsity)
        if init == "magnitude":
            offsets = patterns.diag_norms(weight.detach()).topk(kept).indices.sort().values
        else:
            offsets = patterns.random_diag_offsets(out_features, in_features, kept, generator)
        rows, cols = patterns.diag_coordinates(offsets, out_features, in_features)
        return cls(weight.detach()[rows, cols].mean(dim=1), offsets, out_features,
                   in_features, bias)

    @property
    def stored(self) -> int:
        return self.values.numel()

    def forward(self, x, bias=None):
        self._check_input(x)
        y = torch.ops.sparsefx_custom.shift_linear(x, self.values, self.offsets,
                                                   self.out_features)
        bias = self._bias(bias)
        return self._tap(y if bias is None else y + bias, x)

    def check_structure(self, structure):
        patterns.check_diag_offsets(structure, self.out_features, self.in_features)

    @classmethod
    def from_saved(cls, tensors, options):
        return cls(tensors["values"], tensors["offsets"], options["out_features"],
                   options["in_features"], tensors.get("bias"))

    def slots(self, rows=None):
        return self.offsets[None, :]

    def unit_magnitudes(self, active, rows=None):
        return self.values.detach().float().abs()[None, :]

    @property
    def num_candidates(self) -> int:
        return patterns.diag_geometry(self.out_features, self.in_features)[0]

    def active_units(self, rows=None) -> int:
        return self.offsets.numel()

    def growth_scores(self, probe_grad, rows=None):
        return probe_grad[:-growth.TRAILER].reshape(1, -1)

    def random_scores(self, generator, rows=None):
        return torch.rand(1, self.num_candidates, generator=generator).to(self.values.device)

    def write_structure(self, new_active, grown):
        self.offsets.copy_(new_active[0])
        return grown[0]  # one value per diagonal

    def describe(self, rows=None) -> str:
        return (f"shift ({self.out_features}, {self.in_features}): {self.offsets.numel()} of "
                f"{self.num_candidates} diagonals")

    def dense_weight(self):
        return shift_dense(self.values.detach(), self.offsets, self.out_features,
                           self.in_features)


@pytest.fixture(scope="module", autouse=True)
def registered():
    pattern = sparsefx.register_pattern(Pattern("shift", ShiftLinear, False, "rigl",
                                                "K diagonals, one shared value each"))
    yield pattern
    del PATTERNS["shift"]  # the other test modules see sparsefx's own patterns only


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, ShiftLinear)}


def test_the_op_matches_its_dense_weight_and_its_gradients_check():
    generator = torch.Generator().manual_seed(0)
    layer = ShiftLinear.random(12, 20, generator=generator, sparsity=0.6).double()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    torch.autograd.gradcheck(lambda x, v: shift_linear(x, v, layer.offsets, 20),
                             (x, layer.values.detach().clone().requires_grad_()))
    torch.library.opcheck(shift_linear, (x.detach(), layer.values.detach(), layer.offsets, 20))


def test_a_registered_pattern_goes_through_transform_report_densify_and_state_dict():
    model = _model()
    sparse = sparsefx.transform(model, "shift", 0.75, keep_last_dense=True)
    assert len(_layers(sparse)) == 2 and not _layers(model)  # the user's model untouched
    x = torch.randn(7, 32)
    torch.testing.assert_close(sparsefx.densify(sparse)(x), sparse(x))
    rows = [row for row in sparsefx.report(sparse) if row.pattern == "shift"]
    assert len(rows) == 2
    text = str(sparsefx.report(sparse))
    assert "shift" in text and "keep_last_dense" in text
    fresh = sparsefx.transform(model, "shift", 0.75, keep_last_dense=True, init="random",
                               seed=3)
    assert not torch.equal(fresh(x), sparse(x))
    fresh.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(fresh(x), sparse(x))
    broken = {**sparse.state_dict(), "0.offsets": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                9, 10, 11, 12, 13, 14])}
    before = fresh(x)
    with pytest.raises(ValueError, match=r"layer 0: .*offsets"):
        fresh.load_state_dict(broken)
    torch.testing.assert_close(fresh(x), before)  # nothing loaded


def test_a_registered_pattern_saves_and_loads(tmp_path):
    model = _model()
    sparse = sparsefx.transform(model, "shift", 0.75, keep_last_dense=True)
    sparsefx.save(sparse, tmp_path / "shift.safetensors")
    loaded = sparsefx.load(tmp_path / "shift.safetensors", model)
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), sparse(x))
    assert {n: type(m) for n, m in _layers(loaded).items()} == {
        n: type(m) for n, m in _layers(sparse).items()}


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_dst_trains_a_registered_pattern_in_place(method):
    sparse = sparsefx.transform(_model(), "shift", 0.75, keep_last_dense=True)
    optimizer = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    dst = sparsefx.DST(sparse, optimizer, method=method, total_steps=12, delta_t=3,
                       alpha=0.6)
    layers = _layers(sparse)
    start = {name: layer.offsets.clone() for name, layer in layers.items()}
    tensors = {name: (layer.values, layer.offsets) for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(1)
    moved = []
    for _ in range(12):
        x, y = torch.randn(16, 32, generator=generator), torch.randint(0, 10, (16,),
                                                                        generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(sparse(x), y).backward()
        optimizer.step()
        before = {name: layer.offsets.clone() for name, layer in layers.items()}
        if dst.step():
            moved.append(dst.step_count)
            for name, layer in layers.items():
                grown = ~torch.isin(layer.offsets, before[name])
                assert torch.all(layer.values.detach()[grown] == 0), name  # grown from zero
                state = optimizer.state[layer.values]
                assert torch.all(state["exp_avg"][grown] == 0), name
    for name, layer in layers.items():
        assert (layer.values, layer.offsets) == tensors[name]  # the same tensors, in place
        layer.check_structure(layer.offsets)
        assert layer.offsets.numel() == start[name].numel()
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    changed = any(not torch.equal(layer.offsets, start[name])
                  for name, layer in layers.items())
    assert changed == (method != "static") and bool(moved) == (method != "static")
    assert "shift (64, 32)" in repr(dst)
