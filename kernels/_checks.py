"""Argument checks every pattern's ops share (each pattern's own: its ``checks.py``).

Shape, dtype and device checks run on every call (fake tensors included, so a compiled
model fails at trace time with the same message). The value checks on the integer structure
(range, distinctness) read the data, so each structure tensor is checked once and then again
only after it changed (``_structure_cache``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import _structure_cache, patterns

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def verify_once(op: str, tensor: torch.Tensor, check: Callable[..., None], *args) -> None:
    """Run ``check(tensor, *args)`` unless it already passed for this tensor as it is now;
    its ``ValueError`` is re-raised with the op's name in front. Not while a CUDA graph is
    captured: reading the structure on the host would synchronise, which capture forbids
    (the eager warm-up runs before a capture have checked it)."""
    if _structure_cache.capturing(tensor):
        return
    try:
        _structure_cache.derived(tensor, (check, args), lambda: check(tensor, *args))
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None


def require_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} is a {type(value).__name__}: expected a torch.Tensor")


def check_float_operands(op: str, operands: dict[str, torch.Tensor | None]) -> None:
    """Every operand a tensor of one floating dtype on one device."""
    (first_name, first), *rest = [(n, t) for n, t in operands.items() if t is not None]
    require_tensor(op, first_name, first)
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {first_name}.dtype is {first.dtype}: expected one of "
                        "float16, bfloat16, float32, float64")
    for name, tensor in rest:
        require_tensor(op, name, tensor)
        if tensor.dtype != first.dtype:
            raise TypeError(f"{op}: {name}.dtype is {tensor.dtype}: expected {first.dtype}, "
                            f"the dtype of {first_name}")
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}: expected {first.device}, "
                             f"the device of {first_name}")


def check_structure_tensor(op: str, name: str, structure: torch.Tensor, device: torch.device,
                            ndim: int) -> None:
    require_tensor(op, name, structure)
    if not patterns.is_integer_dtype(structure.dtype):
        raise TypeError(f"{op}: {name}.dtype is {structure.dtype}: expected an integer dtype "
                        "(int32 or int64; int16/int8/uint8 also accepted)")
    if structure.device != device:
        raise ValueError(f"{op}: {name} is on {structure.device}: expected {device}, "
                         "the device of the values")
    if structure.dim() != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(structure.shape)}: expected "
                         f"{ndim} dimension{'s' if ndim > 1 else ''}")


def check_bias(op: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}: expected ({out_features},)")


def check_activations(op: str, name: str, x: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} is a 0-d tensor: expected shape [..., features]")


def check_rows_match(op: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    if tuple(grad_out.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: grad_out has leading dims {tuple(grad_out.shape[:-1])}: "
                         f"expected {tuple(x.shape[:-1])}, the leading dims of x")


def check_last_dim(op: str, name: str, tensor: torch.Tensor, expected: int, what: str) -> None:
    if tensor.shape[-1] != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}: expected last "
                         f"dimension {expected} ({what})")
