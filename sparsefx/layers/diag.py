"""``DiagLinear``: K whole wrap-around diagonals (``torch.ops.sparsefx.diag_linear``), and
DynaDiag's soft top-k gates over them."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from sparsefx.kernels import growth, patterns
from .base import _DENSE_WEIGHT, SparseLinear, _check_init


def soft_top_k_gates(importance: torch.Tensor, offsets: torch.Tensor,
                     temperature: torch.Tensor) -> torch.Tensor:
    """DynaDiag's gates for the ``K`` active diagonals ``offsets`` out of ``P`` candidates:

        gate_d = sigmoid((importance[d] - theta) / temperature)

    with ``theta`` halfway between the K-th and (K+1)-th largest importance (held constant
    for the gradient). As ``temperature`` falls the gates harden towards the top-K indicator;
    at ``temperature == 0`` they are exactly 1. Only the K active gates are computed.
    """
    num_kept, num_candidates = offsets.numel(), importance.numel()
    active = importance[offsets]
    if num_kept == num_candidates:
        return torch.ones_like(active)
    top = importance.detach().topk(num_kept + 1).values
    theta = (top[num_kept - 1] + top[num_kept]) / 2
    soft = torch.sigmoid((active - theta) / temperature.clamp_min(1e-12))
    return torch.where(temperature > 0, soft, torch.ones_like(soft))


class DiagLinear(SparseLinear):
    """``y = x @ W.T + b`` with ``W`` keeping ``K`` whole diagonals: ``values [K, L]`` (a
    parameter) on ``offsets [K]`` (an int64 buffer, rewritten in place by DST)."""

    pattern = "diag"
    growth_granularity = "diagonals"
    permutable = True  # set_input_permutation

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor, out_features: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        patterns.check_diag_offsets(offsets, out_features, in_features)
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("offsets", offsets.detach().to(torch.int64).clone())
        # values -> the values the op computes with, while a DST method wants that (DynaDiag's
        # gates, sparsefx.methods.dynadiag.Gates), or -> (values, offsets) of more diagonals
        # than the layer keeps (its reference rule gates all P); None: the values themselves
        self.value_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        # the layer computes on x[..., input_permutation] (set_input_permutation); None: on x
        self.register_buffer("input_permutation", None)

    def set_input_permutation(self, permutation: torch.Tensor | None) -> None:
        """Compute on ``x[..., permutation]``: the diagonals lie on the permuted inputs (a
        permutation that fits them to a trained weight, ``sparsefx.permutation``), and the
        layer still computes ``x @ dense_weight().T``. ``None``: on ``x`` as it comes."""
        if permutation is not None:
            permutation = permutation.detach().reshape(-1).to(torch.int64)
            if permutation.numel() != self.in_features or not torch.equal(
                    permutation.sort().values.cpu(), torch.arange(self.in_features)):
                raise ValueError(f"layer {self.layer_name}: input_permutation of "
                                 f"{permutation.numel()} entries: expected a permutation of "
                                 f"range({self.in_features})")
            permutation = permutation.to(self.offsets.device)
        self.input_permutation = permutation

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the op reads: ``x``, its features permuted if the layer is."""
        if self.input_permutation is None:
            return x
        return x.index_select(-1, self.input_permutation)

    def _to_inputs(self, on_permuted: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` on the permuted inputs -> on the inputs as they come."""
        if self.input_permutation is None:
            return on_permuted
        result = torch.empty_like(on_permuted)
        result[:, self.input_permutation] = on_permuted
        return result

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   sparsity: float, init: str = "magnitude",
                   generator: torch.Generator | None = None) -> DiagLinear:
        """Keep ``diag_num_kept(out, in, sparsity)`` diagonals of ``weight``: the largest by
        L2 norm (``init="magnitude"``) or drawn at random (``init="random"``)."""
        _check_init(init)
        out_features, in_features = weight.shape
        num_kept = patterns.diag_num_kept(out_features, in_features, sparsity)
        if init == "magnitude":
            values, offsets = patterns.dense_to_diag(weight.detach(), num_kept)
        else:
            offsets = patterns.random_diag_offsets(out_features, in_features, num_kept,
                                                   generator).to(weight.device)
            rows, cols = patterns.diag_coordinates(offsets, out_features, in_features)
            values = weight.detach()[rows, cols]
        return cls(values, offsets, out_features, in_features, bias)

    @property
    def stored(self) -> int:
        return self.values.numel()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        values, offsets = self.effective()
        x = self._inputs(x)
        y = torch.ops.sparsefx.diag_linear(x, values, offsets, self.out_features,
                                           self._bias(bias))
        return self._tap(y, x)

    weight = _DENSE_WEIGHT

    structure_name = "offsets"

    def check_structure(self, structure: torch.Tensor) -> None:
        patterns.check_diag_offsets(structure, self.out_features, self.in_features)

    @classmethod
    def from_saved(cls, tensors, options) -> DiagLinear:
        layer = cls(tensors["values"], tensors["offsets"], options["out_features"],
                    options["in_features"], tensors.get("bias"))
        layer.set_input_permutation(tensors.get("input_permutation"))
        return layer

    def slots(self, rows: slice | None = None) -> torch.Tensor:
        return self.offsets[None, :]  # one row

    def unit_ids(self) -> torch.Tensor:
        """The active units' ids ``[K]`` (DynaDiag gates one per unit)."""
        return self.offsets

    def unit_rows(self, per_unit: torch.Tensor) -> torch.Tensor:
        """A value per active unit, spread over the value rows (a diagonal is one row)."""
        return per_unit

    def unit_magnitudes(self, active: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
        return self.values.detach().float().norm(dim=1)[None, :]  # a diagonal's L2 norm

    @property
    def num_candidates(self) -> int:
        return patterns.diag_geometry(self.out_features, self.in_features)[0]

    def active_units(self, rows: int | None = None) -> int:
        return self.offsets.numel()

    def growth_scores(self, probe_grad: torch.Tensor, rows: slice | None = None
                      ) -> torch.Tensor:
        # the tap leaves every diagonal's gradient norm
        return probe_grad[:-growth.TRAILER].reshape(1, -1)

    def random_scores(self, generator: torch.Generator, rows: slice | None = None
                      ) -> torch.Tensor:
        return torch.rand(1, self.num_candidates, generator=generator).to(self.param.device)

    def write_structure(self, new_active: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        self.offsets.copy_(new_active[0])
        return grown[0][:, None]  # whole diagonals

    def describe(self, rows: int | None = None) -> str:
        return (f"diag ({self.out_features}, {self.in_features}): {self.offsets.numel()} of "
                f"{self.num_candidates} diagonals")

    def set_value_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None
                            ) -> None:
        """What the op computes with in place of ``values`` while a DST method wants it
        (``None``: the values themselves); see ``value_transform``."""
        self.value_transform = transform

    def effective_values(self) -> torch.Tensor:
        """``values`` through ``value_transform`` (DynaDiag's gates while it trains)."""
        if self.value_transform is None:
            return self.values
        return self.value_transform(self.values)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, offsets)`` the op computes with: ``effective_values()`` on ``offsets``,
        or the diagonals a ``value_transform`` returns with their values."""
        values = self.effective_values()
        return values if isinstance(values, tuple) else (values, self.offsets)

    def values_from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        if self.input_permutation is not None:
            weight = weight[:, self.input_permutation]
        rows, cols = patterns.diag_coordinates(self.offsets, self.out_features,
                                               self.in_features)
        return weight[rows, cols].to(self.values.dtype)

    def kept_mask(self) -> torch.Tensor:
        rows, cols = patterns.diag_coordinates(self.offsets, self.out_features,
                                               self.in_features)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.offsets.device)
        mask[rows, cols] = True
        return self._to_inputs(mask)

    def dense_weight(self) -> torch.Tensor:
        values, offsets = self.effective()
        return self._to_inputs(patterns.diag_to_dense(values.detach(), offsets,
                                                      self.out_features, self.in_features))
