"""Argument checks of the blocked-diagonal ops (the messages of ``checks.h``): the diagonal
ops' checks, then ``groups`` and whole cosets."""
from __future__ import annotations

import torch

from .. import patterns
from .._checks import verify_once
from ..diag.checks import check_diag


def check_blockdiag(op: str, x: torch.Tensor, x_name: str, values: torch.Tensor,
                    offsets: torch.Tensor, out_features: int, in_features: int, groups: int,
                    bias: torch.Tensor | None = None, structure: bool = True) -> None:
    """Checks shared by the blocked-diagonal op and its gradient ops."""
    check_diag(op, x, x_name, values, offsets, out_features, in_features, bias,
               structure=structure)
    try:
        patterns.check_blockdiag_groups(out_features, in_features, groups)
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    if structure:
        verify_once(op, offsets, patterns.check_blockdiag_offsets, out_features, in_features,
                    groups)
