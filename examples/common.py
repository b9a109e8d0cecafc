"""What the examples share: the digits data, an MLP, the training loop, accuracy and timing.

The data is scikit-learn's ``load_digits`` (1,797 8x8 handwritten digits, shipped with the
package: nothing is downloaded), split 75/25 stratified, standardised on the training set.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark
from tqdm import tqdm

import sparsefx


def digits(seed: int, device: str = "cpu"):
    """``(x_train, y_train, x_test, y_test)``: 64 standardised pixels per image."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels blank in every training image: leave them unscaled
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=device)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def mlp(hidden: int, seed: int) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def train(model, data, epochs: int, batch_size: int, lr: float, label: str, seed: int,
          method: str | None = None, runner=None, progress: bool = True,
          weight_decay: float = 1e-4, **dst_options):
    """``epochs`` shuffled passes over the digits' training set through ``fit``. Returns the
    DST manager (or None)."""
    x_train, y_train, _, _ = data
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
            for batch in order.split(batch_size):
                yield x_train[batch], y_train[batch]

    return fit(model, batches(), epochs * steps_per_epoch, lr, label, seed, method=method,
               runner=runner, progress=progress, weight_decay=weight_decay, **dst_options)


def fit(model, batches, total_steps: int, lr: float, label: str, seed: int,
        method=None, runner=None, progress: bool = True,
        weight_decay: float = 1e-4, loss_fn=F.cross_entropy, evaluate=None,
        evaluate_every: int = 0, **dst_options):
    """AdamW with a one-cycle schedule over ``total_steps`` ``(input, target)`` pairs from
    ``batches``; with ``method`` (a name or a ``sparsefx.methods.Method``), ``sparsefx.DST``
    after each step. ``runner`` is what the batches go through (e.g. the compiled model);
    ``model`` is what the optimizer and DST see. ``dst_options`` (e.g. ``delta_t``) go to
    ``sparsefx.DST``; the rest keep its defaults. With ``evaluate`` (a function of the model
    returning a number), it is called every ``evaluate_every`` steps and at the end, off
    the clock: ``fit.curve`` then holds ``(step, training seconds, value)`` rows. Returns the
    DST manager (or None)."""
    runner = model if runner is None else runner
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=total_steps)
    seeded = {} if isinstance(method, sparsefx.methods.Method) else {"seed": seed}
    dst = None if method is None else sparsefx.DST(model, optimizer, method=method,
                                                   total_steps=total_steps, **seeded,
                                                   **dst_options)
    fit.curve = []
    trained = 0.0  # seconds spent training, evaluations left out

    def record(step):
        fit.curve.append((step, trained, evaluate(model)))
        model.train()

    model.train()
    with tqdm(total=total_steps, desc=f"{label:>6}", unit="step", disable=not progress) as bar:
        for step, (inputs, targets) in enumerate(batches):
            started = time.perf_counter()
            loss = loss_fn(runner(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if dst is not None:
                dst.step()
            trained += time.perf_counter() - started
            bar.update()
            if progress and (step % 50 == 0 or step == total_steps - 1):
                bar.set_postfix(loss=f"{loss.item():.3f}")  # a host sync: only now and then
            if evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 \
                    and step + 1 < total_steps:
                record(step + 1)
    if evaluate is not None:
        record(total_steps)
    return dst


@torch.no_grad()
def accuracy(model, data) -> float:
    _, _, x_test, y_test = data
    return (model(x_test).argmax(1) == y_test).float().mean().item()


def interleaved_ms(candidates: dict, rounds: int = 5, min_run_time: float = 0.2) -> dict:
    """Median milliseconds per call of each ``candidates[name]()``, timed in the same run:
    each round times every candidate once (a ``torch.utils.benchmark`` blocked autorange),
    round after round, so that a change in the machine's load falls on all of them alike."""
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            timer = benchmark.Timer("run()", globals={"run": run},
                                    num_threads=torch.get_num_threads())
            samples[name].append(1e3 * timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}
