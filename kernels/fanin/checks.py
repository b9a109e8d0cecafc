"""Argument checks of the fan-in ops (the messages of ``checks.h``)."""
from __future__ import annotations

import torch

from .. import patterns
from .._checks import (check_activations, check_bias, check_float_operands,
                       check_structure_tensor, verify_once)


def check_fanin(op: str, x: torch.Tensor, x_name: str, values: torch.Tensor | None,
                indices: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                structure: bool = True) -> None:
    """Checks shared by the fan-in op and its gradient ops (the values-gradient op has no
    ``values`` operand: pass ``None`` and ``indices`` carries the shape)."""
    check_float_operands(op, {"values": values, x_name: x, "bias": bias})
    check_activations(op, x_name, x)
    device = x.device if values is None else values.device
    check_structure_tensor(op, "indices", indices, device, ndim=2)
    if values is not None:
        if values.dim() != 2:
            raise ValueError(f"{op}: values has shape {tuple(values.shape)}: expected [out, k]")
        if tuple(indices.shape) != tuple(values.shape):
            raise ValueError(f"{op}: indices has shape {tuple(indices.shape)}: expected "
                             f"{tuple(values.shape)}, the shape of values")
    if in_features < 1:
        raise ValueError(f"{op}: in_features = {in_features}: expected >= 1")
    num_out, fan_in = indices.shape
    if num_out < 1:
        raise ValueError(f"{op}: indices has shape {tuple(indices.shape)}: expected at least "
                         "one output row")
    if not 1 <= fan_in <= in_features:
        raise ValueError(f"{op}: each row holds k = {fan_in} entries: expected "
                         f"1 <= k <= in_features = {in_features}")
    check_bias(op, bias, num_out)
    if not structure:
        return
    try:
        verify_once(op, indices, patterns.check_fanin_indices, in_features)
    except ValueError as error:
        if x_name == "x" and f"{op}: indices[" in str(error):  # an id beyond x's width
            raise ValueError(f"{error}, in_features being the last dimension of x "
                             f"{tuple(x.shape)}") from None
        raise
