"""A model compiled with torch.compile(fullgraph=True) trains through DST structure updates
with no recompilation (one extra graph for the armed update steps at most) and follows the
eager run step by step."""
import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsefx


def _build(pattern, options, method, dense):
    model = sparsefx.transform(dense, pattern=pattern, sparsity=0.75, init="random", seed=1,
                               **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=16, delta_t=3,
                       gamma_sal=0.6)
    return model, optimizer, dst


def _structures(model):
    return [buffer.clone() for name, buffer in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("offsets", "indices", "mask")]


@pytest.mark.parametrize("pattern,options,method", [
    ("diag", {}, "dynadiag"), ("diag", {}, "rigl"), ("diag", {}, "set"),
    ("fanin", {}, "srigl"), ("nm", {"nm": (2, 4)}, "rigl"), ("unstructured", {}, "rigl"),
])
def test_compiled_training_matches_eager_without_recompiling(pattern, options, method):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8), nn.Tanh(),
                          nn.Linear(8, 6))
    eager, eager_optimizer, eager_dst = _build(pattern, options, method, dense)
    plain, optimizer, dst = _build(pattern, options, method, dense)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(plain, fullgraph=True)
    graphs, changes = [], 0
    for step in range(14):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 12, generator=generator)
        target = torch.randint(0, 6, (16,), generator=generator)
        losses, changed = [], []
        for model, opt, manager in [(eager, eager_optimizer, eager_dst),
                                    (compiled, optimizer, dst)]:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            changed.append(manager.step())
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), f"step {step}"
        assert changed[0] == changed[1]
        changes += changed[1]
        for a, b in zip(_structures(eager), _structures(plain), strict=True):
            assert torch.equal(a, b), f"structures differ after step {step}"
        graphs.append(counters["stats"]["unique_graphs"])
    assert changes >= 2, "the run must cross several structure updates"
    assert graphs[0] == 1
    assert graphs[-1] <= 2, f"compiled graphs per step: {graphs}"
    assert counters["graph_break"] == {} or sum(counters["graph_break"].values()) == 0
