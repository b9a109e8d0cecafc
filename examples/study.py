"""The accuracy study: every DST method against dense, 3 seeds, and whether sparsity pays.

    python examples/study.py                         # the cells: some hours on 2 cores
    python examples/study.py --iso-time --jobs 1 --threads 2   # then the iso-time pairs, alone
    python examples/study.py --profile --jobs 1 --threads 2    # the per-step cost breakdown
    python examples/study.py --tasks mlp --seeds 0 --sparsities 0.9
    python examples/study.py --quick --out /tmp/study   # a smoke run of every path (CI)

Tasks, each trained with the same budget (model, steps, learning rate, batch) by every
method:

- ``mlp``: 64-256-256-10 on scikit-learn's ``load_digits``; test accuracy.
- ``vit``: the small vision transformer of ``vit.py`` (dim 128, 2 blocks) on the same
  digits; test accuracy.
- ``lm``: the byte-level transformer of ``charlm.py`` (width 128, 4 blocks, context 128) on
  2 MB of the Python standard library's source; validation loss as perplexity per byte, and
  its curve against steps and against training seconds.

Methods (``VARIANTS``): dense; ``static``, ``set`` and ``rigl`` on every pattern; on fan-in
also ``srigl`` (its reference's rule: layer-wide drop, ablation, the budget shared by the
live rows), ``srigl-row`` (sparsefx 0.1's per-row drop, fixed fan-in) and ``srigl-fixed``
(layer-wide drop, fixed fan-in); on diagonals ``dynadiag`` (sparse-to-sparse) and
``dynadiag-ref`` (its reference's dense-during-selection softmax gating). Every Linear is
sparsified at the one sparsity except the output head (and the ViT's 4-pixel patch embedding).
At 80 and 95 % only the ``MAIN`` methods run.

Whether sparsity pays, on the LM: **iso-parameters**, a sparse model widened until its
non-zero linear weights equal the dense model's (``WIDE``), trained for the same steps; and
**iso-time** (``--iso-time``), the same pair trained for the same wall-clock on this machine,
one after the other with nothing else running: dense first, then the wide model for as many
steps as fit in the dense run's training seconds.

Each finished run is saved to ``study.json`` at once, and runs found there with the same
settings are not run again: an interrupted study resumes where it stopped.
``study_report.py`` writes ``study.md``, the plots and the README's section from it.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

import sparsefx
from charlm import charlm, lm_loss, perplexity, random_batches, stdlib_text, validation_loss
from common import accuracy, digits, fit, mlp, train
from vit import vit

RESULTS = Path(__file__).parent / "results"

VARIANTS = {  # what each method label trains with
    "static": lambda seed: "static",
    "set": lambda seed: sparsefx.SET(seed=seed),
    "rigl": lambda seed: "rigl",
    "srigl": lambda seed: sparsefx.SRigL(),
    "srigl-row": lambda seed: sparsefx.SRigL(drop="row", fan_in="fixed"),
    "srigl-fixed": lambda seed: sparsefx.SRigL(fan_in="fixed"),
    "dynadiag": lambda seed: sparsefx.DynaDiag(),
    "dynadiag-ref": lambda seed: sparsefx.DynaDiag(selection="reference", temperature=5.0),
}
METHODS = [("dense", "dense"),
           ("unstructured", "static"), ("unstructured", "set"), ("unstructured", "rigl"),
           ("fanin", "static"), ("fanin", "set"), ("fanin", "rigl"), ("fanin", "srigl"),
           ("fanin", "srigl-row"), ("fanin", "srigl-fixed"),
           ("diag", "static"), ("diag", "set"), ("diag", "rigl"), ("diag", "dynadiag"),
           ("diag", "dynadiag-ref"),
           ("blockdiag", "static"), ("blockdiag", "set"), ("blockdiag", "rigl"),
           ("blockdiag", "dynadiag")]
MAIN = [("unstructured", "rigl"), ("fanin", "rigl"), ("fanin", "srigl"), ("diag", "rigl"),
        ("diag", "dynadiag")]  # also at the sparsities other than 90 %
WIDE = [("diag", "rigl")]  # the sparse-wide model of the iso rows (lm, 90 %)


@dataclass
class Task:
    """One model and its training budget, the same for every method."""
    model: dict  # the model's constructor arguments
    lr: float
    batch_size: int
    epochs: int = 0  # digits: passes over the 1,347 training images
    steps: int = 0  # lm: optimizer steps on random windows
    text_bytes: int = 0  # lm: bytes of standard-library source (90 % train, 10 % validation)
    delta_t: int = 100  # steps between DST updates (the RigL default)
    keep_first_dense: bool = False
    curve_points: int = 0  # lm: validation losses recorded along the way
    curve_windows: int = 0  # lm: validation windows each of them reads (the final: all)


FULL = {
    "mlp": Task(model=dict(hidden=256), lr=3e-3, batch_size=64, epochs=30),
    "vit": Task(model=dict(dim=128, depth=2), lr=2e-3, batch_size=64, epochs=30,
                keep_first_dense=True),  # the patch embedding sees 4 pixels
    "lm": Task(model=dict(dim=128, depth=4, context=128), lr=3e-3, batch_size=16, steps=1000,
               text_bytes=2_000_000, curve_points=20, curve_windows=128),
}
QUICK = {  # tiny: every code path, in seconds
    "mlp": Task(model=dict(hidden=64), lr=3e-3, batch_size=64, epochs=1, delta_t=5),
    "vit": Task(model=dict(dim=32, depth=1), lr=2e-3, batch_size=64, epochs=1, delta_t=5,
                keep_first_dense=True),
    "lm": Task(model=dict(dim=32, depth=1, context=16), lr=3e-3, batch_size=8, steps=20,
               text_bytes=20_000, delta_t=5, curve_points=4, curve_windows=8),
}


def _linear_weights(model) -> int:
    """Non-zero weights of the Linears a study model sparsifies (all but the head)."""
    total = 0
    for name, module in model.named_modules():
        if name == "head":
            continue
        if isinstance(module, sparsefx.layers.SPARSE_LAYERS):
            total += module.stored
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
    return total


def wide_width(task: Task, pattern: str, sparsity: float) -> int:
    """The LM width (a multiple of its 4 heads) at which ``pattern`` at ``sparsity`` keeps
    as many linear weights as the dense model has."""
    dense = _linear_weights(charlm(0, **task.model))
    guess = task.model["dim"] / math.sqrt(1 - sparsity)

    def kept(width):
        model = charlm(0, **{**task.model, "dim": width})
        return _linear_weights(sparsefx.transform(model, pattern, sparsity, init="random",
                                                  keep_last_dense=True))
    widths = range(max(4, 4 * round(guess / 4) - 16), 4 * round(guess / 4) + 20, 4)
    return min(widths, key=lambda width: abs(kept(width) - dense))


def run(task_name: str, task: Task, pattern: str, method: str, sparsity: float,
        seed: int, width: int | None = None, steps: int | None = None) -> dict:
    """Train one model; returns its metrics (and, for the LM, its validation curve)."""
    started = time.perf_counter()
    extra = {}
    if task_name == "lm":
        train_text, validation_text, _ = stdlib_text(task.text_bytes)
        config = task.model if width is None else {**task.model, "dim": width}
        model = charlm(seed, **config)
    else:
        data = digits(seed)
        model = (mlp(task.model["hidden"], seed) if task_name == "mlp"
                 else vit(seed, **task.model))
    if pattern != "dense":
        model = sparsefx.transform(model, pattern, sparsity, init="random", seed=seed,
                                   keep_first_dense=task.keep_first_dense,
                                   keep_last_dense=True)
    dst_method = None if method == "dense" else VARIANTS[method](seed)
    if task_name == "lm":
        context, steps = task.model["context"], steps or task.steps
        curve_text = validation_text[:task.curve_windows * context + context + 1]
        every = steps // task.curve_points if task.curve_points else 0
        fit(model, random_batches(train_text, steps, task.batch_size, context, seed),
            steps, task.lr, method, seed, method=dst_method, delta_t=task.delta_t,
            progress=False, loss_fn=lm_loss, evaluate_every=every,
            evaluate=lambda m: validation_loss(m, curve_text, context))
        curve = fit.curve
        loss = validation_loss(model, validation_text, context)
        extra = dict(curve=[dict(step=s, seconds=t, val_loss=v) for s, t, v in curve],
                     train_seconds=curve[-1][1], steps=steps,
                     linear_weights=_linear_weights(model))
        metrics = dict(val_loss=loss, perplexity=perplexity(loss))
    else:
        train(model, data, task.epochs, task.batch_size, task.lr, method, seed,
              method=dst_method, delta_t=task.delta_t, progress=False)
        metrics = dict(accuracy=100 * accuracy(model.eval(), data))
    return dict(task=task_name, pattern=pattern, method=method,
                sparsity=0.0 if pattern == "dense" else sparsity, seed=seed,
                width=width or task.model.get("dim", task.model.get("hidden")), **metrics,
                **extra, seconds=time.perf_counter() - started)


def iso_time(task: Task, pattern: str, method: str, sparsity: float, seed: int,
             width: int) -> list[dict]:
    """The iso-time pair: dense for the task's steps, then the wide sparse model for as many
    steps as its measured per-step time fits into the dense run's training seconds."""
    dense = run("lm", task, "dense", "dense", sparsity, seed)
    per_step = _seconds_per_step(task, pattern, method, sparsity, seed, width)
    steps = max(task.delta_t + 1, round(dense["train_seconds"] / per_step))
    wide = run("lm", task, pattern, method, sparsity, seed, width=width, steps=steps)
    return [dict(dense, kind="iso-time"),
            dict(wide, kind="iso-time", calibrated_seconds_per_step=per_step)]


