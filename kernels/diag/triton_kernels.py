"""Triton kernels for diagonal-sparse linear layers (CUDA; also correct under TRITON_INTERPRET=1).

Apply: grid (row blocks, position blocks, splits of the diagonals); each program keeps a
[BLOCK_ROWS, BLOCK_POS] accumulator (fp32; fp64 for float64) and walks its share of the K
diagonals, loading one run of values and one shifted [BLOCK_ROWS, BLOCK_POS] tile of
activations per diagonal: traffic is K*L values, never a dense W. A diagonal that does not
wrap inside the tile reads one contiguous run (the gather form's values then load 16 bytes at
a time); one that does takes an add and a compare-and-subtract in int32 (no modulo in the
loop). With few rows the
position blocks alone leave most of a GPU idle, so the diagonals are split across programs
(``triton_runtime.split_count``) that write fp32 partial sums, added once at the end;
every SM then streams its share of the values.
Values gradient: grid (K, position blocks); each program reduces over the rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_runtime import (SINGLE_ROW, Split, Variant, accumulator_dtype, launch, pick_tile,
                               rows_bucket, signature, split_count, warp_choices)

__all__ = ["diag_apply", "diag_values_grad", "launch_variants"]

# the launch choices (launch_variants lists every combination)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROW_TILES, POSITION_TILES = (16, 32), (32, 128)
# one activation row: a [1, BLOCK_POS] tile, wide enough that each thread loads 16 bytes of
# values (a 16-row tile would leave 15 of 16 lanes masked off at batch 1)
SINGLE_ROW_POSITION_TILES = (128, 1024)
MIN_DIAGONALS_PER_SPLIT = 8


@triton.jit
def _wrapped(index, mod):
    """``index mod mod`` for ``index`` in ``[-mod, 2 mod)``, without a division."""
    index = tl.where(index >= mod, index - mod, index)
    return tl.where(index < 0, index + mod, index)


@triton.jit
def _diagonal_step(acc, values_row, x_tile, source, positions, position_ok, length,
                   GATHER: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``acc`` plus one diagonal: output position p reads activation ``source[p]``; the
    value is at p (gather form) or at the source (scatter form, on the diagonal while the
    source is below ``length``)."""
    if GATHER:
        value_index = positions
        on_diagonal = position_ok
    else:
        value_index = source
        on_diagonal = position_ok & (source < length)
    weights = tl.load(values_row + value_index, mask=on_diagonal, other=0.0)
    activations = tl.load(x_tile + source[None, :], mask=on_diagonal[None, :], other=0.0)
    return acc + activations.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[None, :]


