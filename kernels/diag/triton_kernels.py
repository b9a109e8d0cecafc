"""Triton kernels for diagonal-sparse linear layers (CUDA; also correct under TRITON_INTERPRET=1).

Apply: grid (row blocks, position blocks); each program keeps a [BLOCK_ROWS, BLOCK_POS] fp32
accumulator and walks the K diagonals, loading one run of K values and one gathered
[BLOCK_ROWS, BLOCK_POS] tile of activations per diagonal: traffic is K*L values, never a dense W.
Values gradient: grid (K, position blocks); each program reduces over the rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_variants import Variant, pick_tile, signature

__all__ = ["diag_apply", "diag_values_grad", "launch_variants"]

# the launch choices (launch_variants lists every combination)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROW_TILES, POSITION_TILES = (16, 32), (32, 128)


@triton.jit
def _diag_apply_kernel(
    x_ptr,            # [rows, in_len] activations, row-major
    values_ptr,       # [num_diagonals, length] diagonal values
    offsets_ptr,      # [num_diagonals] diagonal offsets, any integer dtype
    y_ptr,            # [rows, out_len] result, written once per element
    rows,             # number of activation rows (all leading dims flattened)
    num_diagonals,    # K
    length,           # L = min(out, in): elements per diagonal
    mod,              # P = max(out, in): the wrap-around modulus
    in_len,           # row stride of x: mod when GATHER else length
    out_len,          # row stride of y: length when GATHER else mod
    GATHER: tl.constexpr,      # True: y[p] reads x[(p + off) % mod]; False: x[(p - off) % mod]
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # activation rows per program
    BLOCK_POS: tl.constexpr,   # output positions per program
):
    rows_block = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    positions = tl.program_id(1) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    row_ok = rows_block < rows
    position_ok = positions < out_len
    acc = tl.zeros((BLOCK_ROWS, BLOCK_POS), dtype=ACC_DTYPE)
    for k in range(num_diagonals):
        offset = tl.load(offsets_ptr + k).to(tl.int64)
        if GATHER:
            source = (positions + offset) % mod
            value_index = positions
            on_diagonal = position_ok
        else:
            source = (positions - offset + mod) % mod
            value_index = source
            on_diagonal = position_ok & (source < length)
        weights = tl.load(values_ptr + k * length + value_index, mask=on_diagonal, other=0.0)
        activations = tl.load(x_ptr + rows_block[:, None] * in_len + source[None, :],
                              mask=row_ok[:, None] & on_diagonal[None, :], other=0.0)
        acc += activations.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows_block[:, None] * out_len + positions[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & position_ok[None, :])


@triton.jit
def _diag_values_grad_kernel(
    a_ptr,            # [rows, length]: read at position t
    b_ptr,            # [rows, mod]: read at (t + offsets[k]) % mod
    offsets_ptr,      # [num_diagonals] diagonal offsets
    grad_ptr,         # [num_diagonals, length] result
    rows,             # rows to reduce over
    length,           # L
    mod,              # P
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # rows reduced per loop iteration
    BLOCK_POS: tl.constexpr,   # diagonal positions per program
):
    k = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    position_ok = positions < length
    source = (positions + tl.load(offsets_ptr + k).to(tl.int64)) % mod
    acc = tl.zeros((BLOCK_POS,), dtype=ACC_DTYPE)
    for row0 in range(0, rows, BLOCK_ROWS):
        rows_block = row0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        mask = (rows_block < rows)[:, None] & position_ok[None, :]
        a = tl.load(a_ptr + rows_block[:, None] * length + positions[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + rows_block[:, None] * mod + source[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(ACC_DTYPE) * b.to(ACC_DTYPE), axis=0)
    tl.store(grad_ptr + k * length + positions, acc.to(grad_ptr.dtype.element_ty),
             mask=position_ok)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32




def diag_apply(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mod: int,
               gather: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply diagonals to the rows of ``x`` (semantics of ``torch_kernels.diag_apply``)."""
    rows, length = x.shape[0], values.shape[1]
    in_len, out_len = (mod, length) if gather else (length, mod)
    if out is None:
        out = x.new_empty(rows, out_len)
    if rows == 0 or out_len == 0:
        return out.zero_()
    block_rows, block_pos = pick_tile(rows, ROW_TILES), pick_tile(out_len, POSITION_TILES)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(out_len, block_pos))
    _diag_apply_kernel[grid](x, values, offsets.to(torch.int64), out, rows, values.shape[0],
                             length, mod, in_len, out_len, GATHER=gather,
                             ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_ROWS=block_rows,
                             BLOCK_POS=block_pos)
    return out


def diag_values_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, mod: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad[k, t] = sum_rows a[:, t] * b[:, (t + offsets[k]) % mod]``."""
    rows, length = a.shape
    if out is None:
        out = a.new_empty(offsets.shape[0], length)
    if out.numel() == 0:
        return out
    block_pos = pick_tile(length, POSITION_TILES)
    grid = (offsets.shape[0], triton.cdiv(length, block_pos))
    _diag_values_grad_kernel[grid](a, b, offsets.to(torch.int64), out, rows, length, mod,
                                   ACC_DTYPE=_acc_dtype(a.dtype),
                                   BLOCK_ROWS=pick_tile(rows, ROW_TILES),
                                   BLOCK_POS=block_pos)
    return out


def launch_variants():
    """Every specialisation the launchers above can make (see ``..triton_variants``)."""
    for dtype in DTYPES:
        pointers = dict(x_ptr=dtype, values_ptr=dtype, y_ptr=dtype, a_ptr=dtype, b_ptr=dtype,
                        grad_ptr=dtype, offsets_ptr=torch.int64)
        for block_rows in ROW_TILES:
            for block_pos in POSITION_TILES:
                tiles = dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK_ROWS=block_rows,
                             BLOCK_POS=block_pos)
                for gather in (True, False):
                    constexprs = dict(GATHER=gather, **tiles)
                    yield Variant(_diag_apply_kernel,
                                  signature(_diag_apply_kernel, pointers, constexprs),
                                  constexprs)
                yield Variant(_diag_values_grad_kernel,
                              signature(_diag_values_grad_kernel, pointers, tiles), tiles)