def _seconds_per_step(task, pattern, method, sparsity, seed, width, steps: int = 30) -> float:
    train_text, _, _ = stdlib_text(task.text_bytes)
    model = sparsefx.transform(charlm(seed, **{**task.model, "dim": width}), pattern,
                               sparsity, init="random", seed=seed, keep_last_dense=True)
    fit(model, random_batches(train_text, steps, task.batch_size, task.model["context"], seed),
        10 * steps, task.lr, method, seed, method=VARIANTS[method](seed), delta_t=task.delta_t,
        progress=False, loss_fn=lm_loss, evaluate_every=5, evaluate=lambda m: 0.0)
    times = [seconds for _, seconds, _ in fit.curve]  # at steps 5, 10, ..., and the end
    return (times[-1] - times[1]) / (steps - 10)  # the first 10 steps warm up


def profile(task: Task, pattern: str, method: str, sparsity: float, width: int) -> dict:
    """Where a training step's time goes, dense against the wide sparse model: CPU time by
    kind of op (``torch.profiler``, self time, 10 steps after 5 to warm up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    train_text, _, _ = stdlib_text(task.text_bytes)
    result = {}
    for label, model_width, sparse in (("dense", task.model["dim"], False),
                                        ("wide", width, True)):
        model = charlm(0, **{**task.model, "dim": model_width})
        if sparse:
            model = sparsefx.transform(model, pattern, sparsity, init="random",
                                       keep_last_dense=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
        batches = list(random_batches(train_text, 15, task.batch_size, task.model["context"],
                                      0))
        for index, (x, y) in enumerate(batches):
            if index == 5:
                profiler = torch_profile(activities=[ProfilerActivity.CPU])
                profiler.__enter__()
            loss = lm_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        profiler.__exit__(None, None, None)
        kinds: dict[str, float] = {}
        for event in profiler.key_averages():
            kind = _kind(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 10 / 1e3
        result[label] = dict(width=model_width, ms_per_step=dict(sorted(
            kinds.items(), key=lambda item: -item[1])))
    return result


def _kind(name: str) -> str:
    """The kind of work an op's name says it does."""
    rules = [("sparsefx", "sparse linear (sparsefx ops)"),
             ("scaled_dot_product", "attention"), ("flash_attention", "attention"),
             ("softmax", "attention"), ("bmm", "attention"),
             ("layer_norm", "layer norm"), ("gelu", "elementwise (gelu, add, mul, ...)"),
             ("adam", "optimizer"), ("foreach", "optimizer"),
             ("embedding", "embedding"), ("nll_loss", "loss"), ("log_softmax", "loss"),
             ("addmm", "dense linear (head, dense model)"), ("mm", "dense linear (head, "
                                                                  "dense model)"),
             ("linear", "dense linear (head, dense model)"),
             ("add", "elementwise (gelu, add, mul, ...)"),
             ("mul", "elementwise (gelu, add, mul, ...)"),
             ("copy", "copies and layout"), ("clone", "copies and layout"),
             ("contiguous", "copies and layout"), ("transpose", "copies and layout"),
             ("view", "copies and layout"), ("reshape", "copies and layout")]
    lowered = name.lower()
    return next((kind for key, kind in rules if key in lowered), "other")


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, logical_cores=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version())


