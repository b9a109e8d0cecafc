"""A sparse model wrapped for several processes as DST expects it: DistributedDataParallel
(eager or compiled, either way round) or FSDP2 with each sparse layer its own unit.

    model = sparsefx.wrapping.wrap(sparse, "fsdp2")   # after init_process_group
    dst = sparsefx.DST(model, optimizer, total_steps=T)

The structure buffers are the same on every rank already (transform with the same seed), and
int16 fan-in ids cannot be broadcast by gloo or NCCL: DDP is built with
``broadcast_buffers=False``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from sparsefx.layers import SPARSE_LAYERS

__all__ = ["WRAPPINGS", "wrap", "shard"]

WRAPPINGS = ("ddp", "compile(ddp)", "ddp(compile)", "fsdp2", "compile(fsdp2)")


def wrap(model: nn.Module, wrapping: str) -> nn.Module:
    """``model`` as ``wrapping`` (one of ``WRAPPINGS``) says; DST takes the wrapper or
    ``model``."""
    ddp = dict(broadcast_buffers=False)
    # newer torch deprecates the flag, but its replacement still broadcasts at start
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
    if wrapping == "ddp":
        return nn.parallel.DistributedDataParallel(model, **ddp)
    if wrapping == "compile(ddp)":
        return torch.compile(nn.parallel.DistributedDataParallel(model, **ddp))
    if wrapping == "ddp(compile)":
        return nn.parallel.DistributedDataParallel(torch.compile(model), **ddp)
    if wrapping == "fsdp2":
        return shard(model)
    if wrapping == "compile(fsdp2)":
        return torch.compile(shard(model))
    raise ValueError(f"sparsefx.wrapping.wrap: wrapping={wrapping!r}: expected one of "
                     f"{WRAPPINGS}")


def shard(model: nn.Module, **options) -> nn.Module:
    """FSDP2 (``fully_shard``, given ``options``) on each sparse layer as its own unit, then
    on the rest of ``model``: an update gathers only the layers it writes."""
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, SPARSE_LAYERS):
            fully_shard(module, **options)
    return fully_shard(model, **options)