@triton.jit
def _diag_apply_kernel(
    x_ptr,            # [rows, in_len] activations, row-major
    values_ptr,       # [num_diagonals, length] diagonal values
    offsets_ptr,      # [num_diagonals] int64 diagonal offsets in [0, mod)
    y_ptr,            # [rows, out_len] result; SPLIT: [splits, rows, out_len] fp32 partials
    rows,             # number of activation rows (all leading dims flattened)
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    num_diagonals,    # K
    length,           # L = min(out, in): elements per diagonal
    mod,              # P = max(out, in): the wrap-around modulus (< 2**31)
    in_len,           # row stride of x: mod when GATHER else length
    out_len,          # row stride of y: length when GATHER else mod
    per_split,        # diagonals per program along axis 2
    GATHER: tl.constexpr,      # True: y[p] reads x[(p + off) % mod]; False: x[(p - off) % mod]
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # activation rows per program
    BLOCK_POS: tl.constexpr,   # output positions per program
    SPLIT: tl.constexpr,       # the diagonals split over axis 2: write partial sums
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    x_ptr += row0 * in_len  # int64 once; the offsets inside the tile are int32
    local_rows = tl.arange(0, BLOCK_ROWS)
    row_ok = local_rows < rows - row0
    read_rows = tl.minimum(local_rows, rows - row0 - 1).to(tl.int32)  # loads need no row mask
    p0 = tl.program_id(1) * BLOCK_POS
    lanes = tl.arange(0, BLOCK_POS)
    positions = p0 + lanes
    position_ok = positions < out_len
    first = tl.program_id(2) * per_split
    last = tl.minimum(first + per_split, num_diagonals)
    x_rows = read_rows[:, None] * in_len
    values_row = values_ptr + first.to(tl.int64) * length  # diagonal k's run, k = first...
    acc = tl.zeros((BLOCK_ROWS, BLOCK_POS), dtype=ACC_DTYPE)
    for k in range(first, last):
        offset = tl.load(offsets_ptr + k).to(tl.int32)
        # the tile's first source, and whether the diagonal wraps inside the tile: when it
        # does not (nearly always), the sources are one contiguous run, which the loads can
        # read 16 bytes at a time
        start = p0 + offset if GATHER else p0 - offset
        start = tl.where(start >= mod, start - mod, tl.where(start < 0, start + mod, start))
        if start + BLOCK_POS <= mod:
            source = start + lanes
            acc = _diagonal_step(acc, values_row, x_ptr + x_rows, source, positions,
                                 position_ok, length, GATHER, ACC_DTYPE)
        else:
            source = _wrapped(positions + offset if GATHER else positions - offset, mod)
            acc = _diagonal_step(acc, values_row, x_ptr + x_rows, source, positions,
                                 position_ok, length, GATHER, ACC_DTYPE)
        values_row += length
    y_ptr += row0 * out_len
    if SPLIT:
        y_ptr += tl.program_id(2).to(tl.int64) * rows * out_len
    tl.store(y_ptr + (local_rows[:, None] * out_len + positions[None, :]),
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & position_ok[None, :])


@triton.jit
def _diag_values_grad_kernel(
    a_ptr,            # [rows, length]: read at position t
    b_ptr,            # [rows, mod]: read at (t + offsets[k]) % mod
    offsets_ptr,      # [num_diagonals] int64 diagonal offsets in [0, mod)
    grad_ptr,         # [num_diagonals, length] result
    rows,             # rows to reduce over
    length,           # L
    mod,              # P
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
    BLOCK_ROWS: tl.constexpr,  # rows reduced per loop iteration
    BLOCK_POS: tl.constexpr,   # diagonal positions per program
):
    k = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    position_ok = positions < length
    source = _wrapped(positions + tl.load(offsets_ptr + k).to(tl.int32), mod)
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


def _apply_warps(block_rows: int, block_pos: int) -> tuple[int, ...]:
    """The autotune set of warps for a tile: only 8 for 32 x 128 tiles (with 4, ptxas spilled
    the fp16 scatter form on sm_90: triton_variants)."""
    return (8,) if block_rows * block_pos >= 4096 else warp_choices(block_rows * block_pos)


# what the apply's autotuner times once: the tile, the shape and the form
_APPLY_KEY = ("rows_key", "num_diagonals", "length", "mod", "per_split", "GATHER", "BLOCK_ROWS",
              "BLOCK_POS", "SPLIT")


def _apply_tile(rows: int, out_len: int) -> tuple[int, int]:
    if rows == 1:
        return 1, pick_tile(out_len, SINGLE_ROW_POSITION_TILES)
    return pick_tile(rows, ROW_TILES), pick_tile(out_len, POSITION_TILES)


def diag_apply(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mod: int,
               gather: bool, out: torch.Tensor | None = None,
               splits: int | None = None) -> torch.Tensor:
    """Apply diagonals to the rows of ``x`` (semantics of ``torch_kernels.diag_apply``).
    ``splits``: how many programs share a tile's diagonals (default ``split_count``)."""
    rows, length = x.shape[0], values.shape[1]
    num_diagonals = values.shape[0]
    in_len, out_len = (mod, length) if gather else (length, mod)
    if out is None:
        out = x.new_empty(rows, out_len)
    if rows == 0 or out_len == 0:
        return out.zero_()
    block_rows, block_pos = _apply_tile(rows, out_len)
    tiles = (triton.cdiv(rows, block_rows), triton.cdiv(out_len, block_pos))
    if splits is None:
        splits = split_count(tiles[0] * tiles[1], num_diagonals, MIN_DIAGONALS_PER_SPLIT,
                             x.device)
    split = Split.plan(splits, num_diagonals, 1, out)
    launch(_diag_apply_kernel, (*tiles, split.count),
           x, values, offsets.to(torch.int64), split.target, rows, rows_bucket(rows),
           num_diagonals, length, mod, in_len, out_len, split.per_split,
           warps=_apply_warps(block_rows, block_pos), key=_APPLY_KEY, GATHER=gather,
           ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_ROWS=block_rows, BLOCK_POS=block_pos,
           SPLIT=split.count > 1)
    return split.finish(out)


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
    apply_tiles = [(1, pos) for pos in SINGLE_ROW_POSITION_TILES] + [
        (rows, pos) for rows in ROW_TILES for pos in POSITION_TILES]
    for dtype in DTYPES:
        partials = accumulator_dtype(dtype)
        pointers = dict(x_ptr=dtype, values_ptr=dtype, y_ptr=dtype, a_ptr=dtype, b_ptr=dtype,
                        grad_ptr=dtype, offsets_ptr=torch.int64)
        for block_rows, block_pos in apply_tiles:
            for gather in (True, False):
                for split in (False, True):  # split: partial sums in fp32 (fp64)
                    constexprs = dict(GATHER=gather, ACC_DTYPE=_acc_dtype(dtype),
                                      BLOCK_ROWS=block_rows, BLOCK_POS=block_pos, SPLIT=split)
                    typed = dict(pointers, y_ptr=partials if split else dtype)
                    for warps in _apply_warps(block_rows, block_pos):
                        yield Variant(_diag_apply_kernel,
                                      signature(_diag_apply_kernel, typed, constexprs),
                                      constexprs, num_warps=warps,
                                      ones=SINGLE_ROW if block_rows == 1 else ())
        for block_rows in ROW_TILES:
            for block_pos in POSITION_TILES:
                constexprs = dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK_ROWS=block_rows,
                                  BLOCK_POS=block_pos)
                yield Variant(_diag_values_grad_kernel,
                              signature(_diag_values_grad_kernel, pointers, constexprs),
                              constexprs)
