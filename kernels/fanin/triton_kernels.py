"""Triton kernels for constant fan-in (and N:M) sparse linear layers (CUDA; also correct under
TRITON_INTERPRET=1).

Forward: grid (row blocks, output blocks); each program walks the fan_in slots of its outputs,
gathering one [BLOCK_ROWS, BLOCK_OUT] activation tile per slot into an fp32 accumulator.
Input gradient: the same grid, scattering with fp32 atomics into a zeroed buffer.
Values gradient: grid over blocks of stored entries, each reduced over the rows.
Ids outside [0, in_features) are masked off, so a bad structure can never read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_variants import Variant, pick_tile, signature

__all__ = ["fanin_forward", "fanin_input_grad", "fanin_values_grad", "launch_variants"]

# the launch choices (launch_variants lists every combination)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32)  # patterns.fanin_index_dtype; others become int32
ROW_TILES, OUTPUT_TILES, ENTRY_TILES = (16, 32), (64,), (128,)


@triton.jit
def _fanin_forward_kernel(
    x_ptr,            # [rows, in_features] activations, row-major
    values_ptr,       # [out, fan_in] stored weights
    indices_ptr,      # [out, fan_in] column ids of the stored weights
    y_ptr,            # [rows, out] result
    rows,             # activation rows (all leading dims flattened)
    out,              # output features
    fan_in,           # stored entries per output
    in_features,      # input features
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # activation rows per program
    BLOCK_OUT: tl.constexpr,   # outputs per program
):
    rows_block = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    outputs = tl.program_id(1).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows_block < rows
    output_ok = outputs < out
    acc = tl.zeros((BLOCK_ROWS, BLOCK_OUT), dtype=ACC_DTYPE)
    for j in range(fan_in):
        columns = tl.load(indices_ptr + outputs * fan_in + j, mask=output_ok, other=0).to(tl.int64)
        weights = tl.load(values_ptr + outputs * fan_in + j, mask=output_ok, other=0.0)
        valid = output_ok & (columns >= 0) & (columns < in_features)
        activations = tl.load(x_ptr + rows_block[:, None] * in_features + columns[None, :],
                              mask=row_ok[:, None] & valid[None, :], other=0.0)
        acc += activations.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows_block[:, None] * out + outputs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & output_ok[None, :])


@triton.jit
def _fanin_input_grad_kernel(
    grad_out_ptr,     # [rows, out] upstream gradient
    values_ptr,       # [out, fan_in] stored weights
    indices_ptr,      # [out, fan_in] column ids
    grad_x_ptr,       # [rows, in_features] fp32/fp64 accumulator, zeroed by the caller
    rows,
    out,
    fan_in,
    in_features,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    rows_block = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    outputs = tl.program_id(1).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows_block < rows
    output_ok = outputs < out
    grad = tl.load(grad_out_ptr + rows_block[:, None] * out + outputs[None, :],
                   mask=row_ok[:, None] & output_ok[None, :], other=0.0)
    grad = grad.to(grad_x_ptr.dtype.element_ty)
    for j in range(fan_in):
        columns = tl.load(indices_ptr + outputs * fan_in + j, mask=output_ok, other=0).to(tl.int64)
        weights = tl.load(values_ptr + outputs * fan_in + j, mask=output_ok, other=0.0)
        valid = output_ok & (columns >= 0) & (columns < in_features)
        tl.atomic_add(grad_x_ptr + rows_block[:, None] * in_features + columns[None, :],
                      grad * weights.to(grad_x_ptr.dtype.element_ty)[None, :],
                      mask=row_ok[:, None] & valid[None, :])


@triton.jit
def _fanin_values_grad_kernel(
    grad_out_ptr,     # [rows, out] upstream gradient
    x_ptr,            # [rows, in_features] activations
    indices_ptr,      # [out * fan_in] column ids, flattened
    grad_ptr,         # [out * fan_in] result, flattened
    rows,
    out,
    fan_in,
    in_features,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,     # rows reduced per loop iteration
    BLOCK_ENTRIES: tl.constexpr,  # stored entries per program
):
    entries = tl.program_id(0).to(tl.int64) * BLOCK_ENTRIES + tl.arange(0, BLOCK_ENTRIES)
    entry_ok = entries < out * fan_in
    outputs = entries // fan_in
    columns = tl.load(indices_ptr + entries, mask=entry_ok, other=0).to(tl.int64)
    valid = entry_ok & (columns >= 0) & (columns < in_features)
    acc = tl.zeros((BLOCK_ENTRIES,), dtype=ACC_DTYPE)
    for row0 in range(0, rows, BLOCK_ROWS):
        rows_block = row0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        mask = (rows_block < rows)[:, None] & valid[None, :]
        grad = tl.load(grad_out_ptr + rows_block[:, None] * out + outputs[None, :], mask=mask,
                       other=0.0)
        activations = tl.load(x_ptr + rows_block[:, None] * in_features + columns[None, :],
                              mask=mask, other=0.0)
        acc += tl.sum(grad.to(ACC_DTYPE) * activations.to(ACC_DTYPE), axis=0)
    tl.store(grad_ptr + entries, acc.to(grad_ptr.dtype.element_ty), mask=entry_ok)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ids(indices: torch.Tensor) -> torch.Tensor:
    return indices if indices.dtype in INDEX_DTYPES else indices.to(torch.int32)


def fanin_forward(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[:, o] = sum_j values[o, j] * x[:, indices[o, j]]``."""
    rows, in_features = x.shape
    num_out, fan_in = values.shape
    if out is None:
        out = x.new_empty(rows, num_out)
    if out.numel() == 0:
        return out
    block_rows, block_out = pick_tile(rows, ROW_TILES), pick_tile(num_out, OUTPUT_TILES)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(num_out, block_out))
    _fanin_forward_kernel[grid](x, values, _ids(indices), out, rows, num_out, fan_in, in_features,
                                ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_ROWS=block_rows,
                                BLOCK_OUT=block_out)
    return out


