"""Triton kernels for blocked-diagonal linear layers: tensor-core GEMMs over the ``b x b``
blocks (CUDA; also correct under TRITON_INTERPRET=1).

Rows and columns grouped by residue mod ``g`` (``patterns.blockdiag_block_shifts``), the
weight is ``c`` dense ``(out/g) x (in/g)`` blocks per block-row ``R``, in block-columns
``T_j(R)``. Per call the activations are regrouped once, ``xp[rows, g, in/g]`` (column
``T + g b`` at ``[:, T, b]``), and the values laid out as ``blocks[g, c * in/g, out/g]``
(``torch_kernels._layout``, built once per structure version); then

- forward: grid (row tiles, output tiles, ``g``); a program adds ``tl.dot(xp[:, T_j(R)],
  blocks[R, j])`` over its ``c`` blocks and the ``in/g`` columns of each, into an fp32
  accumulator; ``yp[rows, g, out/g]`` is regrouped into ``y``;
- input gradient: grid (row tiles, input tiles, ``g``); block-column ``T`` adds
  ``gyp[:, R] @ blocks[R, j].T`` over the ``c`` block-rows ``R`` whose block ``j`` sits in it;
- values gradient: grid (input tiles, output tiles, ``g c``); block ``(R, j)`` is
  ``xp[:, T_j(R)].T @ gyp[:, R]``, reduced over the rows in tiles.

Every block is read whole by ``tl.dot`` (16 x 16 x 16 at least), so there is no modulo and
no gather in the inner loops. On a GPU the tiles and warps come from a small autotune set
(``_configs``) keyed on the rows bucket and the block sides. Under the interpreter the tiles
are upcast to fp32 before ``tl.dot`` (numpy has no bf16). Below ``BLOCKED_MIN_ROWS``
activation rows, and for float64, the calls go to the diagonal kernels, whose semantics these
share.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..diag import triton_kernels as diag_triton
from ..triton_runtime import (INTERPRETED, NUM_STAGES, Variant, autotune_bench, rows_bucket,
                               signature)
from . import torch_kernels

__all__ = ["blockdiag_forward", "blockdiag_input_grad", "blockdiag_values_grad",
           "BLOCKED_MIN_ROWS", "launch_variants"]

BLOCKED_MIN_ROWS = 16  # a tl.dot tile is 16 rows at least: fewer rows go to the diag kernels
# the launch choices (launch_variants lists every combination)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64: the diag kernels
PRECISIONS = {torch.float16: ("ieee",), torch.bfloat16: ("ieee",),
              torch.float32: ("ieee", "tf32")}
# tile sides: 16 for sides up to 32, else the dtype's large tile (fp32 operands hold twice
# the bytes: 64-wide fp32 tiles spilled on sm_80, seen with triton_variants)
SMALL_TILE = 16
LARGE_TILE = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}


# Offsets inside a tile are int32 and the pointer tiles are built once per block and advanced
# along k: the activation rows a program starts at move its base pointer, in int64, once;
# the edges are clamped, so only the k tail is masked. (int64 tile offsets rebuilt every step,
# with masks on every side, spilled: 255 registers and a stack frame, seen with
# triton_variants.)


@triton.jit
def _clamped(index, count):
    """``index`` held below ``count`` (>= 1): lanes past the edge read the last row or column
    again, so the loads need no mask on that side; the store masks them off."""
    return tl.minimum(index, count - 1).to(tl.int32)


@triton.jit
def _dot(acc, a_ptrs, b_ptrs, a_mask, b_mask, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` for the tiles at ``a_ptrs`` and ``b_ptrs`` (zero where masked)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _blockdiag_forward_kernel(
    xp_ptr,           # [rows, g, in/g] activations grouped by column residue
    blocks_ptr,       # [g, c * in/g, out/g] the kept blocks, block-row by block-row
    column_ptr,       # [g, c] int32: block-column T_j(R) of block-row R's j-th block
    yp_ptr,           # [rows, g, out/g] result grouped by row residue
    rows, groups, cosets, in_block, out_block,
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,   # tl.dot's input_precision: "ieee", or "tf32" for fp32 operands
    UPCAST: tl.constexpr,      # the interpreter: fp32 tiles into tl.dot
):
    block_row = tl.program_id(2)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    xp_ptr += row0 * groups * in_block
    yp_ptr += row0 * groups * out_block
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < rows - row0, n < out_block
    m_in, n_in = _clamped(m, rows - row0), _clamped(n, out_block)  # (loads need no mask)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(cosets):
        block_column = tl.load(column_ptr + block_row * cosets + j)
        a_ptrs = xp_ptr + (m_in[:, None] * (groups * in_block) + block_column * in_block
                           + kk[None, :])
        b_ptrs = blocks_ptr + (((block_row * cosets + j) * in_block + kk[:, None]) * out_block
                               + n_in[None, :])
        for k0 in range(0, in_block, BLOCK_K):
            k_ok = kk < in_block - k0
            acc = _dot(acc, a_ptrs, b_ptrs, k_ok[None, :], k_ok[:, None], PRECISION, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * out_block
    tl.store(yp_ptr + m[:, None] * (groups * out_block) + block_row * out_block + n[None, :],
             acc.to(yp_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _blockdiag_input_grad_kernel(
    gyp_ptr,          # [rows, g, out/g] output gradient grouped by row residue
    blocks_ptr,       # [g, c * in/g, out/g]
    row_ptr,          # [g, c] int32: the block-row R whose j-th block is in block-column T
    gxp_ptr,          # [rows, g, in/g] result grouped by column residue
    rows, groups, cosets, in_block, out_block,
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    block_column = tl.program_id(2)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    gyp_ptr += row0 * groups * out_block
    gxp_ptr += row0 * groups * in_block
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # input positions in the block
    kk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < rows - row0, n < in_block
    m_in, n_in = _clamped(m, rows - row0), _clamped(n, in_block)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(cosets):
        block_row = tl.load(row_ptr + block_column * cosets + j)
        a_ptrs = gyp_ptr + (m_in[:, None] * (groups * out_block) + block_row * out_block
                            + kk[None, :])
        b_ptrs = blocks_ptr + (((block_row * cosets + j) * in_block + n_in[None, :]) * out_block
                               + kk[:, None])  # the block, transposed
        for k0 in range(0, out_block, BLOCK_K):
            k_ok = kk < out_block - k0
            acc = _dot(acc, a_ptrs, b_ptrs, k_ok[None, :], k_ok[:, None], PRECISION, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    tl.store(gxp_ptr + m[:, None] * (groups * in_block) + block_column * in_block + n[None, :],
             acc.to(gxp_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _blockdiag_values_grad_kernel(
    xp_ptr,           # [rows, g, in/g]
    gyp_ptr,          # [rows, g, out/g]
    column_ptr,       # [g, c] int32: T_j(R)
    grad_ptr,         # [g, c * in/g, out/g] result: the gradient of each kept block
    rows, groups, cosets, in_block, out_block,
    rows_key,         # the autotuner's bucket of rows (unused in the body)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    block = tl.program_id(2)  # R * c + j
    block_row = block // cosets
    block_column = tl.load(column_ptr + block)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # input positions in the block
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output positions in the block
    rr = tl.arange(0, BLOCK_K)
    i_ok, n_ok = i < in_block, n < out_block
    i_in, n_in = _clamped(i, in_block), _clamped(n, out_block)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = xp_ptr + (rr[None, :] * (groups * in_block) + block_column * in_block
                       + i_in[:, None])
    b_ptrs = gyp_ptr + (rr[:, None] * (groups * out_block) + block_row * out_block
                        + n_in[None, :])
    for r0 in range(0, rows, BLOCK_K):
        r_ok = rr < rows - r0
        acc = _dot(acc, a_ptrs, b_ptrs, r_ok[None, :], r_ok[:, None], PRECISION, UPCAST)
        a_ptrs += BLOCK_K * groups * in_block  # (pointer steps are 64-bit)
        b_ptrs += BLOCK_K * groups * out_block
    tl.store(grad_ptr + (block * in_block + i[:, None]) * out_block + n[None, :],
             acc.to(grad_ptr.dtype.element_ty), mask=i_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------ launching


def _empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Every buffer a kernel fills (the tests poison them, to catch a missed store)."""
    return like.new_empty(*shape)


