"""FSDP2 under the DST manager. With ``fully_shard`` a layer's trained weights, their
gradient and their optimizer state are DTensors sharded over the ranks, while its structure
(a buffer) is whole on every rank. A structure update works on whole tensors:
``whole_parameters`` gathers them for its duration and hands each rank its shard of the
result."""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor, nn

__all__ = ["is_sharded", "whole_parameters"]


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter, gradient or state sharded by FSDP2)."""
    # without the DTensor module imported (FSDP2 imports it) nothing is one; importing it
    # here would cost milliseconds on the first update of every run
    dtensors = sys.modules.get("torch.distributed.tensor")
    return dtensors is not None and isinstance(tensor, dtensors.DTensor)


def _whole(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _store_shard(sharded: Tensor, whole: Tensor) -> None:
    """Write this rank's shard of ``whole`` (the same on every rank) into ``sharded``."""
    from torch.distributed.tensor import distribute_tensor
    shard = distribute_tensor(whole, sharded.device_mesh, sharded.placements,
                              src_data_rank=None)  # each rank slices its own: no traffic
    sharded.to_local().copy_(shard.to_local())


@contextlib.contextmanager
def whole_parameters(modules: list[nn.Module], optimizer: torch.optim.Optimizer):
    """Inside, each of ``modules``' ``param`` that FSDP2 sharded is a plain parameter holding
    all of it, with its whole gradient and optimizer state (one all-gather each); on leaving
    normally, this rank's shard of what was written there goes back into the sharded
    parameter and state. A no-op for modules whose ``param`` is not sharded."""
    swapped = []
    try:
        for module in modules:
            sharded = module.param
            if not is_sharded(sharded):
                continue
            name = next(key for key, value in module._parameters.items() if value is sharded)
            whole = nn.Parameter(sharded.full_tensor(), requires_grad=sharded.requires_grad)
            if sharded.grad is not None:
                whole.grad = sharded.grad.full_tensor()
            if sharded in optimizer.state:
                optimizer.state[whole] = {key: _whole(value)
                                          for key, value in optimizer.state[sharded].items()}
            module._parameters[name] = whole
            swapped.append((module, name, sharded, whole))
        yield
        for _, _, sharded, whole in swapped:
            _store_shard(sharded.data, whole.detach())
            for key, value in optimizer.state.get(sharded, {}).items():
                if is_sharded(value):
                    _store_shard(value, optimizer.state[whole][key])
    finally:
        for module, name, sharded, whole in swapped:
            module._parameters[name] = sharded
            optimizer.state.pop(whole, None)