def fanin_input_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``dx = grad_out @ W`` for the fan-in ``W``: a scatter, accumulated in fp32 (fp64)."""
    rows, num_out = grad_out.shape
    fan_in = values.shape[1]
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_x = torch.zeros(rows, in_features, dtype=acc_dtype, device=grad_out.device)
    if rows == 0 or num_out == 0:
        return grad_x.to(grad_out.dtype)
    block_rows, block_out = pick_tile(rows, ROW_TILES), pick_tile(num_out, OUTPUT_TILES)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(num_out, block_out))
    _fanin_input_grad_kernel[grid](grad_out, values, _ids(indices), grad_x, rows, num_out, fan_in,
                                   in_features, BLOCK_ROWS=block_rows, BLOCK_OUT=block_out)
    return grad_x.to(grad_out.dtype)


def fanin_values_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad[o, j] = sum_rows grad_out[:, o] * x[:, indices[o, j]]``."""
    rows, in_features = x.shape
    num_out, fan_in = indices.shape
    if out is None:
        out = x.new_empty(num_out, fan_in)
    if out.numel() == 0:
        return out
    entries = num_out * fan_in
    block_entries = pick_tile(entries, ENTRY_TILES)
    grid = (triton.cdiv(entries, block_entries),)
    _fanin_values_grad_kernel[grid](grad_out, x, _ids(indices), out, rows, num_out, fan_in,
                                    in_features, ACC_DTYPE=_acc_dtype(x.dtype),
                                    BLOCK_ROWS=pick_tile(rows, ROW_TILES),
                                    BLOCK_ENTRIES=block_entries)
    return out


def launch_variants():
    """Every specialisation the launchers above can make (see ``..triton_variants``)."""
    for dtype in DTYPES:
        accumulator = torch.float64 if dtype == torch.float64 else torch.float32
        for index_dtype in INDEX_DTYPES:
            pointers = dict(x_ptr=dtype, values_ptr=dtype, y_ptr=dtype, grad_out_ptr=dtype,
                            grad_ptr=dtype, grad_x_ptr=accumulator, indices_ptr=index_dtype)
            for block_rows in ROW_TILES:
                for block_out in OUTPUT_TILES:
                    tiles = dict(BLOCK_ROWS=block_rows, BLOCK_OUT=block_out)
                    forward = dict(ACC_DTYPE=_acc_dtype(dtype), **tiles)
                    yield Variant(_fanin_forward_kernel,
                                  signature(_fanin_forward_kernel, pointers, forward), forward)
                    yield Variant(_fanin_input_grad_kernel,
                                  signature(_fanin_input_grad_kernel, pointers, tiles), tiles)
                for block_entries in ENTRY_TILES:
                    grad = dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK_ROWS=block_rows,
                                BLOCK_ENTRIES=block_entries)
                    yield Variant(_fanin_values_grad_kernel,
                                  signature(_fanin_values_grad_kernel, pointers, grad), grad)
