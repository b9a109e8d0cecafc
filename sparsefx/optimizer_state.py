"""An optimizer's per-parameter state, kept in step with a structure that changed in place:
the manager zeroes it for grown units and carries it across a resize; a method zeroes its
own optimizer's the same way."""
from __future__ import annotations

import torch

__all__ = ["zero_state", "carried_state"]


def zero_state(optimizer: torch.optim.Optimizer, param: torch.Tensor,
               where: torch.Tensor) -> None:
    """Zero every state tensor of ``optimizer`` shaped like ``param`` where ``where`` holds
    (momentum, exp_avg, exp_avg_sq, ...); scalar state (Adam's step) stays."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


def carried_state(state: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """An optimizer state tensor for the slots ``source`` (old slot, or -1: zero)."""
    moved = state.gather(1, source.clamp(min=0).to(state.device))
    return moved.masked_fill_(source.to(state.device) < 0, 0)