def _tile(size: int, dtype: torch.dtype) -> int:
    """A tile side for a block side (or a count of rows) of ``size``."""
    return SMALL_TILE if size <= 2 * SMALL_TILE else LARGE_TILE[dtype]


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands take TF32 tensor cores exactly where ``F.linear`` would."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def _blocked(rows: int, dtype: torch.dtype) -> bool:
    return rows >= BLOCKED_MIN_ROWS and dtype in DTYPES


def _tables(offsets: torch.Tensor, out_features: int, in_features: int, groups: int):
    """``(position, columns, column_of, row_of)``: the PyTorch kernels' layout plus the
    int32 tables ``column_of[R, j] = T_j(R)`` and ``row_of[T, j]``, its inverse per ``j``."""
    position, columns = torch_kernels._layout(offsets, out_features, in_features, groups)
    in_block = in_features // groups
    column_of = columns.view(groups, -1, in_block)[:, :, 0]
    row_of = torch.empty_like(column_of)
    block_rows = torch.arange(groups, device=offsets.device)[:, None].expand_as(column_of)
    row_of.scatter_(0, column_of, block_rows)
    return position, columns, column_of.to(torch.int32).contiguous(), \
        row_of.to(torch.int32).contiguous()


def _by_residue(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[rows, g, features/g]``: column ``R + g i`` of ``t`` at ``[:, R, i]``."""
    return t.view(t.shape[0], -1, groups).transpose(1, 2).contiguous()


def _from_residue(tp: torch.Tensor) -> torch.Tensor:
    return tp.transpose(1, 2).reshape(tp.shape[0], -1)


def _warps(block_m: int, block_n: int, block_k: int) -> int:
    """4 warps up to 32-wide tiles; 8 once a side is 64 (with 4, a 64-wide tile spilled: 255
    registers and a stack frame on sm_80 and sm_90, seen with triton_variants)."""
    return 4 if max(block_m, block_n, block_k) <= 32 else 8


def _configs(dtype: torch.dtype) -> list[dict]:
    """The autotune set: every tile (M, N, K) from {16, the dtype's large tile}, with its
    warps. A GPU times them once per (rows bucket, block sides) and keeps the fastest; the
    interpreter takes ``_tile``'s pick."""
    tiles = (SMALL_TILE, LARGE_TILE[dtype])
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=_warps(m, n, k),
                 num_stages=NUM_STAGES) for m in tiles for n in tiles for k in tiles]


