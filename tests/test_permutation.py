"""Input permutations for diagonal layers (``transform(..., permute=True)``): the search
keeps at least what no permutation keeps, ends where neither the mask nor the permutation
can gain (brute force over every permutation of a small layer), recovers a planted
permuted-diagonal weight exactly, and a permuted layer computes what its densified form
does, through ``densify``, ``state_dict``, ``sparsefx.save``/``load``, ``torch.compile``,
``torch.export`` and DST updates."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.layers import BlockDiagLinear, DiagLinear
from sparsefx.permutation import fit_input_permutation, permuted_layer

pytest.importorskip("scipy")


def _mask_rule(cls, **structure):
    return lambda scores: cls.from_scores(scores, None, scores, **structure).kept_mask()


@pytest.mark.parametrize("shape", [(5, 5), (7, 5), (4, 6)])
@pytest.mark.parametrize("seed", range(4))
def test_the_search_ends_where_neither_step_gains(shape, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64) ** 4  # a few large ones, as trained weights
    rule = _mask_rule(DiagLinear, sparsity=0.6)
    permutation, kept = fit_input_permutation(scores, rule)
    permuted = scores[:, permutation]
    mask = rule(permuted)
    value = float(permuted[mask].sum())
    assert kept == pytest.approx(value / float(scores.sum()))
    identity = float(scores[rule(scores)].sum())
    assert value >= identity - 1e-12
    # no permutation does better for this mask, and no mask for this permutation
    for other in itertools.permutations(range(shape[1])):
        assert float(scores[:, list(other)][mask].sum()) <= value + 1e-12
    assert torch.equal(rule(permuted), mask)


def test_a_planted_permuted_diagonal_weight_is_kept_whole():
    generator = torch.Generator().manual_seed(0)
    size, kept = 32, 8
    offsets = torch.randperm(size, generator=generator)[:kept]
    planted = DiagLinear(torch.randn(kept, size, generator=generator) + 3.0, offsets, size,
                         size).dense_weight()
    shuffle = torch.randperm(size, generator=generator)
    weight = planted[:, shuffle]  # the diagonals scrambled over the inputs
    plain = DiagLinear.from_scores(weight, None, weight.square(), sparsity=0.75)
    layer = permuted_layer(DiagLinear, weight, None, weight.double().square(), sparsity=0.75)
    total = float(weight.square().sum())
    assert float(weight[plain.kept_mask()].square().sum()) / total < 0.6
    assert float(weight[layer.kept_mask()].square().sum()) / total == pytest.approx(1.0)
    torch.testing.assert_close(layer.dense_weight(), weight)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(),
                         nn.Linear(48, 24))


def _calibration(seed=1):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(24, generator=generator) * 4  # uneven feature norms
    return [torch.randn(16, 24, generator=generator) * scale for _ in range(3)]


@pytest.mark.parametrize("pattern", ["diag", "blockdiag"])
@pytest.mark.parametrize("init", ["magnitude", "wanda", "sparsegpt"])
def test_permuted_layers_compute_what_their_densified_form_does(pattern, init, tmp_path):
    model = _model()
    calibration = _calibration() if init != "magnitude" else None
    sparse = sparsefx.transform(model, pattern, 0.5, init=init, calibration=calibration,
                                permute=True)
    layers = [m for m in sparse.modules() if isinstance(m, DiagLinear)]
    assert layers and all(layer.input_permutation is not None for layer in layers)
    assert any(not torch.equal(layer.input_permutation, torch.arange(layer.in_features))
               for layer in layers)
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = sparse(x)
        for layer in layers:
            probe = torch.randn(3, layer.in_features)
            torch.testing.assert_close(layer(probe), F.linear(probe, layer.dense_weight(),
                                                              layer.bias))
        torch.testing.assert_close(sparsefx.densify(sparse)(x), expected)
        # a state_dict into a model transformed the same way, and sparsefx.save/load
        again = sparsefx.transform(model, pattern, 0.5, init=init, calibration=calibration,
                                   permute=True)
        again.load_state_dict(sparse.state_dict())
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
        sparsefx.save(sparse, tmp_path / "model.safetensors")
        loaded = sparsefx.load(tmp_path / "model.safetensors", _model(seed=5))
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        compiled = torch.compile(sparse, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        exported = torch.export.export(sparse, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6)


def test_permuting_keeps_more_calibrated_importance_than_not():
    model, calibration = _model(), _calibration()
    plain = sparsefx.transform(model, "diag", 0.5, init="wanda", calibration=calibration)
    permuted = sparsefx.transform(model, "diag", 0.5, init="wanda", calibration=calibration,
                                  permute=True)
    inputs = torch.cat(calibration)
    first = model[0].weight.detach().abs() * inputs.norm(dim=0)[None, :]
    assert float(first[permuted[0].kept_mask()].sum()) > float(first[plain[0].kept_mask()]
                                                                    .sum())


def test_dst_moves_a_permuted_layer_and_it_still_matches_its_dense_form():
    model = _model()
    sparse = sparsefx.transform(model, "diag", 0.5, permute=True)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    dst = sparsefx.DST(sparse, optimizer, "rigl", total_steps=8, delta_t=2)
    before = [layer.offsets.clone() for layer in sparse.modules()
              if isinstance(layer, DiagLinear)]
    for _ in range(4):
        optimizer.zero_grad()
        sparse(torch.randn(8, 24)).square().mean().backward()
        optimizer.step()
        dst.step()
    layers = [layer for layer in sparse.modules() if isinstance(layer, DiagLinear)]
    assert any(not torch.equal(a, layer.offsets) for a, layer in zip(before, layers))
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(sparsefx.densify(sparse)(x), sparse(x))


def test_bad_permutations_and_options_are_refused():
    layer = DiagLinear.from_dense(torch.randn(6, 6), sparsity=0.5)
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 2, 3, 4])):
        with pytest.raises(ValueError, match="expected a permutation of range"):
            layer.set_input_permutation(bad)
    assert layer.input_permutation is None
    with pytest.raises(ValueError, match="permute=True with init='random'"):
        sparsefx.transform(_model(), "diag", 0.5, init="random", permute=True)
    assert BlockDiagLinear.permutable  # blockdiag permutes as diag does
