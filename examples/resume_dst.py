"""Save a dynamic-sparse-training run mid-way and resume it on exactly the same trajectory.

    python examples/resume_dst.py                          # srigl on fan-in, digits
    python examples/resume_dst.py --pattern diag --method dynadiag

What a checkpoint needs: the model's ``state_dict`` (values *and* structure buffers), the
optimizer's, and ``DST.state_dict()`` (step, random state, SRigL's ablated rows, DynaDiag's
importances). To resume, build the same model, optimizer and ``DST`` as at the start, then
load the three. The script trains once straight through and once with a save / fresh start
/ load half-way, and checks that both end with identical weights and structure.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsefx
from common import accuracy, digits, mlp  # this folder is on sys.path


def build(args):
    """The run's starting point; the same every time it is called."""
    sparse = sparsefx.transform(mlp(args.hidden, args.seed), args.pattern, args.sparsity,
                                init="random", seed=args.seed, keep_last_dense=True)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=3e-3, weight_decay=1e-4)
    dst = sparsefx.DST(sparse, optimizer, method=args.method, total_steps=args.steps,
                       delta_t=args.delta_t, seed=args.seed)
    return sparse, optimizer, dst


def run(model, optimizer, dst, data, steps: range, batch_size: int, seed: int) -> None:
    """Steps ``steps`` of the run; batch ``i`` depends only on ``i``, as a resumable data
    loader's would."""
    x_train, y_train = data[0], data[1]
    for step in steps:
        batch = torch.randint(0, len(x_train), (batch_size,),
                              generator=torch.Generator().manual_seed(seed * 100_003 + step))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()
        dst.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=["diag", "fanin", "unstructured"], default="fanin")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default="srigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--delta-t", type=int, default=25)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint")
    args = parser.parse_args()
    data = digits(args.seed)
    half = args.steps // 2

    straight = build(args)
    run(*straight, data, range(args.steps), 64, args.seed)

    model, optimizer, dst = build(args)
    run(model, optimizer, dst, data, range(half), 64, args.seed)
    checkpoint = (args.out or Path(tempfile.mkdtemp(prefix="sparsefx-"))) / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "dst": dst.state_dict()}, checkpoint)
    print(f"saved at step {dst.step_count}: {checkpoint}")
    print(dst)
    del model, optimizer, dst  # as if the process had ended

    model, optimizer, dst = build(args)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    dst.load_state_dict(saved["dst"])
    run(model, optimizer, dst, data, range(half, args.steps), 64, args.seed)

    for (name, a), (_, b) in zip(straight[0].state_dict().items(), model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), f"{name} differs between the straight and resumed runs"
    print(f"\nresumed run == straight run after {args.steps} steps (every weight and structure "
          f"buffer identical); test accuracy {accuracy(model.eval(), data):.2%}")


if __name__ == "__main__":
    main()
