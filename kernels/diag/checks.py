"""Argument checks of the diagonal ops (the messages of ``checks.h``)."""
from __future__ import annotations

import torch

from .. import patterns
from .._checks import (check_activations, check_bias, check_float_operands,
                       check_structure_tensor, verify_once)


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
    check_activations(op, x_name, x)
    check_structure_tensor(op, "offsets", offsets, values.device, ndim=1)
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
    check_bias(op, bias, out_features)
    if structure:
        verify_once(op, offsets, patterns.check_diag_offsets, out_features, in_features)