# the arguments whose sizes each kernel's M, N and K tiles cover (the rows as their bucket)
_TILE_SIDES = {"_blockdiag_forward_kernel": ("rows_key", "out_block", "in_block"),
               "_blockdiag_input_grad_kernel": ("rows_key", "in_block", "out_block"),
               "_blockdiag_values_grad_kernel": ("in_block", "out_block", "rows_key")}
_TUNED: dict = {}
MAX_TIMED = 4  # configs timed per key at most (of the 8 tiles)


def _suited(configs: list, sides: tuple[int, int, int]) -> list:
    """The configs whose tiles suit ``sides`` (what the M, N, K tiles cover): no tile wider
    than its side needs (a 64-wide tile over 16 rows computes 48 masked ones); if more than
    ``MAX_TIMED`` remain, those with the widest reduction tile (fewer, longer steps)."""
    needed = [max(SMALL_TILE, 1 << max(side - 1, 0).bit_length()) for side in sides]
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    kept = [c for c in configs if all(c.kwargs[n] <= need for n, need in zip(names, needed))]
    if len(kept) > MAX_TIMED:
        widest = max(c.kwargs["BLOCK_K"] for c in kept)
        kept = [c for c in kept if c.kwargs["BLOCK_K"] == widest]
    return kept or configs[:1]


def _tuned(kernel, dtype: torch.dtype):
    """``kernel`` under ``triton.autotune`` with ``dtype``'s set, keyed on the rows bucket and
    the block sides, timing only the configs that suit them (``_suited``)."""
    if (kernel, dtype) not in _TUNED:
        configs = [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"])
                   for c in _configs(dtype)]
        sides = _TILE_SIDES[kernel.__name__]

        def prune(configs, named_args, **_):
            return _suited(configs, tuple(named_args[name] for name in sides))

        _TUNED[kernel, dtype] = triton.autotune(
            configs=configs, key=["rows_key", "in_block", "out_block"], do_bench=autotune_bench,
            prune_configs_by=dict(early_config_prune=prune))(kernel)
    return _TUNED[kernel, dtype]


