"""What dynamic sparse training costs on top of training with a fixed structure (CPU).

A 90 %-sparse MLP (1024 -> 2048 -> 2048 -> 1024, then a dense 10-way head) trains on random
batches of 256 with AdamW for ``--steps`` steps, once per method, with ``delta_t=100``. Every
step is timed; the overhead of a method is

    (time in dst.step() + extra time of the armed forward/backward steps)
    / (training time without them)

where an armed step (the one before an update, which forms each layer's dense gradient in
``growth_tap``) costs its time minus the median plain step of the same run. Methods run
interleaved over ``--rounds`` rounds and the median round is reported.

    python benchmarks/bench_dst_overhead.py   # writes benchmarks/results/dst_overhead_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from common import machine  # this folder is on sys.path when run as a script

RESULTS = Path(__file__).parent / "results"
CASES = [("diag", "static"), ("diag", "set"), ("diag", "rigl"), ("diag", "dynadiag"),
         ("fanin", "static"), ("fanin", "rigl"), ("fanin", "srigl")]


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width),
                         nn.ReLU(), nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 10))


def run(pattern: str, method: str, steps: int, width: int, batch: int, delta_t: int) -> dict:
    model = sparsefx.transform(mlp(width), pattern=pattern, sparsity=0.9, init="random",
                               keep_last_dense=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # t_end=1: updates every delta_t steps for the whole run, the regime the overhead is for
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=steps, delta_t=delta_t,
                       t_end=1.0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=generator)
    target = torch.randint(0, 10, (batch,), generator=generator)
    step_seconds, dst_seconds, armed = [], 0.0, []
    for _ in range(steps):
        armed.append(any(layer.module._growth_probe is not None for layer in dst.layers))
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        middle = time.perf_counter()
        dst.step()
        end = time.perf_counter()
        step_seconds.append(middle - begin)
        dst_seconds += end - middle
    plain = statistics.median(s for s, a in zip(step_seconds, armed, strict=True) if not a)
    armed_extra = sum(s - plain for s, a in zip(step_seconds, armed, strict=True) if a)
    total = sum(step_seconds) + dst_seconds
    return {"pattern": pattern, "method": method, "total_s": total, "dst_step_s": dst_seconds,
            "armed_extra_s": armed_extra, "armed_steps": sum(armed), "plain_step_s": plain,
            "overhead": (dst_seconds + armed_extra) / (total - dst_seconds - armed_extra)}


def measure(steps: int, width: int, batch: int, delta_t: int, rounds: int) -> list[dict]:
    """Every case, interleaved over ``rounds``; per case the median round by overhead."""
    results = {case: [] for case in CASES}
    for _ in range(rounds):
        for case in CASES:
            results[case].append(run(*case, steps, width, batch, delta_t))
    rows = []
    middle = lambda runs, key: sorted(runs, key=lambda r: r[key])[len(runs) // 2]
    for case, runs in results.items():
        row = dict(middle(runs, "overhead"))
        row["time_vs_static"] = (middle(runs, "total_s")["total_s"]
                                 / middle(results[(case[0], "static")], "total_s")["total_s"])
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str, info: dict, width: int, rounds: int) -> str:
    host = f"{info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}"
    lines = [f"`{command}` on {host}; MLP {width}-{2 * width}-{2 * width}-{width}-10 at 90 %, "
             f"AdamW; median of {rounds} rounds.", "",
             "| pattern | method | training s | in dst.step() s | armed steps | "
             "armed extra s | overhead | plain step ms | total vs static |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['total_s']:.2f} | "
                     f"{r['dst_step_s']:.3f} | {r['armed_steps']} | {r['armed_extra_s']:.3f} | "
                     f"{r['overhead']:.2%} | {1e3 * r['plain_step_s']:.1f} | "
                     f"{r['time_vs_static']:.3f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--delta-t", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = measure(args.steps, args.width, args.batch, args.delta_t, args.rounds)
    info = machine()
    command = (f"python benchmarks/bench_dst_overhead.py --steps {args.steps} --width "
               f"{args.width} --batch {args.batch} --delta-t {args.delta_t} --rounds "
               f"{args.rounds}")
    table = markdown(rows, command, info, args.width, args.rounds)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dst_overhead_cpu.md").write_text(table)
        (RESULTS / "dst_overhead_cpu.json").write_text(json.dumps(
            {"command": command, "machine": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
