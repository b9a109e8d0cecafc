"""Dynamic sparse training on several processes: DDP, compiled either way round, or FSDP2.

    torchrun --nproc-per-node 2 examples/distributed.py                   # DDP, fan-in, SRigL
    torchrun --nproc-per-node 3 examples/distributed.py --wrap fsdp2 --pattern diag \\
        --method dynadiag
    torchrun --nproc-per-node 2 examples/distributed.py --wrap "compile(ddp)"

Every rank builds the same model (the same transform seed), trains on its share of each
global batch, and calls ``dst.step()`` on every step. DST reads the growth scores from the
all-reduced dense gradient, so every rank takes the same structure decision; the script
checks at the end that the ranks hold the same structure and values. The backend is gloo on
the CPU, NCCL when every rank has a GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from common import accuracy, digits, mlp  # this folder is on sys.path
from sparsefx.fsdp import is_sharded
from sparsefx.kernels.distributed import differs_across_ranks
from sparsefx.wrapping import WRAPPINGS, wrap


def checksum(model: nn.Module) -> torch.Tensor:
    """Every parameter and buffer summed, whole (FSDP2's shards gathered), in float64."""
    return torch.stack([(t.full_tensor() if is_sharded(t) else t).double().sum()
                        for t in model.state_dict().values()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrap", choices=WRAPPINGS, default="ddp")
    parser.add_argument("--pattern", choices=list(sparsefx.registry.PATTERNS), default="fanin")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default="srigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=96, help="global, over all ranks")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--delta-t", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of {world} ranks")
    data = digits(args.seed, device)
    x_train, y_train = data[0], data[1]

    model = sparsefx.transform(mlp(args.hidden, args.seed), args.pattern, args.sparsity,
                               init="random", seed=args.seed, keep_last_dense=True).to(device)
    runner = wrap(model, args.wrap)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    dst = sparsefx.DST(runner, optimizer, method=args.method, total_steps=steps,
                       delta_t=args.delta_t, seed=args.seed)
    share = args.batch_size // world
    generator = torch.Generator().manual_seed(args.seed)  # the same global order everywhere
    step = 0
    while step < steps:
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for batch in order.split(args.batch_size):
            mine = batch[rank * share:(rank + 1) * share]
            if len(mine) == 0 or step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(runner(x_train[mine]), y_train[mine]).backward()
            optimizer.step()
            dst.step()
            step += 1

    agree = not differs_across_ranks(checksum(model)).any()
    model.eval()
    score = accuracy(runner, data)
    if rank == 0:
        print(dst)
        print(f"{args.wrap}, {world} ranks, {args.pattern}/{args.method} at "
              f"{args.sparsity:.0%}: test accuracy {score:.2%}; ranks hold "
              f"{'the same' if agree else 'DIFFERENT'} structure and values")
    del runner, dst, optimizer, model
    dist.destroy_process_group()
    # End without the interpreter's teardown: there gloo sometimes aborts in a C++ destructor
    # after the group is gone ("terminate called without an active exception", SIGABRT),
    # with the work done and the result printed. The tests' workers end the same way.
    sys.stdout.flush()
    os._exit(0 if agree else 1)


if __name__ == "__main__":
    main()
