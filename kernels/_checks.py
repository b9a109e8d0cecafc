"""Argument checks for the sparse linear ops.

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


def _verify_once(op: str, tensor: torch.Tensor, check: Callable[..., None], *args) -> None:
    """Run ``check(tensor, *args)`` unless it already passed for this tensor as it is now;
    its ``ValueError`` is re-raised with the op's name in front."""
    try:
        _structure_cache.derived(tensor, (check, args), lambda: check(tensor, *args))
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None


def _require_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} is a {type(value).__name__}: expected a torch.Tensor")


def check_float_operands(op: str, operands: dict[str, torch.Tensor | None]) -> None:
    """Every operand a tensor of one floating dtype on one device."""
    (first_name, first), *rest = [(n, t) for n, t in operands.items() if t is not None]
    _require_tensor(op, first_name, first)
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {first_name}.dtype is {first.dtype}: expected one of "
                        "float16, bfloat16, float32, float64")
    for name, tensor in rest:
        _require_tensor(op, name, tensor)
        if tensor.dtype != first.dtype:
            raise TypeError(f"{op}: {name}.dtype is {tensor.dtype}: expected {first.dtype}, "
                            f"the dtype of {first_name}")
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}: expected {first.device}, "
                             f"the device of {first_name}")


def _check_structure_tensor(op: str, name: str, structure: torch.Tensor, device: torch.device,
                            ndim: int) -> None:
    _require_tensor(op, name, structure)
    if not patterns.is_integer_dtype(structure.dtype):
        raise TypeError(f"{op}: {name}.dtype is {structure.dtype}: expected an integer dtype "
                        "(int32 or int64; int16/int8/uint8 also accepted)")
    if structure.device != device:
        raise ValueError(f"{op}: {name} is on {structure.device}: expected {device}, "
                         "the device of the values")
    if structure.dim() != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(structure.shape)}: expected "
                         f"{ndim} dimension{'s' if ndim > 1 else ''}")


def _check_bias(op: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}: expected ({out_features},)")


def _check_activations(op: str, name: str, x: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} is a 0-d tensor: expected shape [..., features]")


# ------------------------------------------------------------------------------------ diag


def _blame_input_width(op: str, x: torch.Tensor, values: torch.Tensor, out_features: int):
    """The values ``[K, L]`` fit a layer of ``out_features`` outputs, but not one as wide as
    ``x``: the input has the wrong width (it sets ``in_features``), not the layer."""
    stored = values.shape[1]
    if stored < out_features:
        raise ValueError(
            f"{op}: x has shape {tuple(x.shape)}: expected last dimension {stored} (in_features: "
            f"values {tuple(values.shape)} hold diagonals of length L = min(out_features, "
            f"in_features) = {stored} < out_features = {out_features})")
    raise ValueError(
        f"{op}: x has shape {tuple(x.shape)}: expected last dimension >= {out_features} "
        f"(in_features: values {tuple(values.shape)} hold diagonals of length L = "
        f"min(out_features, in_features) = out_features = {out_features})")



def check_diag(op: str, x: torch.Tensor, x_name: str, values: torch.Tensor,
               offsets: torch.Tensor, out_features: int, in_features: int,
               bias: torch.Tensor | None = None, structure: bool = True) -> None:
    """Checks shared by the diagonal op and its gradient ops (``x`` is the op's activation
    operand: the input, or the output gradient)."""
    check_float_operands(op, {"values": values, x_name: x, "bias": bias})
    _check_activations(op, x_name, x)
    _check_structure_tensor(op, "offsets", offsets, values.device, ndim=1)
    if (not isinstance(out_features, (int, torch.SymInt)) or isinstance(out_features, bool)
            or out_features < 1):
        raise ValueError(f"{op}: out_features={out_features!r}: expected an int >= 1")
    if in_features < 1:
        raise ValueError(f"{op}: in_features = {in_features}: expected >= 1")
    num_candidates, length = patterns.diag_geometry(out_features, in_features)
    if (x_name == "x" and values.dim() == 2 and values.shape[1] != length
            and 1 <= values.shape[1] <= out_features):
        _blame_input_width(op, x, values, out_features)
    if values.dim() != 2 or values.shape[1] != length:
        raise ValueError(
            f"{op}: values has shape {tuple(values.shape)}: expected [K, L] with L = "
            f"min(out_features, in_features) = min({out_features}, {in_features}) = {length}")
    num_kept = values.shape[0]
    if offsets.shape[0] != num_kept:
        raise ValueError(f"{op}: offsets has {offsets.shape[0]} entries: expected K = "
                         f"{num_kept}, one per row of values")
    if not 1 <= num_kept <= num_candidates:
        raise ValueError(f"{op}: values holds K = {num_kept} diagonals: expected 1 <= K <= P = "
                         f"max(out_features, in_features) = {num_candidates}")
    _check_bias(op, bias, out_features)
    if structure:
        _verify_once(op, offsets, patterns.check_diag_offsets, out_features, in_features)


# ----------------------------------------------------------------------------------- fanin


def check_fanin(op: str, x: torch.Tensor, x_name: str, values: torch.Tensor | None,
                indices: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                structure: bool = True) -> None:
    """Checks shared by the fan-in op and its gradient ops (the values-gradient op has no
    ``values`` operand: pass ``None`` and ``indices`` carries the shape)."""
    check_float_operands(op, {"values": values, x_name: x, "bias": bias})
    _check_activations(op, x_name, x)
    device = x.device if values is None else values.device
    _check_structure_tensor(op, "indices", indices, device, ndim=2)
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
    _check_bias(op, bias, num_out)
    if not structure:
        return
    try:
        _verify_once(op, indices, patterns.check_fanin_indices, in_features)
    except ValueError as error:
        if x_name == "x" and f"{op}: indices[" in str(error):  # an id beyond x's width
            raise ValueError(f"{error}, in_features being the last dimension of x "
                             f"{tuple(x.shape)}") from None
        raise
