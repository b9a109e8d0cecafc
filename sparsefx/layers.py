"""Sparse linear layers: each owns its ``values`` and structure buffers and calls one op.

* ``DiagLinear``   -- K whole wrap-around diagonals (``torch.ops.sparsefx.diag_linear``);
* ``FanInLinear``  -- exactly k inputs per output row, optionally N:M
  (``torch.ops.sparsefx.fanin_linear``);
* ``MaskedLinear`` -- a dense weight times a 0/1 mask: the unstructured baseline, not
  accelerated.

Each builds from a dense weight with ``from_dense``: ``init="magnitude"`` keeps the
largest-magnitude diagonals / entries, so a pretrained layer can be sparsified;
``init="random"`` draws the structure at random and keeps the dense values there, as RigL
does when training from scratch. ``random(...)`` does the latter from ``nn.Linear``'s
initialisation. ``dense_weight()`` / ``to_dense()`` go back. The structure math is
``sparsefx.kernels.patterns``'; nothing here re-derives it.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsefx.kernels import _structure_cache, growth, patterns

__all__ = ["DiagLinear", "BlockDiagLinear", "FanInLinear", "MaskedLinear", "SPARSE_LAYERS",
           "soft_top_k_gates"]

_INITS = ("magnitude", "random")


def _check_init(init: str) -> None:
    if init not in _INITS:
        raise ValueError(f"init={init!r}: expected one of {_INITS}")


def _linear_init(in_features: int, out_features: int, bias: bool, device, dtype):
    """``nn.Linear``'s default initialisation: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    uniform = lambda *shape: torch.empty(*shape, device=device, dtype=dtype).uniform_(-bound,
                                                                                      bound)
    return uniform(out_features, in_features), uniform(out_features) if bias else None


class DenseLinear(nn.Linear):
    """``nn.Linear`` that, like the sparse layers, also takes a bias at call time: what
    ``to_dense`` / ``sparsefx.densify`` put where a rewritten graph passes a functional
    site's bias (GPT-2's Conv1D) to the layer."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None and self.bias is not None:
            raise ValueError("DenseLinear: a bias was passed to forward, but the layer has its "
                             "own: expected one of them")
        return F.linear(x, self.weight, self.bias if bias is None else bias)


_DENSE_WEIGHT = property(
    lambda self: self.dense_weight(),
    doc="""The dense ``[out, in]`` weight the layer computes with (built on each read, no
    gradient), for code that reads ``.weight`` of a layer it holds: tying checks, dtype and
    device reads, fused paths. What trains is ``values``.""")


def _described_by_keys(keys) -> str:
    """What layer a checkpoint's entries for one module describe, from their names."""
    keys = set(keys)
    if "offsets" in keys:
        return "a diag or blockdiag layer"
    if "indices" in keys:
        return "a fanin or N:M layer"
    if "mask" in keys:
        return "an unstructured layer"
    if "weight" in keys:
        return "a dense layer"
    return "no layer"


