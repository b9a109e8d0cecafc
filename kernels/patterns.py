"""Pattern math: the one place that says what a diagonal, fan-in or N:M structure is.

Every other part of sparsefx (the kernels' dense references, the checks on op inputs, the
rewrite passes, the DST manager) asks this module; none of them re-derives a formula.

Conventions (weight ``W`` of shape ``(out, in)``, ``y = x @ W.T + b``):

* **diag** -- ``P = max(out, in)`` candidate diagonals of length ``L = min(out, in)``,
  wrapping around modulo the larger dimension:

  - ``out >= in``: diagonal ``d`` holds ``W[(t + d) % out, t]`` for ``t in range(in)``;
  - ``out <  in``: diagonal ``d`` holds ``W[t, (t + d) % in]`` for ``t in range(out)``.

  The P candidates tile ``W`` exactly once. A layer keeps ``K`` distinct diagonals, stored
  as ``values[K, L]`` and ``offsets[K]``.
* **fanin** -- every output row holds exactly ``k`` entries: ``values[out, k]`` and
  ``indices[out, k]`` (column ids, distinct within a row).
* **nm** -- fanin where each row holds exactly ``n`` entries in every group of ``m``
  consecutive inputs, so ``k = n * in / m``.
* **blockdiag** -- diag whose kept diagonals are whole cosets of the subgroup ``g Z_P``:
  for ``g`` dividing both ``out`` and ``in``, the ``P / g`` diagonals ``r, r + g, r + 2g,
  ...`` form coset ``r``; a layer keeps ``c`` whole cosets (``K = c * P / g``, density
  ``c / g``). Grouping rows and columns by their residue mod ``g`` turns ``W`` into a
  ``g x g`` grid of dense ``(out / g) x (in / g)`` blocks, ``c`` per block-row
  (``blockdiag_block_shifts``). Stored exactly as diag: ``values[K, L]``, ``offsets[K]``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "diag_geometry", "diag_num_kept", "diag_coordinates", "diag_to_dense", "diag_norms",
    "dense_to_diag", "random_diag_offsets", "check_diag_offsets",
    "fanin_index_dtype", "fanin_num_kept", "fanin_to_dense", "dense_to_fanin",
    "random_fanin_indices",
    "check_fanin_indices",
    "nm_num_kept", "dense_to_nm", "random_nm_indices", "check_nm_indices",
    "unstructured_num_kept", "erk_densities", "is_integer_dtype",
    "blockdiag_groups", "blockdiag_num_cosets", "blockdiag_offsets", "blockdiag_cosets",
    "check_blockdiag_offsets", "check_blockdiag_groups", "blockdiag_block_shifts",
]

# (1 - 0.7) * 10 == 3.0000000000000004: round products to this many digits before ceil/floor,
# so that a sparsity written in decimal gives the count a person would compute by hand.
_FLOAT_NOISE_DIGITS = 9


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the dtypes a structure tensor (offsets, indices) may have."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: expected a fraction in [0, 1)")


# --------------------------------------------------------------------------------- diag


def diag_geometry(out_features: int, in_features: int) -> tuple[int, int]:
    """``(P, L)``: the number of candidate diagonals and the length of each."""
    if out_features < 1 or in_features < 1:
        raise ValueError(
            f"weight shape ({out_features}, {in_features}): expected both dimensions >= 1")
    return max(out_features, in_features), min(out_features, in_features)


def diag_num_kept(out_features: int, in_features: int, sparsity: float) -> int:
    """``K = max(1, ceil((1 - sparsity) * P))`` diagonals kept at ``sparsity``."""
    _check_sparsity(sparsity)
    num_candidates, _ = diag_geometry(out_features, in_features)
    kept = math.ceil(round((1.0 - sparsity) * num_candidates, _FLOAT_NOISE_DIGITS))
    return max(1, min(num_candidates, kept))


def diag_coordinates(
    offsets: torch.Tensor, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column ids ``[K, L]`` of every element of the diagonals ``offsets``."""
    _, length = diag_geometry(out_features, in_features)
    t = torch.arange(length, device=offsets.device)
    shifted = t[None, :] + offsets.to(torch.int64)[:, None]
    if out_features >= in_features:
        return shifted % out_features, t.expand_as(shifted)
    return t.expand_as(shifted), shifted % in_features


