"""Data-parallel helpers for tensors: every rank must take the same structure decision, so
what decides (growth scores, DynaDiag's importance gradients) is averaged over the ranks,
and a structure that differs between ranks is refused. Without an initialised
``torch.distributed`` process group, each is a no-op. (FSDP2's sharded parameters are the
DST manager's business: ``sparsefx.fsdp``.)
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["world_size", "mean_over_ranks_", "differs_across_ranks"]


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    distributed = torch.distributed
    return (distributed.get_world_size()
            if distributed.is_available() and distributed.is_initialized() else 1)


def mean_over_ranks_(*tensors: Tensor) -> Tensor | None:
    """Replace each tensor (contiguous) by its mean over the ranks, in place; returns the
    last one (so ``mean_over_ranks_(a @ b)`` reads as an expression)."""
    world = world_size()
    for tensor in tensors if world > 1 else ():
        torch.distributed.all_reduce(tensor)
        tensor /= world
    return tensors[-1] if tensors else None


def differs_across_ranks(local: Tensor) -> Tensor:
    """``[n]`` bool: which entries of the float64 ``local [n]`` are not equal on every rank
    (one MIN and one MAX all-reduce)."""
    if world_size() == 1:
        return torch.zeros_like(local, dtype=torch.bool)
    smallest, largest = local.clone(), local.clone()
    torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return smallest != largest
