"""Sparsify a trained model in one shot, without retraining: keep the largest weights.

    python examples/sparsify_pretrained.py                 # MLP on digits, 4 patterns
    python examples/sparsify_pretrained.py --sparsity 0.5 0.8

A dense MLP is trained on scikit-learn's digits (the "pretrained" model); then
``sparsefx.transform(model, pattern, sparsity, init="magnitude")`` keeps, per layer, the
largest-L2 diagonals (diag), the largest entries of each row (fanin), the largest n of
every m (nm 2:4) or the largest entries of the layer (unstructured). The table shows test
accuracy straight after, with no training: how much each structure costs a trained model.
"""
from __future__ import annotations

import argparse

import torch

import sparsefx
from common import accuracy, digits, mlp, train  # this folder is on sys.path

from sparsefx.registry import PATTERNS

NM = (2, 4)  # the N:M layers' n of every m


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--epochs", type=int, default=15, help="training of the dense model")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = digits(args.seed)
    dense = mlp(args.hidden, args.seed)
    train(dense, data, args.epochs, batch_size=64, lr=3e-3, label="dense", seed=args.seed)
    dense.eval()
    print(f"\ndense: {accuracy(dense, data):.2%} test accuracy\n")

    header = "pattern        " + "".join(f"{s:>9.0%}" for s in args.sparsity)
    print("one-shot magnitude sparsification, test accuracy (no retraining)")
    print(header)
    for pattern, spec in PATTERNS.items():
        options = {"nm": NM} if spec.takes_nm else {}
        cells = []
        for sparsity in args.sparsity:
            if spec.takes_nm:  # N:M fixes its own sparsity: 2:4 is 50 %
                cells.append(f"{accuracy(_sparse(dense, pattern, 0.5, options), data):>9.2%}"
                             if sparsity == args.sparsity[0] else f"{'-':>9}")
                continue
            sparse = _sparse(dense, pattern, sparsity, options)
            cells.append(f"{accuracy(sparse, data):>9.2%}")
        name = (f"{pattern} {NM[0]}:{NM[1]} ({100 * (1 - NM[0] / NM[1]):.0f} %)"
                if spec.takes_nm else pattern)
        print(f"{name:15s}" + "".join(cells))

    print("\nthe diag model at the highest sparsity, layer by layer:")
    print(sparsefx.report(_sparse(dense, "diag", max(args.sparsity), {})))


def _sparse(dense, pattern, sparsity, options):
    """The dense model sparsified in one shot; the 10-way output layer stays dense."""
    with torch.no_grad():
        return sparsefx.transform(dense, pattern, sparsity, init="magnitude",
                                  keep_last_dense=True, **options).eval()


if __name__ == "__main__":
    main()
