"""Results derived from a structure tensor (offsets, indices), kept until it changes.

A record is keyed by the tensor object (held weakly, so it dies with the tensor), its version
counter (bumped by every in-place write, DST updates included), its storage pointer, shape
and dtype, and what was derived. Writes that bypass the version counter (through ``.data`` or
a NumPy view) are not seen: replace the tensor, or write to it in place, instead.

While a CUDA graph is being captured (``torch.compile(mode="reduce-overhead")``), results
are built afresh and not kept: the kernels that build them are recorded into the graph, so
every replay derives them from the structure as it is then (DST writes it in place between
replays). ``verify_once``'s checks, which read the structure on the host, do not run then.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

# id(tensor) -> {key: (weak reference, stamp, result)}
_records: dict[int, dict[Any, tuple[weakref.ref, tuple, Any]]] = {}


def capturing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s work is being recorded into a CUDA graph right now."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def derived(tensor: torch.Tensor, key: Any, build: Callable[[], Any]) -> Any:
    """``build()``'s result for ``tensor`` as it is now, computed once per change (on every
    call while a CUDA graph is captured: see the module docstring)."""
    if capturing(tensor):
        return build()
    stamp = (tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
    tensor_id = id(tensor)
    entry = _records.get(tensor_id, {}).get(key)
    if entry is not None and entry[0]() is tensor and entry[1] == stamp:
        return entry[2]
    result = build()
    records = _records.get(tensor_id)
    if records is None or any(ref() is not tensor for ref, _, _ in records.values()):
        records = _records[tensor_id] = {}
    records[key] = (weakref.ref(tensor, lambda _: _records.pop(tensor_id, None)), stamp, result)
    return result
