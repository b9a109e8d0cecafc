"""The blocked-diagonal ops' PyTorch kernels: the batched GEMMs of ``kernels.h`` written with
PyTorch ops, for where no compiler is available or ``SPARSEFX_CPU_KERNELS=torch`` asks for
them, and for CUDA tensors (``torch.bmm`` on cuBLAS) until the pattern has Triton kernels.
They compute in float32 (float64 stays float64); the caller upcasts fp16/bf16 and casts the
result back. Activations come in as 2-D ``[rows, features]``.
"""
from __future__ import annotations

import torch

from .. import _structure_cache, patterns

__all__ = ["blockdiag_forward", "blockdiag_input_grad", "blockdiag_values_grad"]


def _layout(offsets: torch.Tensor, out_features: int, in_features: int, groups: int):
    """``(position, columns)``: where each value (flat ``k * L + t``) sits in the stacked
    blocks ``[g, c * in/g, out/g]``, and the input columns ``[g, c * in/g]`` each block-row
    reads (kept coset after kept coset). Built once per structure version."""
    return _structure_cache.derived(
        offsets, ("blockdiag layout", out_features, in_features, groups),
        lambda: _build_layout(offsets, out_features, in_features, groups))


def _build_layout(offsets: torch.Tensor, out_features: int, in_features: int, groups: int):
    # device ops only, no host synchronisation (a CUDA graph records them): each kept coset
    # contributes exactly P / g offsets (checked), so the sorted residues hold each kept one
    # P / g times in a row
    offsets = offsets.to(torch.int64)
    residues = offsets % groups
    per_coset = patterns.diag_geometry(out_features, in_features)[0] // groups
    kept = torch.sort(residues).values[::per_coset].contiguous()
    slot = torch.searchsorted(kept, residues)
    rows, cols = patterns.diag_coordinates(offsets, out_features, in_features)
    out_block, in_block = out_features // groups, in_features // groups
    stacked = kept.numel() * in_block
    position = (((rows % groups) * stacked + slot[:, None] * in_block + cols // groups)
                * out_block + rows // groups)
    shift = groups - kept if out_features >= in_features else kept
    row_residues = torch.arange(groups, device=offsets.device)
    column_residue = (row_residues[:, None] + shift[None, :]) % groups
    steps = groups * torch.arange(in_block, device=offsets.device)
    columns = (column_residue[:, :, None] + steps).reshape(groups, stacked)
    return position.reshape(-1), columns


def _blocks(values: torch.Tensor, position: torch.Tensor, columns: torch.Tensor,
            out_block: int) -> torch.Tensor:
    blocks = values.new_empty(position.numel())
    blocks[position] = values.reshape(-1)
    return blocks.view(columns.shape[0], columns.shape[1], out_block)


def _gathered(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[g, rows, c * in/g]``: the columns of ``x`` each block-row reads."""
    return x[:, columns.reshape(-1)].view(x.shape[0], *columns.shape).transpose(0, 1)


def _by_residue(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """``[g, rows, out/g]``: column ``R + g i`` of ``rows`` at ``[R, :, i]``."""
    return rows.view(rows.shape[0], -1, groups).permute(2, 0, 1)


def blockdiag_forward(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                      out_features: int, groups: int) -> torch.Tensor:
    """``x @ W.T`` for the blocked-diagonal ``W`` (no bias)."""
    position, columns = _layout(offsets, out_features, x.shape[1], groups)
    blocks = _blocks(values, position, columns, out_features // groups)
    products = torch.bmm(_gathered(x, columns), blocks)  # [g, rows, out/g]
    return products.permute(1, 2, 0).reshape(x.shape[0], out_features)


def blockdiag_input_grad(grad_out: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                         in_features: int, groups: int) -> torch.Tensor:
    """``grad_out @ W``: each block-row's input columns, added back where they came from."""
    out_features = grad_out.shape[1]
    position, columns = _layout(offsets, out_features, in_features, groups)
    blocks = _blocks(values, position, columns, out_features // groups)
    grad_columns = torch.bmm(_by_residue(grad_out, groups), blocks.transpose(1, 2))
    grad_x = grad_out.new_zeros(grad_out.shape[0], in_features)
    return grad_x.index_add_(1, columns.reshape(-1),
                             grad_columns.transpose(0, 1).reshape(grad_out.shape[0], -1))


def blockdiag_values_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """Gradient of ``values[K, L]``: the blocks of ``grad_out.T @ x``, read at the values'
    positions."""
    out_features = grad_out.shape[1]
    position, columns = _layout(offsets, out_features, x.shape[1], groups)
    grad_blocks = torch.bmm(_gathered(x, columns).transpose(1, 2),
                            _by_residue(grad_out, groups))
    num_kept = offsets.numel()
    return grad_blocks.reshape(-1)[position].view(num_kept, -1)
