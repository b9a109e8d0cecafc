"""``BlockDiagLinear``: diagonals laid out coset by coset, run as dense blocks
(``torch.ops.sparsefx.blockdiag_linear``)."""
from __future__ import annotations


import torch

from sparsefx.kernels import growth, patterns
from .base import _check_init
from .diag import DiagLinear


def _check_coset_layout(offsets: torch.Tensor, out_features: int, in_features: int,
                        groups: int) -> None:
    """Valid blockdiag offsets, laid out coset by coset."""
    patterns.check_blockdiag_offsets(offsets, out_features, in_features, groups)
    per_coset = patterns.diag_geometry(out_features, in_features)[0] // groups
    firsts = offsets.reshape(-1, per_coset).to(torch.int64)
    if not bool((firsts == firsts[:, :1] + groups * torch.arange(
            per_coset, device=firsts.device)).all()):
        raise ValueError("offsets: expected whole cosets laid out one after another "
                         "(r, r + g, ..., as patterns.blockdiag_offsets gives them)")


class BlockDiagLinear(DiagLinear):
    """A ``DiagLinear`` whose diagonals are ``c`` whole cosets of ``g Z_P`` (the blockdiag
    pattern of ``sparsefx.kernels.patterns``): after grouping rows and columns by residue
    mod ``g``, ``c`` dense ``(out/g) x (in/g)`` blocks per block-row. ``offsets`` are laid out
    coset by coset (``P / g`` diagonals each), so a coset is a slot of ``P / g`` value rows;
    DST moves whole cosets."""

    pattern = "blockdiag"

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor, out_features: int,
                 in_features: int, groups: int, bias: torch.Tensor | None = None):
        _check_coset_layout(offsets, out_features, in_features, groups)
        super().__init__(values, offsets, out_features, in_features, bias)
        self.groups = groups

    def check_structure(self, structure: torch.Tensor) -> None:
        _check_coset_layout(structure, self.out_features, self.in_features, self.groups)

    def saved_options(self) -> dict:
        return {**super().saved_options(), "groups": self.groups}

    @classmethod
    def from_saved(cls, tensors, options) -> BlockDiagLinear:
        layer = cls(tensors["values"], tensors["offsets"], options["out_features"],
                    options["in_features"], options["groups"], tensors.get("bias"))
        layer.set_input_permutation(tensors.get("input_permutation"))
        return layer

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   sparsity: float, groups: int | None = None, init: str = "magnitude",
                   generator: torch.Generator | None = None) -> BlockDiagLinear:
        """Keep ``c = blockdiag_num_cosets(g, sparsity)`` cosets of ``weight``'s diagonals:
        those of largest L2 norm (``init="magnitude"``) or drawn at random
        (``init="random"``). ``groups`` (``g``): default ``blockdiag_groups(out, in,
        sparsity)``."""
        _check_init(init)
        out_features, in_features = weight.shape
        if groups is None:
            groups = patterns.blockdiag_groups(out_features, in_features, sparsity)
        patterns.check_blockdiag_groups(out_features, in_features, groups)
        num_cosets = patterns.blockdiag_num_cosets(groups, sparsity)
        if init == "magnitude":
            norms = patterns.diag_norms(weight.detach()).view(-1, groups).square().sum(0)
            cosets = torch.argsort(-norms, stable=True)[:num_cosets]
        else:
            cosets = torch.randperm(groups, generator=generator)[:num_cosets]
        cosets = torch.sort(cosets).values.to(weight.device)
        offsets = patterns.blockdiag_offsets(out_features, in_features, groups, cosets)
        rows, cols = patterns.diag_coordinates(offsets, out_features, in_features)
        return cls(weight.detach()[rows, cols], offsets, out_features, in_features, groups,
                   bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        x = self._inputs(x)
        y = torch.ops.sparsefx.blockdiag_linear(x, self.effective_values(), self.offsets,
                                                self.out_features, self.groups,
                                                self._bias(bias))
        return self._tap(y, x)

    @property
    def _per_coset(self) -> int:
        return self.offsets.numel() // self.num_cosets

    @property
    def num_cosets(self) -> int:
        return self.offsets.numel() * self.groups // self.num_diagonals

    @property
    def num_diagonals(self) -> int:
        return patterns.diag_geometry(self.out_features, self.in_features)[0]

    def slots(self, rows: slice | None = None) -> torch.Tensor:
        return self.unit_ids()[None, :]  # one row

    def unit_ids(self) -> torch.Tensor:
        return self.offsets.view(-1, self._per_coset)[:, 0] % self.groups  # the cosets

    def unit_rows(self, per_unit: torch.Tensor) -> torch.Tensor:
        return per_unit.repeat_interleave(self._per_coset)  # a coset's P / g diagonals

    def unit_magnitudes(self, active: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
        squares = self.values.detach().float().square().sum(dim=1)
        return squares.view(-1, self._per_coset).sum(dim=1).sqrt()[None, :]

    @property
    def num_candidates(self) -> int:
        return self.groups

    def active_units(self, rows: int | None = None) -> int:
        return self.num_cosets

    def growth_scores(self, probe_grad: torch.Tensor, rows: slice | None = None
                      ) -> torch.Tensor:
        # the tap leaves every diagonal's gradient norm; a coset's is the norm over its own
        norms = probe_grad[:-growth.TRAILER]
        return norms.square().view(-1, self.groups).sum(dim=0).sqrt()[None, :]

    def random_scores(self, generator: torch.Generator, rows: slice | None = None
                      ) -> torch.Tensor:
        return torch.rand(1, self.groups, generator=generator).to(self.param.device)

    def write_structure(self, new_active: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        self.offsets.copy_(patterns.blockdiag_offsets(self.out_features, self.in_features,
                                                      self.groups, new_active[0]))
        return grown[0].repeat_interleave(self._per_coset)[:, None]  # a coset's value rows

    def describe(self, rows: int | None = None) -> str:
        return (f"blockdiag ({self.out_features}, {self.in_features}): {self.num_cosets} of "
                f"{self.groups} cosets, blocks {self.out_features // self.groups}x"
                f"{self.in_features // self.groups}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"