def diag_to_dense(
    values: torch.Tensor, offsets: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
    """The dense ``W[out, in]`` that ``values[K, L]`` on diagonals ``offsets[K]`` stand for."""
    rows, cols = diag_coordinates(offsets, out_features, in_features)
    weight = values.new_zeros(out_features, in_features)
    weight[rows.reshape(-1), cols.reshape(-1)] = values.reshape(-1)
    return weight


def diag_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every candidate diagonal of ``weight``: a ``[P]`` tensor indexed by offset."""
    out_features, in_features = weight.shape
    num_candidates, length = diag_geometry(out_features, in_features)
    weight = weight.float()
    # wrap-around diagonals are straight lines through two copies of W: a strided view, no
    # index tensors (a few times faster than gathering diag_coordinates at 2048 wide)
    if out_features >= in_features:
        # diagonal d, element t: doubled[d + t, t], at (d + t) * in + t = d * in + t * (in + 1)
        doubled = torch.cat([weight, weight], dim=0)
        strides = (in_features, in_features + 1)
    else:
        # diagonal d, element t: doubled[t, t + d], at t * 2 in + t + d
        doubled = torch.cat([weight, weight], dim=1)
        strides = (1, 2 * in_features + 1)
    return doubled.view(-1).as_strided((num_candidates, length), strides).norm(dim=1)


def dense_to_diag(weight: torch.Tensor, num_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_kept`` diagonals of largest L2 norm: ``(values[K, L], offsets[K])``.

    Offsets come back sorted ascending, ties broken towards the smaller offset.
    """
    out_features, in_features = weight.shape
    num_candidates, _ = diag_geometry(out_features, in_features)
    if not 1 <= num_kept <= num_candidates:
        raise ValueError(f"num_kept={num_kept}: expected 1 <= K <= P = {num_candidates}")
    norms = diag_norms(weight)
    # stable sort on the negated norms: equal norms keep offset order
    offsets = torch.sort(torch.argsort(-norms, stable=True)[:num_kept]).values
    rows, cols = diag_coordinates(offsets, out_features, in_features)
    return weight[rows, cols].clone(), offsets


def random_diag_offsets(
    out_features: int, in_features: int, num_kept: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``num_kept`` distinct offsets drawn uniformly, sorted, as int64."""
    num_candidates, _ = diag_geometry(out_features, in_features)
    if not 1 <= num_kept <= num_candidates:
        raise ValueError(f"num_kept={num_kept}: expected 1 <= K <= P = {num_candidates}")
    return torch.sort(torch.randperm(num_candidates, generator=generator)[:num_kept]).values


def check_diag_offsets(offsets: torch.Tensor, out_features: int, in_features: int,
                       name: str = "offsets") -> None:
    """Raise ``ValueError`` unless ``offsets`` are distinct integers in ``[0, P)``."""
    num_candidates, _ = diag_geometry(out_features, in_features)
    flat = offsets.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return
    if flat.numel() > num_candidates:
        raise ValueError(f"{name} has K = {flat.numel()} diagonals: expected 1 <= K <= P = "
                         f"max(out_features, in_features) = {num_candidates}")
    bad = (flat < 0) | (flat >= num_candidates)
    if bool(bad.any()):
        value = int(flat[bad][0])
        raise ValueError(
            f"{name} holds {value} (at position {int(bad.nonzero()[0])}): expected offsets in "
            f"[0, P) with P = max(out_features, in_features) = {num_candidates}")
    ordered = torch.sort(flat).values
    repeated = ordered[1:] == ordered[:-1]
    if bool(repeated.any()):
        raise ValueError(
            f"{name} repeats offset {int(ordered[1:][repeated][0])}: expected distinct diagonals")


# ---------------------------------------------------------------------------- blockdiag


# blockdiag_groups prefers larger blocks while the density is within this of the target
_BLOCKDIAG_DENSITY_TOLERANCE = 0.10


def check_blockdiag_groups(out_features: int, in_features: int, groups: int) -> None:
    """Raise ``ValueError`` unless ``groups`` divides both dimensions."""
    diag_geometry(out_features, in_features)
    if not isinstance(groups, (int, torch.SymInt)) or groups < 1 or out_features % groups or \
            in_features % groups:
        raise ValueError(f"groups={groups!r}: expected a positive divisor of both "
                         f"out_features={out_features} and in_features={in_features}")


def blockdiag_num_cosets(groups: int, sparsity: float) -> int:
    """``c = max(1, round((1 - sparsity) * g))`` cosets kept of ``g``."""
    _check_sparsity(sparsity)
    return max(1, min(groups, round(round((1.0 - sparsity) * groups, _FLOAT_NOISE_DIGITS))))


def blockdiag_groups(out_features: int, in_features: int, sparsity: float,
                     min_block: int = 16) -> int:
    """The ``g`` for a layer: a common divisor of ``out`` and ``in`` whose blocks have both
    sides at least ``min_block`` (what ``tl.dot`` and a CPU GEMM want). Of those, the
    largest blocks (smallest ``g``) whose density ``c / g`` is within 10 % of
    ``1 - sparsity``, else the density closest to it, and at equal density the most cosets
    (largest ``g``): a block-row with one coset reads one block-column, and stacked
    one-coset layers never mix their residue classes (a 256-64-256 MLP at 90 % then reads
    16 of 64 pixels per hidden unit). If no divisor gives such blocks, the one giving the
    largest blocks that still leaves any sparsity (``g >= 2``); ``1`` (dense) only if
    ``out`` and ``in`` are coprime."""
    diag_geometry(out_features, in_features)
    _check_sparsity(sparsity)
    common = math.gcd(out_features, in_features)
    divisors = [g for g in range(1, common + 1) if common % g == 0]
    fitting = [g for g in divisors
               if min(out_features, in_features) // g >= min_block and g >= 2]
    if not fitting:
        return min((g for g in divisors if g >= 2), default=1)
    density = 1.0 - sparsity
    error = {g: abs(blockdiag_num_cosets(g, sparsity) / g - density) / density for g in fitting}
    close = [g for g in fitting if error[g] <= _BLOCKDIAG_DENSITY_TOLERANCE]
    return min(close) if close else min(fitting, key=lambda g: (error[g], -g))


def blockdiag_offsets(out_features: int, in_features: int, groups: int,
                      cosets: torch.Tensor) -> torch.Tensor:
    """The int64 offsets of the kept ``cosets`` (distinct residues in ``[0, g)``), coset by
    coset in the order given: coset ``r`` contributes ``r, r + g, ..., P - g + r``."""
    check_blockdiag_groups(out_features, in_features, groups)
    cosets = cosets.reshape(-1).to(torch.int64)
    if cosets.numel() == 0 or bool(((cosets < 0) | (cosets >= groups)).any()) or \
            torch.unique(cosets).numel() != cosets.numel():
        raise ValueError(f"cosets={cosets.tolist()}: expected distinct residues in "
                         f"[0, {groups})")
    num_candidates, _ = diag_geometry(out_features, in_features)
    steps = torch.arange(0, num_candidates, groups, device=cosets.device)
    return (cosets[:, None] + steps[None, :]).reshape(-1)


def blockdiag_cosets(offsets: torch.Tensor, groups: int) -> torch.Tensor:
    """The sorted distinct residues ``offsets mod g`` (the kept cosets)."""
    return torch.unique(offsets.reshape(-1).to(torch.int64) % groups)


def check_blockdiag_offsets(offsets: torch.Tensor, out_features: int, in_features: int,
                            groups: int, name: str = "offsets") -> None:
    """Raise ``ValueError`` unless ``offsets`` are valid diag offsets forming whole cosets."""
    check_blockdiag_groups(out_features, in_features, groups)
    check_diag_offsets(offsets, out_features, in_features, name)
    num_candidates, _ = diag_geometry(out_features, in_features)
    residues = offsets.reshape(-1).to(torch.int64) % groups
    counts = torch.bincount(residues, minlength=groups)
    partial = (counts != 0) & (counts != num_candidates // groups)
    if bool(partial.any()):
        residue = int(partial.nonzero()[0])
        raise ValueError(f"{name} holds {int(counts[residue])} of the {num_candidates // groups} "
                         f"diagonals of coset {residue} (mod g = {groups}): expected whole "
                         "cosets")


def blockdiag_block_shifts(out_features: int, in_features: int, groups: int,
                           cosets: torch.Tensor) -> torch.Tensor:
    """For the kept ``cosets``, the block shifts ``s`` such that, rows and columns grouped
    by residue mod ``g`` (row ``i`` to block-row ``i mod g``, column ``t`` to block-column
    ``t mod g``), block ``(R, T)`` is dense exactly when ``(R - T) mod g`` is one of them:
    ``r`` itself when ``out >= in`` (diagonal ``d`` joins row ``t + d`` to column ``t``),
    ``-r mod g`` when ``out < in`` (it joins row ``t`` to column ``t + d``)."""
    check_blockdiag_groups(out_features, in_features, groups)
    cosets = cosets.reshape(-1).to(torch.int64)
    return cosets if out_features >= in_features else (-cosets) % groups


# -------------------------------------------------------------------------------- fanin


def fanin_index_dtype(in_features: int) -> torch.dtype:
    """The narrowest dtype that holds every column id: int16 below 2**15 inputs, else int32.
    Index bytes are half the traffic of a fan-in kernel at batch 1, so narrower is faster."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _round_kept(total: int, sparsity: float) -> int:
    """``max(1, round((1 - sparsity) * total))``, halves rounding up."""
    _check_sparsity(sparsity)
    kept = math.floor(round((1.0 - sparsity) * total, _FLOAT_NOISE_DIGITS) + 0.5)
    return max(1, min(total, kept))


def fanin_num_kept(in_features: int, sparsity: float) -> int:
    """``k = max(1, round((1 - sparsity) * in))`` entries per row (halves round up)."""
    return _round_kept(in_features, sparsity)


def unstructured_num_kept(num_elements: int, sparsity: float) -> int:
    """Entries an unstructured (masked) layer keeps: ``max(1, round((1 - s) * out * in))``."""
    return _round_kept(num_elements, sparsity)


def fanin_to_dense(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense ``W[out, in]``: row ``o`` holds ``values[o, j]`` at column ``indices[o, j]``."""
    weight = values.new_zeros(values.shape[0], in_features)
    return weight.scatter_(1, indices.to(torch.int64), values)


def dense_to_fanin(weight: torch.Tensor, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's ``fan_in`` largest-magnitude entries: ``(values, indices)``, ids in
    ``fanin_index_dtype(in)``, ascending within a row."""
    in_features = weight.shape[1]
    if not 1 <= fan_in <= in_features:
        raise ValueError(f"fan_in={fan_in}: expected 1 <= k <= in_features = {in_features}")
    indices = torch.sort(weight.abs().topk(fan_in, dim=1).indices, dim=1).values
    return weight.gather(1, indices), indices.to(fanin_index_dtype(in_features))


def random_fanin_indices(
    out_features: int, in_features: int, fan_in: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[out, fan_in]`` column ids (``fanin_index_dtype(in)``), distinct and ascending
    within each row."""
    if not 1 <= fan_in <= in_features:
        raise ValueError(f"fan_in={fan_in}: expected 1 <= k <= in_features = {in_features}")
    scores = torch.rand(out_features, in_features, generator=generator)
    indices = torch.sort(scores.topk(fan_in, dim=1).indices, dim=1).values
    return indices.to(fanin_index_dtype(in_features))


def check_fanin_indices(indices: torch.Tensor, in_features: int, name: str = "indices") -> None:
    """Raise ``ValueError`` unless every row of ``indices`` holds distinct ids in ``[0, in)``."""
    if indices.numel() == 0:
        return
    flat = indices.to(torch.int64)
    bad = (flat < 0) | (flat >= in_features)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{row}, {col}] = {int(flat[row, col])}: expected column ids in "
            f"[0, in_features) = [0, {in_features})")
    ordered = torch.sort(flat, dim=1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        row, col = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(
            f"{name} row {row} repeats column {int(ordered[row, col])}: expected distinct "
            f"column ids within a row")


# ----------------------------------------------------------------------------------- nm


def _check_nm(n: int, m: int, in_features: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M = {n}:{m}: expected 0 < N < M")
    if in_features % m:
        raise ValueError(f"in_features = {in_features}: expected a multiple of M = {m} for N:M")


def nm_num_kept(in_features: int, n: int, m: int) -> int:
    """Entries per row of an N:M layer: ``n`` in each of the ``in / m`` groups."""
    _check_nm(n, m, in_features)
    return n * (in_features // m)


def dense_to_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``n`` largest-magnitude entries of every group of ``m``: ``(values, indices)``."""
    out_features, in_features = weight.shape
    _check_nm(n, m, in_features)
    groups = weight.abs().reshape(out_features, in_features // m, m)
    within = torch.sort(groups.topk(n, dim=2).indices, dim=2).values
    base = torch.arange(0, in_features, m, device=weight.device)[None, :, None]
    indices = (within + base).reshape(out_features, -1)
    return weight.gather(1, indices), indices.to(fanin_index_dtype(in_features))


def random_nm_indices(out_features: int, in_features: int, n: int, m: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``[out, n * in / m]`` ids with ``n`` random entries in each group of ``m``."""
    _check_nm(n, m, in_features)
    scores = torch.rand(out_features, in_features, generator=generator)
    _, indices = dense_to_nm(scores, n, m)
    return indices


def check_nm_indices(indices: torch.Tensor, in_features: int, n: int, m: int,
                     name: str = "indices") -> None:
    """Raise ``ValueError`` unless ``indices`` is a valid fan-in structure holding exactly
    ``n`` entries in every group of ``m`` inputs of every row."""
    _check_nm(n, m, in_features)
    check_fanin_indices(indices, in_features, name)
    expected = nm_num_kept(in_features, n, m)
    if indices.shape[-1] != expected:
        raise ValueError(f"{name} has {indices.shape[-1]} entries per row: expected "
                         f"{expected} = {n} * {in_features} / {m} for {n}:{m}")
    groups = indices.to(torch.int64) // m
    counts = torch.zeros(indices.shape[0], in_features // m, dtype=torch.int64,
                         device=indices.device).scatter_add_(1, groups, torch.ones_like(groups))
    wrong = counts != n
    if bool(wrong.any()):
        row, group = (int(i) for i in wrong.nonzero()[0])
        raise ValueError(f"{name} row {row} holds {int(counts[row, group])} entries in group "
                         f"{group} (inputs {group * m}..{group * m + m - 1}): expected {n}")


# ------------------------------------------------------------------------- allocation


def erk_densities(shapes: list[tuple[int, int]], sparsity: float) -> list[float]:
    """Per-layer densities for the layer shapes ``(out, in)`` under Erdős–Rényi-Kernel.

    A layer's density is proportional to ``(in + out) / (in * out)``, scaled so that the layers
    together keep ``(1 - sparsity)`` of their weights. A layer whose density would exceed 1 is
    kept dense and the others are rescaled to hold the global budget, until none exceeds 1.
    """
    _check_sparsity(sparsity)
    if not shapes:
        raise ValueError("shapes is empty: expected at least one (out, in) layer shape")
    sizes = [out * inp for out, inp in shapes]
    raw = [(out + inp) / (out * inp) for out, inp in shapes]
    budget = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        remaining = budget - sum(sizes[i] for i in dense)
        scale = remaining / sum(raw[i] * sizes[i] for i in free) if free else 0.0
        over = {i for i in free if scale * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]
        dense |= over


def owl_densities(sizes: list[int], outlier_ratios: list[float], sparsity: float,
                  spread: float) -> list[float]:
    """Per-layer densities after OWL (outlier-weighted layerwise sparsity): a layer's density
    rises with its share of outliers, linearly from ``c - spread`` (the fewest) to
    ``c + spread`` (the most), clipped to ``[0, 1]``, with ``c`` such that the layers (of
    ``sizes`` weights) together keep ``(1 - sparsity)`` of their weights. Equal ratios give
    every layer ``1 - sparsity``."""
    _check_sparsity(sparsity)
    if not sizes or len(sizes) != len(outlier_ratios):
        raise ValueError(f"sizes ({len(sizes)}) and outlier_ratios ({len(outlier_ratios)}): "
                         "expected as many, at least one")
    low, high = min(outlier_ratios), max(outlier_ratios)
    unit = [0.0 if high == low else 2 * (r - low) / (high - low) - 1 for r in outlier_ratios]
    budget = (1.0 - sparsity) * sum(sizes)

    def kept(centre: float) -> list[float]:
        return [min(1.0, max(0.0, centre + spread * u)) for u in unit]

    lo, hi = -spread, 1.0 + spread  # kept(lo) keeps nothing, kept(hi) everything
    for _ in range(100):  # bisection on the centre: what is kept grows with it
        mid = (lo + hi) / 2
        if sum(n * d for n, d in zip(sizes, kept(mid))) < budget:
            lo = mid
        else:
            hi = mid
    return kept(hi)
