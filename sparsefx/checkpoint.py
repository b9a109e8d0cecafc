"""Checkpoints of a training run, one file, written atomically.

    sparsefx.save_checkpoint("run/latest.pt", model=model, optimizer=optimizer, dst=dst,
                             scheduler=scheduler, step=step)
    ...                                   # killed at any point, even during that write
    extra = sparsefx.load_checkpoint("run/latest.pt", model=model, optimizer=optimizer,
                                     dst=dst, scheduler=scheduler)   # extra["step"]

Every object with a ``state_dict()`` is saved as its state dict and restored with its
``load_state_dict``; other values (a step, a data loader's position) are saved as they are
and returned by ``load_checkpoint``. The random states of the CPU and of CUDA go with them,
so dropout and anything else drawn from the global generators continues as if the run had
not stopped. The file is written beside its destination, synced, then renamed over it: a
kill during a write leaves the previous checkpoint whole.

Before anything is loaded, the model's sparse layers are checked against the checkpoint
(pattern, shapes, sparsity, a valid structure: ``check_state_dict``) and the DST manager
against its settings, so a checkpoint that does not fit raises a ``ValueError`` saying which
layer and what differs, and leaves the model, the optimizer and the manager untouched.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from sparsefx.layers.loading import check_before_loading, check_state_dict

__all__ = ["save_checkpoint", "load_checkpoint", "check_state_dict"]

FORMAT = 1
_RESERVED = ("format", "rng")


# a model pickled by sparsefx 0.1 holds its load pre-hook under this name
_check_before_loading = check_before_loading


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **objects) -> Path:
    """Write ``objects`` (state dicts of those that have one, the others as they are) and the
    random states to ``path`` atomically: a temporary file in the same folder, flushed and
    synced, then renamed over ``path``. Returns the path."""
    clash = [name for name in objects if name in _RESERVED]
    if clash:
        raise ValueError(f"sparsefx.save_checkpoint: {clash} are the checkpoint's own entries: "
                         "expected other names")
    state = {"format": FORMAT, "rng": _rng_state()}
    for name, value in objects.items():
        state[name] = value.state_dict() if hasattr(value, "state_dict") else value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def load_checkpoint(path: str | os.PathLike, **objects) -> dict:
    """Restore ``objects`` (each by ``load_state_dict``: modules first, then the others in
    the order given) and the random states from ``path``; returns the saved entries that
    were not given (``step``, ...). Everything is checked before anything is loaded."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"sparsefx.load_checkpoint: {path} is not a checkpoint written by "
                         "sparsefx.save_checkpoint")
    missing = [name for name in objects if name not in state]
    if missing:
        raise ValueError(f"sparsefx.load_checkpoint: {path} holds no {missing}: it holds "
                         f"{sorted(k for k in state if k not in _RESERVED)}")
    from sparsefx.dst import DST
    for name, value in objects.items():
        if isinstance(value, nn.Module):
            check_state_dict(value, state[name])
        elif isinstance(value, DST):
            value.check_state(state[name])
    ordered = sorted(objects.items(), key=lambda item: not isinstance(item[1], nn.Module))
    for name, value in ordered:
        value.load_state_dict(state[name])
    _set_rng_state(state["rng"])
    return {name: value for name, value in state.items()
            if name not in objects and name not in _RESERVED}