def key(row: dict) -> tuple:
    return (row["task"], row["pattern"], row["method"], row["sparsity"], row["seed"],
            row.get("width"), row.get("kind", "cell"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(FULL), default=list(FULL))
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help="default: 0.8 0.9 0.95 (--quick: 0.9)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        help="runs at a time, in separate processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=[f"{p}/{m}" for p, m in METHODS],
                        help="only these (default: all)")
    parser.add_argument("--no-wide", action="store_true", help="leave out the iso rows")
    parser.add_argument("--iso-time", action="store_true",
                        help="run the iso-time pairs (one at a time: --jobs 1)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a training step, dense against the wide model")
    parser.add_argument("--set", nargs="+", default=[], metavar="TASK.FIELD=VALUE",
                        help="change a task's setting, e.g. vit.delta_t=50 lm.steps=1000")
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tasks = {name: replace((QUICK if args.quick else FULL)[name]) for name in args.tasks}
    for setting in args.set:
        (name, field_name), value = setting.split("=", 1)[0].split("."), setting.split("=", 1)[1]
        old = getattr(tasks[name], field_name)
        setattr(tasks[name], field_name, type(old)(ast.literal_eval(value)))
    methods = [(p, m) for p, m in METHODS if args.methods is None or f"{p}/{m}" in args.methods]
    args.sparsities = args.sparsities or ([0.9] if args.quick else [0.8, 0.9, 0.95])
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if "lm" in tasks:
        print(f"lm text: {stdlib_text(tasks['lm'].text_bytes)[2]}")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "study.json"
    results = dict(command="python examples/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                   machine=machine(), jobs=args.jobs, threads=args.threads, seeds=args.seeds,
                   tasks={name: asdict(task) for name, task in tasks.items()}, runs=[])
    if path.exists():  # resume: keep the runs made with these same task settings
        saved = json.loads(path.read_text())
        results["runs"] = [r for r in saved["runs"] if r["task"] not in tasks
                           or saved["tasks"].get(r["task"]) == results["tasks"][r["task"]]]
        results["tasks"] = {**{t: c for t, c in saved["tasks"].items()
                               if any(r["task"] == t for r in results["runs"])},
                            **results["tasks"]}
        results["profile"] = saved.get("profile")
        results["commands"] = saved.get("commands", [])
    results.setdefault("commands", [])
    results["commands"] = [*results["commands"], results["command"]]
    done = {key(r) for r in results["runs"]}
    lm = tasks.get("lm")
    widths = {(p, m): wide_width(lm, p, 0.9) for p, m in WIDE} if lm else {}

    todo = _cells(tasks, methods, args, widths) if not (args.iso_time or args.profile) else []
    if args.iso_time and lm:
        todo = [("iso", p, m, 0.9, seed, widths[p, m]) for p, m in WIDE for seed in args.seeds]
    todo = [cell for cell in todo if _key_of(cell, tasks) not in done]
    print(f"{len(done)} runs saved in {path}, {len(todo)} to run, {args.jobs} at a time")

    def save():
        path.write_text(json.dumps(results, indent=1))

    if args.profile and lm:
        (pattern, method), = WIDE[:1]
        results["profile"] = profile(lm, pattern, method, 0.9, widths[pattern, method])
        save()
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init, initargs=(args.threads,)) as pool:
        futures = [pool.submit(iso_time, lm, *rest) if task == "iso"
                   else pool.submit(run, task, tasks[task], *rest) for task, *rest in todo]
        for count, future in enumerate(futures, 1):
            rows = future.result()
            for row in rows if isinstance(rows, list) else [rows]:
                results["runs"].append(row)
                metric = "accuracy" if "accuracy" in row else "perplexity"
                elapsed = time.perf_counter() - started
                print(f"[{count}/{len(todo)} {elapsed / 60:5.1f} min] {row['task']:3s} "
                      f"{row['pattern']:12s} {row['method']:12s} {row['sparsity']:.2f} "
                      f"w{row['width']} seed {row['seed']} {row.get('kind', '')}: {metric} "
                      f"{row[metric]:.3f} ({row['seconds']:.0f} s)", flush=True)
            save()
    save()
    import study_report
    study_report.write(args.out)


