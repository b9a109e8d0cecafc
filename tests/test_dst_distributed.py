"""DST under DistributedDataParallel: 2 processes on the CPU with the gloo backend. Every
rank must make the same structure decisions, and they must be those of one process training
on the whole batch (DDP averages the gradients; the growth scores use the all-reduced signed
dense gradient)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import sparsefx

WORLD, STEPS, BATCH = 2, 9, 16
CASES = [("diag", "rigl"), ("diag", "dynadiag"), ("fanin", "srigl"), ("unstructured", "set"),
         ("nm", "rigl")]


def _model(pattern: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                          nn.Linear(16, 6))
    options = {"nm": (2, 4)} if pattern == "nm" else {}
    return sparsefx.transform(dense, pattern=pattern, sparsity=0.75, init="random", seed=seed,
                              **options)


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 12, generator=generator), torch.randint(0, 6, (BATCH,),
                                                                      generator=generator)


def _train(model, wrapped, rows: slice, method: str) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    dst = sparsefx.DST(wrapped, optimizer, method=method, total_steps=12, delta_t=2,
                       gamma_sal=0.6, seed=3)
    moved = 0
    for step in range(STEPS):
        x, target = _batch(step)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x[rows]), target[rows]).backward()
        optimizer.step()
        moved += dst.step()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    state["moved"] = torch.tensor(moved)
    return state


def _worker(rank: int, init_file: str, out_dir: str, pattern: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model(pattern)
        # int16 fan-in ids cannot be broadcast by gloo or NCCL; the structure is the same on
        # every rank already (same transform seed), and DST keeps it so
        wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        share = BATCH // WORLD
        state = _train(model, wrapped, slice(rank * share, (rank + 1) * share), method)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        del wrapped
    finally:
        dist.destroy_process_group()
    # its result is its file: end without the interpreter's teardown, where the process
    # sometimes aborts in a C++ destructor (see _mismatch_worker; seen again here, fanin-srigl
    # in a full CI run)
    os._exit(0)


@pytest.mark.parametrize("pattern,method", CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_every_rank_decides_as_one_process_on_the_whole_batch(tmp_path, pattern, method):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), pattern, method),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
             for rank in range(WORLD)]
    model = _model(pattern)
    single = _train(model, model, slice(0, BATCH), method)
    assert int(single["moved"]) >= 2, "the run must cross structure updates"
    for name, expected in single.items():
        for state in ranks:
            if name.rsplit(".", 1)[-1] in ("offsets", "indices", "mask") or name == "moved":
                assert torch.equal(state[name], expected), f"{name} differs from one process"
            else:
                torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"


def _mismatch_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model("diag", seed=rank)  # a different random structure per rank
        # no DDP wrapper: the check is DST's own collective
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            sparsefx.DST(model, optimizer, method="rigl", total_steps=10)
        except ValueError as error:
            with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as file:
                file.write(str(error))
        dist.barrier()  # both ranks are done with collectives before the group goes away
    finally:
        dist.destroy_process_group()
    # This worker's whole result is its file. Its process sometimes died of SIGABRT at exit
    # ("terminate called without an active exception", from a C++ destructor after the
    # group was gone: about 1 full test run in 3, with or without DDP, never in isolation);
    # end it without running the interpreter's teardown.
    os._exit(0)


def test_ranks_with_different_structures_are_refused(tmp_path):
    mp.spawn(_mismatch_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "different structures" in message and "same seed" in message
