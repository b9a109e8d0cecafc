"""Triton kernels for constant fan-in (and N:M) sparse linear layers (CUDA; also correct under
TRITON_INTERPRET=1).

Forward: grid (row blocks, output blocks, splits of the fan-in slots); a program loads its
outputs' ids and values as [BLOCK_OUT, BLOCK_J] tiles, contiguous along each row of the
structure (16 bytes of int16 ids or bf16 values per row and step), gathers the matching
[BLOCK_ROWS, BLOCK_OUT, BLOCK_J] activations and reduces over j into an fp32 accumulator.
With few activation rows the slots are split across programs (``triton_runtime.
split_count``) writing fp32 partial sums, added once at the end. One activation row takes a
[1, 128, 8] tile, so no lane waits on masked-off rows.
Input gradient: the same tiles, scattering with fp32 atomics into a zeroed buffer.
Values gradient: grid over blocks of stored entries, each reduced over the rows.
Ids outside [0, in_features) are masked off, so a bad structure can never read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_runtime import (SINGLE_ROW, Split, Variant, accumulator_dtype, launch, pick_tile,
                               rows_bucket, signature, split_count, warp_choices)

__all__ = ["fanin_forward", "fanin_input_grad", "fanin_values_grad", "launch_variants"]

# the launch choices (launch_variants lists every combination)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32)  # patterns.fanin_index_dtype; others become int32
# (rows, outputs, slots) per program: one activation row, or a block of them
SINGLE_ROW_TILE, ROWS_TILE = (1, 128, 8), (16, 32, 8)
ROW_TILES, ENTRY_TILES = (16, 32), (128,)  # the values gradient
MIN_SLOTS_PER_SPLIT = 32


@triton.jit
def _slots(indices_ptr, values_ptr, read_out, j, j_ok, fan_in, in_features):
    """``(columns, weights, valid)`` of the slots ``j`` of the outputs ``read_out``: int32
    ids (0 where invalid), weights and whether each id is in range."""
    entry = read_out[:, None] * fan_in + j[None, :]
    columns = tl.load(indices_ptr + entry, mask=j_ok[None, :], other=0).to(tl.int32)
    weights = tl.load(values_ptr + entry, mask=j_ok[None, :], other=0.0)
    valid = j_ok[None, :] & (columns >= 0) & (columns < in_features)
    return tl.where(valid, columns, 0), weights, valid


@triton.jit
def _fanin_forward_kernel(
    x_ptr,            # [rows, in_features] activations, row-major
    values_ptr,       # [out, fan_in] stored weights
    indices_ptr,      # [out, fan_in] column ids of the stored weights
    y_ptr,            # [rows, out] result; SPLIT: [splits, rows, out] partial sums
    rows,             # activation rows (all leading dims flattened)
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    out,              # output features
    fan_in,           # stored entries per output
    in_features,      # input features
    per_split,        # fan-in slots per program along axis 2
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # activation rows per program
    BLOCK_OUT: tl.constexpr,   # outputs per program
    BLOCK_J: tl.constexpr,     # fan-in slots per step
    SPLIT: tl.constexpr,       # the slots split over axis 2: write partial sums
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    x_ptr += row0 * in_features  # int64 once; the offsets inside the tile are int32
    local_rows = tl.arange(0, BLOCK_ROWS)
    row_ok = local_rows < rows - row0
    read_rows = tl.minimum(local_rows, rows - row0 - 1).to(tl.int32)
    outputs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    output_ok = outputs < out
    read_out = tl.minimum(outputs, out - 1)
    first = tl.program_id(2) * per_split
    last = tl.minimum(first + per_split, fan_in)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_OUT), dtype=ACC_DTYPE)
    for j0 in range(first, last, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        columns, weights, valid = _slots(indices_ptr, values_ptr, read_out, j, j < last, fan_in,
                                         in_features)
        activations = tl.load(x_ptr + (read_rows[:, None, None] * in_features
                                       + columns[None, :, :]),
                              mask=valid[None, :, :], other=0.0)
        acc += tl.sum(activations.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[None, :, :], axis=2)
    y_ptr += row0 * out
    if SPLIT:
        y_ptr += tl.program_id(2).to(tl.int64) * rows * out
    tl.store(y_ptr + (local_rows[:, None] * out + outputs[None, :]),
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & output_ok[None, :])


@triton.jit
def _fanin_input_grad_kernel(
    grad_out_ptr,     # [rows, out] upstream gradient
    values_ptr,       # [out, fan_in] stored weights
    indices_ptr,      # [out, fan_in] column ids
    grad_x_ptr,       # [rows, in_features] fp32/fp64 accumulator, zeroed by the caller
    rows,
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    out,
    fan_in,
    in_features,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    grad_out_ptr += row0 * out
    grad_x_ptr += row0 * in_features
    local_rows = tl.arange(0, BLOCK_ROWS)
    row_ok = local_rows < rows - row0
    outputs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    output_ok = outputs < out
    read_out = tl.minimum(outputs, out - 1)
    grad = tl.load(grad_out_ptr + (local_rows[:, None] * out + outputs[None, :]),
                   mask=row_ok[:, None] & output_ok[None, :], other=0.0)
    grad = grad.to(grad_x_ptr.dtype.element_ty)
    for j0 in range(0, fan_in, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        columns, weights, valid = _slots(indices_ptr, values_ptr, read_out, j, j < fan_in,
                                         fan_in, in_features)
        valid = valid & output_ok[:, None]
        tl.atomic_add(grad_x_ptr + (local_rows[:, None, None] * in_features
                                    + columns[None, :, :]),
                      grad[:, :, None] * weights.to(grad_x_ptr.dtype.element_ty)[None, :, :],
                      mask=row_ok[:, None, None] & valid[None, :, :])


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


def _values_grad_warps(block_rows: int, block_entries: int) -> int:
    """8 warps for the 32x128 tile: at 4, Triton 3.6 spills its 16-bit variants on sm_80 (168
    registers: two 32-element loads per thread, each with 64-bit addresses)."""
    return 8 if block_rows * block_entries >= 4096 else 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ids(indices: torch.Tensor) -> torch.Tensor:
    return indices if indices.dtype in INDEX_DTYPES else indices.to(torch.int32)


def _tile(rows: int) -> tuple[int, int, int]:
    return SINGLE_ROW_TILE if rows == 1 else ROWS_TILE


def _warps(block_rows: int, block_out: int, block_j: int) -> tuple[int, ...]:
    return warp_choices(block_rows * block_out * block_j)


# what the autotuners time once: the tile and the shape (the split, for the forward)
_KEY = ("rows_key", "out", "fan_in", "in_features", "BLOCK_ROWS")


def fanin_forward(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  out: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """``y[:, o] = sum_j values[o, j] * x[:, indices[o, j]]``. ``splits``: how many programs
    share an output tile's slots (default ``split_count``)."""
    rows, in_features = x.shape
    num_out, fan_in = values.shape
    if out is None:
        out = x.new_empty(rows, num_out)
    if out.numel() == 0:
        return out
    block_rows, block_out, block_j = _tile(rows)
    tiles = (triton.cdiv(rows, block_rows), triton.cdiv(num_out, block_out))
    if splits is None:
        splits = split_count(tiles[0] * tiles[1], fan_in, MIN_SLOTS_PER_SPLIT, x.device)
    split = Split.plan(splits, fan_in, block_j, out)
    launch(_fanin_forward_kernel, (*tiles, split.count),
           x, values, _ids(indices), split.target, rows, rows_bucket(rows), num_out, fan_in,
           in_features, split.per_split, warps=_warps(block_rows, block_out, block_j),
           key=_KEY + ("per_split", "SPLIT"), ACC_DTYPE=_acc_dtype(x.dtype),
           BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, BLOCK_J=block_j, SPLIT=split.count > 1)
    return split.finish(out)