def _cells(tasks, methods, args, widths) -> list[tuple]:
    """The sparsity nearest 90 % first, seed by seed (the targets are there; a partial study
    is then the most useful one), the iso rows, then the other sparsities' main methods, seed
    by seed again (every sparsity has a first seed before any has a second)."""
    order = sorted(args.sparsities, key=lambda s: abs(s - 0.9))
    todo = [(task, pattern, method, order[0], seed)
            for seed in args.seeds for task in tasks for pattern, method in methods]
    if "lm" in tasks and not args.no_wide:
        todo += [("lm", p, m, 0.9, seed, widths[p, m]) for p, m in WIDE
                 for seed in args.seeds if (p, m) in methods or args.methods is None]
    todo += [(task, pattern, method, sparsity, seed)
             for seed in args.seeds for sparsity in order[1:] for task in tasks
             for pattern, method in methods if (pattern, method) in MAIN]
    return todo


def _key_of(cell: tuple, tasks: dict) -> tuple:
    task, pattern, method, sparsity, seed, *rest = cell
    if task == "iso":  # done when its wide run is saved
        return ("lm", pattern, method, sparsity, seed, rest[0], "iso-time")
    config = tasks[task].model
    width = rest[0] if rest else config.get("dim", config.get("hidden"))
    return (task, pattern, method, 0.0 if pattern == "dense" else sparsity, seed, width,
            "cell")


if __name__ == "__main__":
    main()
