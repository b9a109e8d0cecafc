"""Train a diagonal-sparse MLP on scikit-learn's handwritten digits, next to a dense one.

    python examples/quickstart.py                 # diag, 90 % sparse, DynaDiag, 15 epochs
    python examples/quickstart.py --pattern fanin --method srigl --sparsity 0.95 --compile

The digits ship with scikit-learn: nothing is downloaded. ``sparsefx.transform`` turns a
dense MLP into its sparse copy, and ``sparsefx.DST`` moves its structure while it trains;
the script prints the per-layer report, test accuracy next to the dense model trained the
same way, and the inference speed of both, measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark
from tqdm import tqdm

import sparsefx


def mlp(hidden: int, seed: int) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels blank in every training image: leave them unscaled
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def train(model, data, epochs: int, batch_size: int, lr: float, label: str, seed: int,
          method: str | None = None, delta_t: int = 25):
    """AdamW with a one-cycle schedule; with ``method``, ``sparsefx.DST`` after each step."""
    x_train, y_train, _, _ = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total_steps = epochs * math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=total_steps)
    dst = None if method is None else sparsefx.DST(model, optimizer, method=method,
                                                   total_steps=total_steps, delta_t=delta_t,
                                                   seed=seed)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(epochs), desc=f"{label:>6}", unit="epoch")
    for _ in progress:
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if dst is not None:
                dst.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return dst


@torch.no_grad()
def accuracy(model, data) -> float:
    _, _, x_test, y_test = data
    return (model(x_test).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def inference_ms(model, batch: int) -> float:
    x = torch.randn(batch, 64)
    timer = benchmark.Timer("model(x)", globals=dict(model=model, x=x),
                            num_threads=torch.get_num_threads())
    return 1e3 * timer.blocked_autorange(min_run_time=0.5).median


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=["diag", "fanin"], default="diag")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default=None,
                        help="DST method (default: dynadiag for diag, srigl for fanin)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--delta-t", type=int, default=25, help="steps between DST updates")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    method = args.method or {"diag": "dynadiag", "fanin": "srigl"}[args.pattern]

    started = time.perf_counter()
    data = digits(args.seed)
    dense = mlp(args.hidden, args.seed)
    # the same initial weights, sparsified: random structure (training from scratch), the
    # 10-way output layer kept dense as is usual
    sparse = sparsefx.transform(dense, args.pattern, args.sparsity, init="random",
                                seed=args.seed, keep_last_dense=True)
    models = {"dense": dense, args.pattern: sparse}
    print(sparse)
    runners = {name: torch.compile(m, fullgraph=True) if args.compile else m
               for name, m in models.items()}
    train_seconds = {}
    for name, model in runners.items():
        begin = time.perf_counter()
        dst = train(model, data, args.epochs, args.batch_size, args.lr, name, args.seed,
                    method=None if name == "dense" else method, delta_t=args.delta_t)
        train_seconds[name] = time.perf_counter() - begin
    print(dst)

    print()
    print(sparsefx.report(sparse))
    print("\ntest accuracy (digits, 450 held-out images) and training time:")
    for name, model in runners.items():
        print(f"  {name:6s} {accuracy(model.eval(), data):.2%}   trained in "
              f"{train_seconds[name]:.1f} s")
    print("\ninference, median of a timed autorange in this run:")
    for batch in (1, 256):
        times = {name: inference_ms(model, batch) for name, model in runners.items()}
        print(f"  batch {batch:3d}: dense {times['dense']:.3f} ms, {args.pattern} "
              f"{times[args.pattern]:.3f} ms -> {times['dense'] / times[args.pattern]:.2f}x "
              "vs dense")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