class _SparseLinear(nn.Module, abc.ABC):
    """What the three layers share: shapes, bias, the report numbers and densifying. Each
    layer defines ``pattern``, ``stored`` (weights kept) and ``dense_weight()``.

    ``_growth_probe`` is ``None`` except on the steps where ``sparsefx.DST`` needs the dense
    gradient: then the output goes through ``torch.ops.sparsefx.growth_tap``, which leaves
    the layer's growth scores in the probe's gradient (see ``sparsefx.kernels.growth``).
    """

    pattern: str
    growth_granularity: str  # how sparsefx.kernels.growth reduces this layer's scores

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._growth_probe: torch.Tensor | None = None
        self._growth_plan: list[int] = [0, 0, 0]
        # built on the meta device (sparsefx.transform): the structure as drawn on the CPU,
        # written into the buffers when they leave meta
        self._drawn_on_cpu: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------- loading a checkpoint

    structure_name: str  # the buffer holding the structure

    @abc.abstractmethod
    def check_structure(self, structure: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``structure`` is a valid structure for this layer."""

    def _stored_in(self, state: dict[str, torch.Tensor]) -> int:
        """Weights kept by the layer ``state`` (its own keys) describes."""
        return state["values"].numel()

    def check_state(self, state_dict: dict, prefix: str = "", strict: bool = True) -> None:
        """Raise a ``ValueError`` naming the layer (``prefix``) and what differs unless the
        entries of ``state_dict`` under ``prefix`` fit this layer: the same pattern, shapes
        and sparsity, a valid structure. Nothing is loaded."""
        name = prefix[:-1] if prefix.endswith(".") else (prefix or type(self).__name__)
        own = self.state_dict()
        saved = {key[len(prefix):]: value for key, value in state_dict.items()
                 if key.startswith(prefix) and "." not in key[len(prefix):]}
        structures = {"offsets", "indices", "mask"}
        missing = [key for key in own if key not in saved]
        foreign = [key for key in saved if key not in own and key in structures | {"weight"}]
        if foreign or (strict and missing and saved):
            raise ValueError(
                f"layer {name}: the checkpoint holds {_described_by_keys(saved)} here (keys "
                f"{sorted(saved)}), but this model has a {self.pattern_label} layer (keys "
                f"{sorted(own)}): transform the model as the checkpoint's was transformed")
        if strict and missing:
            raise ValueError(f"layer {name}: the checkpoint has no entries for it (expected "
                             f"{sorted(own)} under {prefix!r})")
        for key, value in saved.items():
            if key not in own:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"layer {name}: {key} in the checkpoint is a "
                                 f"{type(value).__name__}: expected a tensor")
            if value.shape != own[key].shape and not self._loads_resized(key, value):
                sparsities = ""
                if key in ("values", self.structure_name) and self.structure_name in saved:
                    theirs = 1.0 - self._stored_in(saved) / (self.out_features
                                                             * self.in_features)
                    sparsities = (f"; the checkpoint's layer is {theirs:.1%} sparse, this one "
                                  f"{self.sparsity:.1%}: made at another sparsity?")
                raise ValueError(f"layer {name}: {key} has shape {tuple(value.shape)} in the "
                                 f"checkpoint and {tuple(own[key].shape)} here{sparsities}")
        structure = saved.get(self.structure_name)
        if structure is not None:
            if structure.is_floating_point() or structure.is_complex():
                raise ValueError(f"layer {name}: {self.structure_name} in the checkpoint is "
                                 f"{structure.dtype}: expected an integer or bool tensor")
            # once per structure tensor as it is: a transformed model's load_state_dict
            # checks every layer first (checkpoint.check_state_dict), then each layer again
            key = ("loadable", type(self), self.out_features, self.in_features,
                   getattr(self, "groups", None), getattr(self, "nm", None))
            try:
                _structure_cache.derived(structure, key,
                                         lambda: self.check_structure(structure))
            except ValueError as error:
                raise ValueError(f"layer {name}: the checkpoint's {self.structure_name} are not "
                                 f"a valid {self.pattern_label} structure: {error}") from None

    def _loads_resized(self, key: str, value: torch.Tensor) -> bool:
        """Whether the checkpoint's ``key`` may differ in shape from the layer's own, the
        layer resizing itself to load it (a fan-in layer whose SRigL run changed its
        fan-in)."""
        return False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not self.param.is_meta:  # on meta, to_empty has yet to make real tensors
            self.check_state(state_dict, prefix, strict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep of the layer: everything
        but the growth probe of a step ``sparsefx.DST`` armed. A copy belongs to no manager,
        so it must never route its backwards through the tap (the dense gradient formed
        every step, for nothing)."""
        state = super().__getstate__()
        if state.get("_growth_probe") is not None:
            state = {**state, "_growth_probe": None}
        return state

    def _readable(self, name: str) -> torch.Tensor:
        """The structure buffer ``name``, or while the layer is on the meta device the copy
        drawn on the CPU (for the numbers a report prints)."""
        return getattr(self, name) if self._drawn_on_cpu is None else self._drawn_on_cpu[name]

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``to_empty``, ``cuda``, ...), and on leaving the
        meta device (``to_empty``) the structure drawn at transform time, so the layer is
        never left with an uninitialised structure (its values are, as after any
        ``to_empty``, until they are loaded or initialised)."""
        module = super()._apply(fn, recurse)
        drawn = self._drawn_on_cpu
        if drawn is not None and not self.param.is_meta:
            with torch.no_grad():
                for name, structure in drawn.items():
                    getattr(self, name).copy_(structure)
            self._drawn_on_cpu = None
        return module

    @property
    def layer_name(self) -> str:
        """The layer's name in the model ``sparsefx.transform`` made (its class name for a
        layer built directly), for error messages."""
        return getattr(self, "_sparsefx_name", None) or type(self).__name__

    def _check_input(self, x) -> None:
        """The input's type and width, named after the layer (the ops check the rest)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {self.layer_name}: x is a {type(x).__name__}: expected a "
                            "torch.Tensor")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.layer_name}: x has shape {tuple(x.shape)}: expected "
                             f"a last dimension of in_features = {self.in_features}")

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias to add: ``self.bias``, or one passed to ``forward`` by a rewritten graph
        whose bias stays a parameter of its own (a functional site such as GPT-2's Conv1D:
        the op adds it in the same pass instead of a separate ``add``)."""
        if bias is None:
            return self.bias
        if self.bias is not None:
            raise ValueError(f"{type(self).__name__}: a bias was passed to forward, but the "
                             "layer has its own: expected one of them")
        return bias

    # ------------------------------------------------------- what sparsefx.DST reads
    #
    # DST sees every layer as rows of slots (``sparsefx.regrow``): ``slots()`` gives the
    # active unit ids ``[R, k]`` out of ``num_candidates`` per row. Each layer says what its
    # units weigh, how the growth tap lists their candidates, and writes a new structure.

    group_size: int | None = None  # N:M: candidates regrow within groups of this many
    grows_from_lists = False       # RigL grows from the tap's lists, not all-candidate scores

    @property
    def pattern_label(self) -> str:
        """The pattern as reports print it (``"nm 2:4"``; otherwise ``pattern``)."""
        return self.pattern

    @property
    def param(self) -> nn.Parameter:
        """The trained weights whose optimizer state DST zeroes for grown units."""
        return self.values

    @abc.abstractmethod
    def slots(self, rows: slice | None = None) -> torch.Tensor:
        """Active unit ids as rows of slots ``[R, k]`` (int64); ``rows``: only those."""

    @property
    def slot_shape(self) -> tuple[int, int]:
        """``slots().shape``, without forming them."""
        return tuple(self.slots().shape)

    def new_slots(self) -> torch.Tensor:
        """An empty ``[R, k]`` for a new structure, in a dtype ``write_structure`` stores
        without a copy."""
        return self.slots().new_empty(self.slot_shape)

    @abc.abstractmethod
    def unit_magnitudes(self, active: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
        """``[R, k]``: what drop ranks for the units ``active`` (``slots(rows)``)."""

    @property
    @abc.abstractmethod
    def num_candidates(self) -> int:
        """Candidate units per row of slots."""

    def active_units(self, rows: int | None = None) -> int:
        """Active units (diagonals, entries or elements); ``rows``: how many rows are live
        (SRigL's ablation), default all."""
        return self.stored

    def growth_plan(self, alpha: float, per_row: int | None = None,
                    layer_wide: bool = False) -> list[int]:
        """The growth tap's lists ``[per_row, group_size, layer_wide]`` (see
        ``sparsefx.kernels.growth``), long enough for everything an update moving at most
        ``alpha`` of the units could grow, and never longer than the inactive candidates
        there are; ``per_row``: how many a row may grow at most, if more than that (SRigL's
        refill); ``layer_wide``: the layer-wide list is needed too (SRigL's salience)."""
        return [0, 0, 0]

    def growth_scores(self, probe_grad: torch.Tensor, rows: slice | None = None
                      ) -> torch.Tensor:
        """``[R, C]`` growth scores over every candidate from the tap's ``probe_grad`` (only
        ``rows`` of them, if given)."""
        return growth.candidate_scores(probe_grad, self.structure, self.growth_granularity,
                                       self._growth_plan, self.out_features,
                                       self.in_features, rows)

    def random_scores(self, generator: torch.Generator, rows: slice | None = None
                      ) -> torch.Tensor:
        """``[R, C]`` uniform scores (SET's random growth) of the slot rows ``rows`` (default
        all), drawn on the CPU by ``generator``."""
        count = len(range(self.out_features)[rows or slice(None)])
        scores = torch.rand(count, self.in_features, generator=generator)
        return scores.to(self.param.device)

    def listed_candidates(self, listed: growth.Listed, active: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidate_ids, scores)`` rows for ``regrow.drop_and_grow``: the slots, then
        the inactive candidates the tap listed."""
        return listed.row_candidates(active)

    @abc.abstractmethod
    def write_structure(self, new_active: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        """Store ``new_active [R, k]`` in place; return where (shaped like ``param``) the
        weights and their optimizer state are to be zeroed."""

    @abc.abstractmethod
    def describe(self, rows: int | None = None) -> str:
        """One line on the structure, as ``DST``'s ``repr`` prints it (``rows``: as for
        ``active_units``)."""

    def _tap(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._growth_probe is None:
            return y
        return torch.ops.sparsefx.growth_tap(y, x, self._growth_probe, self.structure,
                                             self.growth_granularity, self._growth_plan)

    @classmethod
    def random(cls, in_features: int, out_features: int, bias: bool = True, *,
               generator: torch.Generator | None = None, device=None, dtype=None, **structure):
        """A fresh layer for training from scratch: ``nn.Linear``'s initialisation, then a
        random structure (``structure`` as for ``from_dense``: ``sparsity=`` or ``nm=``)."""
        weight, bias_values = _linear_init(in_features, out_features, bias, device, dtype)
        return cls.from_dense(weight, bias_values, init="random", generator=generator,
                              **structure)

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight's entries not stored."""
        return 1.0 - self.stored / (self.in_features * self.out_features)

    def saved_options(self) -> dict:
        """What ``from_saved`` needs beyond the layer's tensors (``sparsefx.save``)."""
        return {"class": type(self).__name__, "out_features": self.out_features,
                "in_features": self.in_features}

    @classmethod
    @abc.abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], options: dict) -> _SparseLinear:
        """The layer ``saved_options()`` and its own ``tensors`` (its state dict) describe;
        the constructor checks the structure."""

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing exactly what this layer computes (one that also takes
        ``forward(x, bias=...)``, as this layer does)."""
        weight = self.dense_weight()
        linear = DenseLinear(self.in_features, self.out_features, bias=self.bias is not None,
                             device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern_label}, "
                f"sparsity={self.sparsity:.1%}")


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


class DiagLinear(_SparseLinear):
    """``y = x @ W.T + b`` with ``W`` keeping ``K`` whole diagonals: ``values [K, L]`` (a
    parameter) on ``offsets [K]`` (an int64 buffer, rewritten in place by DST)."""

    pattern = "diag"
    growth_granularity = "diagonals"

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
        y = torch.ops.sparsefx.diag_linear(x, values, offsets, self.out_features,
                                           self._bias(bias))
        return self._tap(y, x)

    weight = _DENSE_WEIGHT

    structure_name = "offsets"

    @property
    def structure(self) -> torch.Tensor:
        return self.offsets

    def check_structure(self, structure: torch.Tensor) -> None:
        patterns.check_diag_offsets(structure, self.out_features, self.in_features)

    @classmethod
    def from_saved(cls, tensors, options) -> DiagLinear:
        return cls(tensors["values"], tensors["offsets"], options["out_features"],
                   options["in_features"], tensors.get("bias"))

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

    def dense_weight(self) -> torch.Tensor:
        values, offsets = self.effective()
        return patterns.diag_to_dense(values.detach(), offsets, self.out_features,
                                      self.in_features)


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
        return cls(tensors["values"], tensors["offsets"], options["out_features"],
                   options["in_features"], options["groups"], tensors.get("bias"))

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


class FanInLinear(_SparseLinear):
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
        # the weights a resize may spread over the rows (SRigL's fan_in="budget" sets it);
        # None: the fan-in is fixed, and a checkpoint must have the layer's own
        self.fan_in_budget: int | None = None

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

    @property
    def structure(self) -> torch.Tensor:
        return self.indices

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

    def dense_weight(self) -> torch.Tensor:
        return patterns.fanin_to_dense(self.values.detach(), self.indices, self.in_features)


class MaskedLinear(_SparseLinear):
    """``y = x @ (W * mask).T + b``: unstructured sparsity as a dense weight and a 0/1 mask
    (the accuracy baseline for RigL/SET; no faster than dense)."""

    pattern = "unstructured"
    growth_granularity = "elements"

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}: expected "
                             f"{tuple(weight.shape)}, the shape of the weight")
        self.register_buffer("mask", mask.detach().to(dtype=torch.bool).clone())
        self.weight = nn.Parameter((weight.detach() * self.mask).clone())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   sparsity: float, init: str = "magnitude",
                   generator: torch.Generator | None = None) -> MaskedLinear:
        """Keep the ``round((1 - sparsity) * out * in)`` largest-magnitude entries of the whole
        layer (``init="magnitude"``) or as many at random (``init="random"``)."""
        _check_init(init)
        weight = weight.detach()
        kept = patterns.unstructured_num_kept(weight.numel(), sparsity)
        if init == "random":
            scores = torch.rand(weight.shape, generator=generator).to(weight.device)
        else:
            scores = weight.abs()
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[scores.reshape(-1).topk(kept).indices] = True
        return cls(weight, mask.reshape(weight.shape), bias)

    @property
    def stored(self) -> int:
        return int(self._readable("mask").sum())

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self._tap(F.linear(x, self.weight * self.mask, self._bias(bias)), x)

    grows_from_lists = True

    structure_name = "mask"

    @property
    def structure(self) -> torch.Tensor:
        return self.mask

    def check_structure(self, structure: torch.Tensor) -> None:
        if structure.shape != self.weight.shape:
            raise ValueError(f"mask has shape {tuple(structure.shape)}: expected "
                             f"{tuple(self.weight.shape)}")

    def _stored_in(self, state: dict[str, torch.Tensor]) -> int:
        return int(state["mask"].sum())

    @classmethod
    def from_saved(cls, tensors, options) -> MaskedLinear:
        return cls(tensors["weight"], tensors["mask"], tensors.get("bias"))

    @property
    def param(self) -> nn.Parameter:
        return self.weight

    def slots(self, rows: slice | None = None) -> torch.Tensor:
        return self.mask.reshape(1, -1).nonzero()[:, 1][None, :]  # one row

    def unit_magnitudes(self, active: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
        return self.weight.detach().reshape(1, -1).gather(1, active).abs()

    @property
    def num_candidates(self) -> int:
        return self.out_features * self.in_features

    def growth_plan(self, alpha: float, per_row: int | None = None,
                    layer_wide: bool = False) -> list[int]:
        stored = self.stored
        return [0, 0, min(math.ceil(alpha * stored), self.num_candidates - stored)]

    def growth_scores(self, probe_grad: torch.Tensor, rows: slice | None = None
                      ) -> torch.Tensor:
        return super().growth_scores(probe_grad).reshape(1, -1)

    def random_scores(self, generator: torch.Generator, rows: slice | None = None
                      ) -> torch.Tensor:
        return super().random_scores(generator).reshape(1, -1)

    def listed_candidates(self, listed: growth.Listed, active: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        return listed.layer_candidates(active, self.in_features)  # layer-wide, flat ids

    def random_candidates(self, generator: torch.Generator, active: torch.Tensor, count: int,
                          block: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidate_ids, scores) [1, K + count]`` for ``regrow.drop_and_grow``: the
        active elements ``active [1, K]`` and the ``count`` inactive ones of largest score,
        every element scored uniformly at random by ``generator`` (on the CPU, ``block`` at
        a time: the layer's worth of scores is never held). The ``count`` best of what is
        not kept are then among these, so growing them is growing uniformly at random."""
        flat_mask = self.mask.detach().reshape(-1).cpu()
        active_scores = torch.empty(active.shape[1])
        pool, filled = growth.LayerPool(count), 0
        for start in range(0, flat_mask.numel(), block):
            scores = torch.rand(min(block, flat_mask.numel() - start), generator=generator)
            held = flat_mask[start:start + block]
            stored = int(held.sum())
            active_scores[filled:filled + stored] = scores[held]
            filled += stored
            pool.add(scores.masked_fill_(held, float("-inf")), start)
        ids, scores = pool.best()
        device = active.device
        return (torch.cat([active, ids[None, :].to(device)], dim=1),
                torch.cat([active_scores, scores])[None, :].to(device))

    def write_structure(self, new_active: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        new_mask = torch.zeros_like(self.mask).view(-1).scatter_(
            0, new_active[0], True).view_as(self.mask)
        changed = new_mask != self.mask
        self.mask.copy_(new_mask)
        return changed

    def describe(self, rows: int | None = None) -> str:
        return f"unstructured ({self.out_features}, {self.in_features}): {self.stored} elements"

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.mask


SPARSE_LAYERS = (DiagLinear, FanInLinear, MaskedLinear)  # BlockDiagLinear is a DiagLinear
