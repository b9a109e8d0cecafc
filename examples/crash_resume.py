"""Kill a dynamic-sparse-training run with SIGKILL, restart it, and end exactly where an
uninterrupted run ends.

    python examples/crash_resume.py                 # the demonstration below, in a temp folder
    python examples/crash_resume.py --out run/      # one run: resumes from run/latest.pt
    python examples/crash_resume.py --out run/ --kill-at 37   # ... and SIGKILLs itself there

A run checkpoints every ``--checkpoint-every`` steps with ``sparsefx.save_checkpoint`` (model,
optimizer, DST, learning-rate schedule, the step; the random states go with them: the MLP has
dropout), written atomically. On start it resumes from its folder's ``latest.pt`` if there is
one. Batch ``i`` depends only on ``i``, as a resumable data loader's would. Each step appends
its loss (as an exact hex float) to ``losses.txt``.

The demonstration runs one process straight through, and another that kills itself with
SIGKILL between two DST updates and is started again. It checks that the second run's losses
(the steps redone after the restart included) and its final weights and structure are
bit-identical to the first's.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from common import digits  # this folder is on sys.path


def build(args):
    """The run's starting point; the same every time it is called."""
    torch.manual_seed(args.seed)
    dense = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, args.hidden), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, 10))
    model = sparsefx.transform(dense, args.pattern, args.sparsity, init="random",
                               seed=args.seed, keep_last_dense=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                   total_steps=args.steps)
    dst = sparsefx.DST(model, optimizer, method=args.method, total_steps=args.steps,
                       delta_t=args.delta_t, seed=args.seed)
    return model, optimizer, schedule, dst


def train(args) -> None:
    """One run in ``args.out``, resumed from its last checkpoint if it has one."""
    model, optimizer, schedule, dst = build(args)
    latest = args.out / "latest.pt"
    start = 0
    if latest.exists():
        start = sparsefx.load_checkpoint(latest, model=model, optimizer=optimizer, dst=dst,
                                         scheduler=schedule)["step"]
        print(f"resumed at step {start} from {latest}")
    x_train, y_train = digits(args.seed)[:2]
    model.train()
    with open(args.out / "losses.txt", "a") as log:
        for step in range(start, args.steps):
            batch = torch.randint(0, len(x_train), (64,), generator=torch.Generator()
                                  .manual_seed(args.seed * 100_003 + step))
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            dst.step()
            log.write(f"{step + 1} {loss.item().hex()}\n")
            log.flush()
            if (step + 1) % args.checkpoint_every == 0:
                sparsefx.save_checkpoint(latest, model=model, optimizer=optimizer, dst=dst,
                                         scheduler=schedule, step=step + 1)
            if step + 1 == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash
    torch.save(model.state_dict(), args.out / "final.pt")
    print(f"finished {args.steps} steps in {args.out}")


def losses(folder: Path) -> dict[int, str]:
    """Step -> loss, checking that a step logged twice (redone after a restart) logged the
    same bits both times."""
    logged = {}
    for line in (folder / "losses.txt").read_text().splitlines():
        step, loss = line.split()
        if logged.setdefault(int(step), loss) != loss:
            raise SystemExit(f"step {step} redone after the restart gave loss "
                             f"{float.fromhex(loss)}, not {float.fromhex(logged[int(step)])}")
    return logged


def demonstrate(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="sparsefx-crash-"))
    kill_at = args.kill_at or (2 * args.delta_t + args.delta_t // 2)  # between two updates
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
              if key not in ("out", "kill_at")]
    run = lambda folder, *more: subprocess.run(
        [sys.executable, __file__, "--out", str(folder), *passed, *more])
    run(root / "straight").check_returncode()
    killed = run(root / "killed", f"--kill-at={kill_at}")
    if killed.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run meant to be killed ended with {killed.returncode}")
    print(f"killed by SIGKILL at step {kill_at}; starting it again")
    run(root / "killed").check_returncode()

    straight, resumed = losses(root / "straight"), losses(root / "killed")
    if straight != resumed:
        differ = [step for step in straight if straight[step] != resumed.get(step)]
        raise SystemExit(f"losses differ at steps {differ[:10]}")
    a = torch.load(root / "straight" / "final.pt", weights_only=True)
    b = torch.load(root / "killed" / "final.pt", weights_only=True)
    for name in a:
        if not torch.equal(a[name], b[name]):
            raise SystemExit(f"{name} differs between the straight and the killed run")
    print(f"killed and resumed run == straight run: {len(straight)} losses and every weight "
          f"and structure buffer bit-identical ({root})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the run's folder; without it, the demonstration")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL after this step")
    parser.add_argument("--pattern", choices=["diag", "fanin", "unstructured"], default="fanin")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default="srigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--delta-t", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out is None:
        demonstrate(args)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        train(args)


if __name__ == "__main__":
    main()
