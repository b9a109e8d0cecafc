"""Sanity check on real data (scikit-learn's load_digits, 8x8 handwritten digits): at 90 %
sparsity every DST method trains at least as well as keeping the initial random structure
(``static``), and the dense model is the ceiling. Means over 3 seeds; "at least as well"
allows 0.5 points (2 of 450 test images), the spread between seeds being about 1 point.
This is a sanity check, not an accuracy study."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx

sklearn = pytest.importorskip("sklearn")

EPOCHS, BATCH, DELTA_T, SEEDS, TOLERANCE = 40, 64, 50, (0, 1, 2), 0.5
METHODS = {"unstructured": ["static", "set", "rigl"],
           "diag": ["static", "set", "rigl", "dynadiag"],
           "fanin": ["static", "set", "rigl", "srigl"]}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, x_test, y_train, y_test


def _accuracy(digits, pattern: str, method: str, seed: int) -> float:
    x_train, x_test, y_train, y_test = digits
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    if pattern != "dense":
        model = sparsefx.transform(model, pattern=pattern, sparsity=0.9, init="random",
                                   seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batches = -(-len(x_train) // BATCH)
    dst = None if pattern == "dense" else sparsefx.DST(
        model, optimizer, method=method, total_steps=EPOCHS * batches, delta_t=DELTA_T,
        seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(BATCH):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            if dst is not None:
                dst.step()
    with torch.no_grad():
        return (model(x_test).argmax(dim=1) == y_test).float().mean().item() * 100


def _mean_accuracy(digits, pattern, method) -> float:
    return sum(_accuracy(digits, pattern, method, seed) for seed in SEEDS) / len(SEEDS)


@pytest.fixture(scope="module")
def dense_accuracy(digits):
    return _mean_accuracy(digits, "dense", "-")


@pytest.mark.parametrize("pattern", list(METHODS))
def test_every_method_matches_static_and_dense_is_the_ceiling(digits, dense_accuracy, pattern):
    results = {method: _mean_accuracy(digits, pattern, method) for method in METHODS[pattern]}
    print(f"\n{pattern} at 90 %: dense {dense_accuracy:.2f}, "
          + ", ".join(f"{method} {accuracy:.2f}" for method, accuracy in results.items()))
    assert results["static"] > 90, "the static sparse model itself must train"
    for method, accuracy in results.items():
        assert accuracy >= results["static"] - TOLERANCE, (method, results)
        assert accuracy <= dense_accuracy + TOLERANCE, (method, dense_accuracy, results)
