"""``FanInLinear``: exactly k inputs per output row, optionally N:M
(``torch.ops.sparsefx.fanin_linear``)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparsefx.kernels import patterns
from .base import _DENSE_WEIGHT, SparseLinear, _check_init


class FanInLinear(SparseLinear):
    """``y = x @ W.T + b`` with every output row keeping ``k`` inputs: ``values [out, k]``
    (a parameter) at ``indices [out, k]`` (a buffer, rewritten in place by DST). With
    ``nm=(n, m)`` each row holds ``n`` entries in every group of ``m`` inputs."""

    growth_granularity = "rows"

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None, nm: tuple[int, int] | None = None):
        super().__init__(in_features, values.shape[0], bias)
        if nm is None:
            patterns.check_fanin_indices(indices, in_features)
        else:
            patterns.check_nm_indices(indices, in_features, *nm)
        self.nm = None if nm is None else tuple(nm)
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("indices", indices.detach().to(
            patterns.fanin_index_dtype(in_features)).clone())
        # the weights a resize may spread over the rows (allow_resize);
        # None: the fan-in is fixed, and a checkpoint must have the layer's own
        self.fan_in_budget: int | None = None

    def allow_resize(self, budget: int | None) -> None:
        """Let a resize spread ``budget`` weights over the rows (SRigL's ``fan_in="budget"``;
        a checkpoint of another fan-in then loads); ``None``: the fan-in is fixed."""
        self.fan_in_budget = budget

    @property
    def resizable(self) -> bool:
        return self.fan_in_budget is not None

    @torch.no_grad()
    def zero_rows(self, rows: torch.Tensor) -> None:
        """Zero the values of the output rows ``rows`` (SRigL's ablated neurons)."""
        self.values.index_fill_(0, rows, 0)

    def resize(self, new_indices: torch.Tensor, source: torch.Tensor) -> None:
        """Hold ``new_indices [out, k']``, each entry continuing the value of the old slot
        ``source`` names (-1: zero). ``values`` stays the same Parameter object with new
        contents (so optimizers keep it; their state is the caller's to carry over) and
        ``indices`` the same buffer: a compiled model recompiles once for the new shape.
        The contents are swapped in whole (``torch.utils.swap_tensors``), autograd's record
        of the parameter included: a graph of an earlier step still alive (a loss kept in a
        variable) would otherwise hand the next backward the old shape."""
        if self.nm is not None:
            raise ValueError(f"layer {self.layer_name}: an N:M layer's fan-in is n * in / m: "
                             "it cannot be resized")
        patterns.check_fanin_indices(new_indices, self.in_features)
        with torch.no_grad():
            old = self.values.detach()
            moved = old.gather(1, source.clamp(min=0)).masked_fill_(source < 0, 0)
            replacement = nn.Parameter(moved, requires_grad=self.values.requires_grad)
            try:
                torch.utils.swap_tensors(self.values, replacement)
            except RuntimeError:  # something holds a weak reference: no graph can be alive
                self.values.data = moved
            self.indices.data = new_indices.to(self.indices.dtype).contiguous()

    def _loads_resized(self, key: str, value: torch.Tensor) -> bool:
        return (self.fan_in_budget is not None and key in ("values", "indices")
                and value.dim() == 2 and value.shape[0] == self.out_features
                and 1 <= value.shape[1] <= self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "indices")
        if (isinstance(saved, torch.Tensor) and saved.shape != self.indices.shape
                and self._loads_resized("indices", saved) and not self.values.is_meta):
            self.check_state(state_dict, prefix, strict)
            fan_in = saved.shape[1]
            columns = torch.arange(fan_in, device=self.indices.device).expand(
                self.out_features, -1)
            self.resize(columns, torch.full_like(columns, -1))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def pattern(self) -> str:
        return "fanin" if self.nm is None else "nm"

    @property
    def pattern_label(self) -> str:
        return "fanin" if self.nm is None else f"nm {self.nm[0]}:{self.nm[1]}"

    @property
    def group_size(self) -> int | None:
        return None if self.nm is None else self.nm[1]

    @property
    def grows_from_lists(self) -> bool:  # N:M regrows within groups: all scores needed
        return self.nm is None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   sparsity: float | None = None, nm: tuple[int, int] | None = None,
                   init: str = "magnitude",
                   generator: torch.Generator | None = None) -> FanInLinear:
        """Keep ``fanin_num_kept(in, sparsity)`` entries per row of ``weight`` -- or, with
        ``nm=(n, m)``, ``n`` of every ``m`` -- the largest in magnitude
        (``init="magnitude"``) or at random (``init="random"``)."""
        _check_init(init)
        if (sparsity is None) == (nm is None):
            raise ValueError(f"sparsity={sparsity!r}, nm={nm!r}: expected exactly one of them")
        out_features, in_features = weight.shape
        weight = weight.detach()
        if init == "random":
            scores = torch.rand(weight.shape, generator=generator).to(weight.device)
        else:
            scores = weight
        if nm is None:
            _, indices = patterns.dense_to_fanin(scores, patterns.fanin_num_kept(in_features,
                                                                                 sparsity))
        else:
            _, indices = patterns.dense_to_nm(scores, *nm)
        values = weight.gather(1, indices.to(torch.int64))
        return cls(values, indices, in_features, bias, nm)

    @property
    def stored(self) -> int:
        return self.values.numel()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self._tap(torch.ops.sparsefx.fanin_linear(x, self.values, self.indices,
                                                         self._bias(bias)), x)

    weight = _DENSE_WEIGHT

    structure_name = "indices"

    def check_structure(self, structure: torch.Tensor) -> None:
        if self.nm is None:
            patterns.check_fanin_indices(structure, self.in_features)
        else:
            patterns.check_nm_indices(structure, self.in_features, *self.nm)

    def saved_options(self) -> dict:
        return {**super().saved_options(), "nm": None if self.nm is None else list(self.nm)}

    @classmethod
    def from_saved(cls, tensors, options) -> FanInLinear:
        nm = options.get("nm")
        return cls(tensors["values"], tensors["indices"], options["in_features"],
                   tensors.get("bias"), None if nm is None else tuple(nm))

    def slots(self, rows: slice | None = None) -> torch.Tensor:
        return (self.indices if rows is None else self.indices[rows]).to(torch.int64)

    @property
    def slot_shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)

    def new_slots(self) -> torch.Tensor:
        return torch.empty_like(self.indices)

    def unit_magnitudes(self, active: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
        return (self.values if rows is None else self.values[rows]).detach().abs()

    @property
    def num_candidates(self) -> int:
        return self.in_features

    def active_units(self, rows: int | None = None) -> int:
        return (self.out_features if rows is None else rows) * self.indices.shape[1]

    def growth_plan(self, alpha: float, per_row: int | None = None,
                    layer_wide: bool = False) -> list[int]:
        if self.nm is not None:  # every group's order: all an N:M regrowth compares
            return [0, self.nm[1], 0]
        fan_in = self.indices.shape[1]
        inactive_per_row = self.in_features - fan_in
        most = max(math.ceil(alpha * fan_in), per_row or 0)
        layer_list = math.ceil(alpha * self.indices.numel()) if layer_wide else 0
        return [min(most, inactive_per_row), 0,
                min(layer_list, self.out_features * inactive_per_row)]

    def write_structure(self, new_active: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        self.indices.copy_(new_active.to(self.indices.dtype))
        return grown

    def describe(self, rows: int | None = None) -> str:
        return (f"{self.pattern_label} ({self.out_features}, {self.in_features}): fan-in "
                f"{self.indices.shape[1]}, {self.active_units(rows)} entries")

    def values_from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.gather(1, self.indices.long()).to(self.values.dtype)

    def kept_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.indices.device)
        return mask.scatter_(1, self.indices.long(), True)

    def dense_weight(self) -> torch.Tensor:
        return patterns.fanin_to_dense(self.values.detach(), self.indices, self.in_features)