def fanin_input_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``dx = grad_out @ W`` for the fan-in ``W``: a scatter, accumulated in fp32 (fp64)."""
    rows, num_out = grad_out.shape
    fan_in = values.shape[1]
    grad_x = torch.zeros(rows, in_features, dtype=accumulator_dtype(grad_out.dtype),
                         device=grad_out.device)
    if rows == 0 or num_out == 0:
        return grad_x.to(grad_out.dtype)
    block_rows, block_out, block_j = _tile(rows)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(num_out, block_out))
    launch(_fanin_input_grad_kernel, grid, grad_out, values, _ids(indices), grad_x, rows,
           rows_bucket(rows), num_out, fan_in, in_features,
           warps=_warps(block_rows, block_out, block_j), key=_KEY,
           reset_to_zero=("grad_x_ptr",),  # the kernel adds into it
           BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, BLOCK_J=block_j)
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
    block_rows = pick_tile(rows, ROW_TILES)
    grid = (triton.cdiv(entries, block_entries),)
    _fanin_values_grad_kernel[grid](grad_out, x, _ids(indices), out, rows, num_out, fan_in,
                                    in_features, ACC_DTYPE=_acc_dtype(x.dtype),
                                    BLOCK_ROWS=block_rows, BLOCK_ENTRIES=block_entries,
                                    num_warps=_values_grad_warps(block_rows, block_entries))
    return out


def launch_variants():
    """Every specialisation the launchers above can make (see ``..triton_variants``)."""
    for dtype in DTYPES:
        accumulator = accumulator_dtype(dtype)
        for index_dtype in INDEX_DTYPES:
            pointers = dict(x_ptr=dtype, values_ptr=dtype, y_ptr=dtype, grad_out_ptr=dtype,
                            grad_ptr=dtype, grad_x_ptr=accumulator, indices_ptr=index_dtype)
            for block_rows, block_out, block_j in (SINGLE_ROW_TILE, ROWS_TILE):
                tiles = dict(BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, BLOCK_J=block_j)
                ones = SINGLE_ROW if block_rows == 1 else ()  # the launcher's rows == 1
                for warps in _warps(block_rows, block_out, block_j):
                    for split in (False, True):  # split: partial sums in fp32 (fp64)
                        forward = dict(ACC_DTYPE=_acc_dtype(dtype), SPLIT=split, **tiles)
                        typed = dict(pointers, y_ptr=accumulator if split else dtype)
                        yield Variant(_fanin_forward_kernel,
                                      signature(_fanin_forward_kernel, typed, forward), forward,
                                      num_warps=warps, ones=ones)
                    yield Variant(_fanin_input_grad_kernel,
                                  signature(_fanin_input_grad_kernel, pointers, tiles), tiles,
                                  num_warps=warps, ones=ones)
            for block_rows in ROW_TILES:
                for block_entries in ENTRY_TILES:
                    grad = dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK_ROWS=block_rows,
                                BLOCK_ENTRIES=block_entries)
                    yield Variant(_fanin_values_grad_kernel,
                                  signature(_fanin_values_grad_kernel, pointers, grad), grad,
                                  num_warps=_values_grad_warps(block_rows, block_entries))
