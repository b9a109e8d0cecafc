"""What every sparse layer shares: construction and init checks, state-dict
validation, the meta device, and the interface DST uses (units, candidates, writes)."""
from __future__ import annotations

import abc
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsefx.kernels import _structure_cache, growth


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


def _structure_names() -> set[str]:
    """The buffers every sparse layer class (subclasses too) holds its structure in."""
    names, classes = set(), [SparseLinear]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if isinstance(getattr(cls, "structure_name", None), str):
            names.add(cls.structure_name)
    return names


class SparseLinear(nn.Module, abc.ABC):
    """What every sparse layer shares: shapes, bias, the report numbers and densifying. Each
    layer defines ``pattern``, ``stored`` (weights kept) and ``dense_weight()``; a pattern
    defined outside sparsefx subclasses this and registers itself
    (``sparsefx.register_pattern``).

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

    resizable = False  # whether DST may change the number of slots (FanInLinear.resize)
    permutable = False  # whether it takes an input permutation (DiagLinear's)
    structure_name: str  # the buffer holding the structure

    @property
    def structure(self) -> torch.Tensor:
        """The structure buffer (``structure_name``) DST rewrites in place."""
        return getattr(self, self.structure_name)

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
        structures = _structure_names()
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
            key = ("loadable", type(self), repr(sorted(self.saved_options().items())))
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
                                       self.tap_plan, self.out_features,
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

    def set_growth_plan(self, plan: list[int]) -> None:
        """The growth tap's lists ``[per_row, group_size, layer_wide]`` this layer's probe is
        sized for (``sparsefx.DST``, when it makes the probe)."""
        self._growth_plan = list(plan)

    @property
    def tap_plan(self) -> list[int]:
        """The plan ``set_growth_plan`` set: how to parse the probe's gradient."""
        return self._growth_plan

    def arm(self, probe: torch.Tensor | None) -> None:
        """Route the next backwards through the growth tap into ``probe`` (``None``: not)."""
        self._growth_probe = probe

    @property
    def armed(self) -> bool:
        return self._growth_probe is not None

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

    @classmethod
    @torch.no_grad()
    def from_scores(cls, weight: torch.Tensor, bias: torch.Tensor | None, scores: torch.Tensor,
                    **structure) -> SparseLinear:
        """The layer of the structure whose kept units hold the largest sum of ``scores``
        (``[out, in]``, >= 0: a calibrated importance per weight), with ``weight``'s values
        there. ``from_dense``'s magnitude rule keeps the units of largest sum of squares (a
        diagonal's or a coset's) or the largest entries of a row, a group or the layer, so on
        ``sqrt(scores)`` it keeps those of largest summed score. ``structure``: as for
        ``from_dense`` (``sparsity=``, ``nm=``, a pattern's options)."""
        chosen = cls.from_dense(scores.float().sqrt(), bias, init="magnitude", **structure)
        chosen = chosen.to(device=weight.device, dtype=weight.dtype)
        chosen.param.copy_(chosen.values_from_dense(weight))
        return chosen

    def values_from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """What the trained parameter holds for the dense ``weight [out, in]`` on this
        layer's structure (``dense_weight`` undoes it)."""
        raise NotImplementedError(f"layer {self.layer_name}: pattern {self.pattern!r} has no "
                                  "values_from_dense: calibrated init needs it")

    def kept_mask(self) -> torch.Tensor:
        """``bool [out, in]``: where the structure keeps a weight."""
        raise NotImplementedError(f"layer {self.layer_name}: pattern {self.pattern!r} has no "
                                  "kept_mask: calibrated init needs it")

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
    def from_saved(cls, tensors: dict[str, torch.Tensor], options: dict) -> SparseLinear:
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
