"""The pattern registry is what transform, build_layer, DST and the layers agree on: every
registered pattern builds, reports its own name, and trains under the generic methods."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.registry import PATTERNS, build_layer, pattern_named


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _options(pattern: str) -> dict:
    return {"nm": (2, 4)} if PATTERNS[pattern].takes_nm else {}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_each_pattern_builds_its_layer_and_names_itself(pattern):
    spec = PATTERNS[pattern]
    weight, bias = torch.randn(12, 16), torch.randn(12)
    layer = build_layer(pattern, weight, bias, sparsity=0.75, nm=(2, 4))
    assert isinstance(layer, spec.layer) and layer.pattern == pattern
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), bias))
    model = sparsefx.transform(_mlp(), pattern=pattern, sparsity=0.75, **_options(pattern))
    assert {type(m) for m in model.modules()} & {spec.layer}
    assert all(row.pattern.split()[0] == pattern for row in sparsefx.report(model))


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_generic_methods_train_every_pattern(pattern, method):
    model = sparsefx.transform(_mlp(), pattern=pattern, sparsity=0.75, init="random",
                               **_options(pattern))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=8, delta_t=2, alpha=0.5)
    budgets = [dst.budget(layer) for layer in dst.layers]
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 16)), torch.randint(0, 8, (4,))).backward()
        optimizer.step()
        dst.step()
    assert [dst.budget(layer) for layer in dst.layers] == budgets
    assert all(pattern in line for line in repr(dst).splitlines()[1:])


def test_an_unknown_pattern_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"pattern='blocky': expected one of \('diag', "):
        pattern_named("blocky", "transform")
    with pytest.raises(ValueError, match=r"build_layer: pattern='blocky'"):
        build_layer("blocky", torch.randn(4, 4), None, sparsity=0.5)


def test_each_pattern_has_a_method_meant_for_it():
    for spec in PATTERNS.values():
        assert spec.default_method in sparsefx.dst.METHODS and spec.summary