def _launch(kernel, grid, *operands, dtype: torch.dtype, sides: tuple[int, int, int]) -> None:
    """``grid(BLOCK_M, BLOCK_N)``; ``sides``: the sizes the M, N, K tiles cover (the
    interpreter's tile choice); ``operands`` end with the rows."""
    rows = operands[4]
    if INTERPRETED:
        block_m, block_n, block_k = (_tile(side, dtype) for side in sides)
        kernel[grid(block_m, block_n)](
            *operands, rows_bucket(rows), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=_precision(dtype), UPCAST=True, num_warps=_warps(block_m, block_n, block_k),
            num_stages=NUM_STAGES)
        return
    _tuned(kernel, dtype)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](
        *operands, rows_bucket(rows), PRECISION=_precision(dtype), UPCAST=False)


def _apply(kernel, t: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
           out_features: int, in_features: int, groups: int, forward: bool) -> torch.Tensor:
    """``t @ W.T`` (forward) or ``t @ W`` (the input gradient): the same grid over the block
    sides it produces, reducing over the other."""
    rows = t.shape[0]
    if not _blocked(rows, t.dtype):
        return diag_triton.diag_apply(t, values, offsets, max(out_features, in_features),
                                      gather=(out_features < in_features) == forward)
    position, columns, column_of, row_of = _tables(offsets, out_features, in_features, groups)
    out_block, in_block = out_features // groups, in_features // groups
    blocks = torch_kernels._blocks(values, position, columns, out_block)
    table, produced, reduced = ((column_of, out_block, in_block) if forward
                                else (row_of, in_block, out_block))
    result = _empty(t, rows, groups, produced)
    _launch(kernel, lambda m, n: (triton.cdiv(rows, m), triton.cdiv(produced, n), groups),
            _by_residue(t, groups), blocks, table, result, rows, groups, table.shape[1],
            in_block, out_block, dtype=t.dtype, sides=(rows, produced, reduced))
    return _from_residue(result)


def blockdiag_forward(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                      out_features: int, groups: int) -> torch.Tensor:
    """``x @ W.T`` for the blocked-diagonal ``W`` (no bias); ``x`` is ``[rows, in]``."""
    return _apply(_blockdiag_forward_kernel, x, values, offsets, out_features, x.shape[1],
                  groups, forward=True)


def blockdiag_input_grad(grad_out: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                         in_features: int, groups: int) -> torch.Tensor:
    """``grad_out @ W``."""
    return _apply(_blockdiag_input_grad_kernel, grad_out, values, offsets, grad_out.shape[1],
                  in_features, groups, forward=False)


def blockdiag_values_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """Gradient of ``values[K, L]``: the kept blocks of ``grad_out.T @ x``."""
    rows, out_features = grad_out.shape
    in_features = x.shape[1]
    if not _blocked(rows, x.dtype):
        a, b = (grad_out, x) if out_features < in_features else (x, grad_out)
        return diag_triton.diag_values_grad(a, b, offsets, max(out_features, in_features))
    position, _, column_of, _ = _tables(offsets, out_features, in_features, groups)
    out_block, in_block = out_features // groups, in_features // groups
    cosets = column_of.shape[1]
    grad_blocks = _empty(x, groups, cosets * in_block, out_block)
    _launch(_blockdiag_values_grad_kernel,
            lambda m, n: (triton.cdiv(in_block, m), triton.cdiv(out_block, n), groups * cosets),
            _by_residue(x, groups), _by_residue(grad_out, groups), column_of, grad_blocks, rows,
            groups, cosets, in_block, out_block, dtype=x.dtype,
            sides=(in_block, out_block, rows))
    return grad_blocks.reshape(-1)[position].view(offsets.numel(), -1)


def launch_variants():
    """Every specialisation the launchers above can make: the autotune set of each dtype (see
    ``..triton_variants``)."""
    kernels = (_blockdiag_forward_kernel, _blockdiag_input_grad_kernel,
               _blockdiag_values_grad_kernel)
    for dtype in DTYPES:
        pointers = dict(xp_ptr=dtype, blocks_ptr=dtype, yp_ptr=dtype, gyp_ptr=dtype,
                        gxp_ptr=dtype, grad_ptr=dtype, column_ptr=torch.int32,
                        row_ptr=torch.int32)
        for precision in PRECISIONS[dtype]:
            for kernel in kernels:
                for config in _configs(dtype):
                    constexprs = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                                      BLOCK_K=config["BLOCK_K"], PRECISION=precision,
                                      UPCAST=False)
                    yield Variant(kernel, signature(kernel, pointers, constexprs), constexprs,
                                  config["num_warps"], config["num_stages"])
