"""SRigL (Lasby et al., ICLR 2024) on fan-in layers: constant fan-in RigL with neuron
ablation, as its reference code (``RigLConstFanScheduler``) defines it. At an update moving
the fraction ``f`` of a layer with ``A`` live rows of fan-in ``k``:

1. **Drop** the ``n = round(f * A * k)`` smallest magnitudes *layer-wide* (``drop="layer"``;
   a row may lose none or all of its entries), or ``round(f * k)`` in every row
   (``drop="row"``, sparsefx 0.1's rule).
2. **Salience** (layers that may ablate): a row's salient entries are the union of its kept
   entries and its share of the grow set, the ``n`` largest ``|G|`` over *every* position
   of the layer, kept ones included. A row with fewer than ``max(1, floor(gamma_sal * k0))``
   salient entries is ablated (``k0``: the fan-in the layer started with), but at least
   ``min_rows = budget // in + 1`` rows stay live: should fewer pass, the threshold drops to
   the salience of the ``min_rows``-th most salient row. Rows revive the same way (an
   ablated row with enough of the grow set is live again). The output head
   (``output_layers``, by default the last sparse layer) is never ablated.
3. **Fan-in**: the live rows share the layer's parameter budget ``out * k0``, so the fan-in
   becomes ``budget // A'`` (``fan_in="budget"``: 16 -> 18 with 5 of 32 rows ablated), or
   stays ``k0`` (``fan_in="fixed"``, sparsefx 0.1). A row's fan-in grows to at most
   ``max_fan_in * k0``: ablation stops at the rows that keeps live (the reference lets the
   fan-in grow to the dense one; the growth tap lists that many candidates per row, so the
   cap bounds its memory).
4. **Refill** each live row to the new fan-in with the best ``|G|`` among its positions not
   kept (a dropped entry grown back keeps its value); ablated rows hold zeros.

A fan-in change resizes the layer's ``values`` and ``indices`` (the same Parameter, its
optimizer state carried over): a compiled model recompiles once for it.
DistributedDataParallel and FSDP2 fix parameter sizes, so under ``torch.distributed`` the
default (``fan_in=None``) is ``"fixed"``, with a warning, and ``fan_in="budget"`` is
refused. Counts round where the reference truncates (``int()``); where it keeps arbitrary
entries of a row holding more than the new fan-in, the largest are kept here.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch

from sparsefx import regrow
from sparsefx.layers import FanInLinear
from sparsefx.model_info import info_of

from .base import Method

DROPS = ("layer", "row")
FAN_INS = ("budget", "fixed")


@dataclass
class SRigL(Method):
    gamma_sal: float = 0.3       # salience threshold, a fraction of the starting fan-in
    output_layers: tuple[str, ...] | None = None  # regexes of layers never ablated;
    #                              None: the last sparse layer; (): none
    drop: str = "layer"          # "layer": the n smallest layer-wide; "row": in every row
    fan_in: str | None = None    # "budget": live rows share the parameters; "fixed": k0;
    #                              None: "budget" in one process, "fixed" distributed
    max_fan_in: float = 2.0      # the largest fan-in ablation gives a row, times k0
    name = "srigl"
    option_names = ("gamma_sal", "output_layers", "drop", "fan_in", "max_fan_in")
    # what a checkpoint from before these options existed was made with
    legacy_options = {"drop": "row", "fan_in": "fixed", "max_fan_in": 2.0}
    needs_gradient = True
    row_active: dict[str, torch.Tensor] = field(init=False, repr=False)  # [out] bool
    budget: dict[str, int] = field(init=False, repr=False)  # out * k0 per layer
    _ablate: set[str] = field(init=False, repr=False)  # layers whose rows may be ablated
    _ablated_rows: dict[str, torch.Tensor] = field(init=False, repr=False)  # ids, if any

    def __post_init__(self):
        if not 0 <= self.gamma_sal <= 1:
            raise ValueError(f"sparsefx.DST: gamma_sal={self.gamma_sal!r}: expected "
                             "0 <= gamma_sal <= 1")
        if self.drop not in DROPS:
            raise ValueError(f"sparsefx.SRigL: drop={self.drop!r}: expected one of {DROPS}")
        if self.fan_in is not None and self.fan_in not in FAN_INS:
            raise ValueError(f"sparsefx.SRigL: fan_in={self.fan_in!r}: expected one of "
                             f"{FAN_INS}")
        if not self.max_fan_in >= 1:
            raise ValueError(f"sparsefx.SRigL: max_fan_in={self.max_fan_in!r}: expected >= 1 "
                             "(a multiple of the layer's starting fan-in)")
        self.row_active, self.budget, self._ablate, self._ablated_rows = {}, {}, set(), {}
        self._fan_in = self.fan_in or "budget"  # the rule in force (attach settles None)

    def works_on(self, pattern) -> bool:  # a fan-in of its own per row: not N:M's groups
        return issubclass(pattern.layer, FanInLinear) and not pattern.takes_nm

    def options(self) -> dict:  # the checkpoint's settings (output_layers: in the layers)
        return {"gamma_sal": self.gamma_sal, "drop": self.drop, "fan_in": self._fan_in,
                "max_fan_in": self.max_fan_in}

    def attach(self, ctx) -> None:
        heads = _output_layers(ctx.model, [layer.name for layer in ctx.layers],
                               self.output_layers)
        for layer in ctx.layers:
            module = layer.module
            self.row_active[layer.name] = torch.ones(module.out_features, dtype=torch.bool,
                                                     device=layer.param.device)
            self.budget[layer.name] = module.indices.numel()
            if layer.name not in heads:
                self._ablate.add(layer.name)
        if ctx.world > 1 and self._ablate:
            if self.fan_in == "budget":
                raise ValueError("sparsefx.DST: SRigL(fan_in='budget') resizes a layer's "
                                 "values when ablation changes its fan-in, and "
                                 "DistributedDataParallel and FSDP fix parameter sizes: under "
                                 "torch.distributed use SRigL(fan_in='fixed') (ablated rows' "
                                 "parameters then go unused)")
            if self.fan_in is None:
                warnings.warn("sparsefx.SRigL: under torch.distributed the fan-in stays fixed "
                              "(fan_in='fixed'): DistributedDataParallel and FSDP cannot "
                              "follow a layer resized to share an ablated row's parameters",
                              stacklevel=4)
                self._fan_in = "fixed"
        for layer in ctx.layers:  # a checkpoint of a resized layer loads into this one
            layer.module.allow_resize(self.budget[layer.name] if self.resizes else None)

    @property
    def resizes(self) -> bool:
        return self._fan_in == "budget"

    def may_ablate(self, layer) -> bool:
        return layer.name in self._ablate

    def _largest_fan_in(self, layer) -> int:
        """The largest fan-in a row of ``layer`` may get."""
        module = layer.module
        start = self.budget[layer.name] // module.out_features
        if not (self.resizes and self.may_ablate(layer)):
            return start
        return min(module.in_features, math.floor(self.max_fan_in * start))

    def growth_needs(self, layer) -> dict:
        # a row may lose all its entries (layer-wide drop) and refill to the largest fan-in;
        # the salience counts need the layer's best positions
        return {"per_row": self._largest_fan_in(layer), "layer_wide": self.may_ablate(layer)}

    def live_rows(self, layer) -> int | None:
        return int(self.row_active[layer.name].sum())

    @property
    def writes_between_updates(self) -> bool:
        return bool(self._ablated_rows)

    def between_updates(self, ctx) -> None:
        """Ablated rows stay exactly zero, whatever the optimizer did to them: every step,
        one write of those rows per layer that has some. (Their optimizer state may drift
        meanwhile; a row that comes back is grown, which zeroes its state.)"""
        if self._ablated_rows:
            with torch.no_grad():
                for layer in ctx.layers:
                    rows = self._ablated_rows.get(layer.name)
                    if rows is not None:
                        layer.module.zero_rows(rows)

    def update_layer(self, ctx, layer, fraction: float) -> bool:
        module = layer.module
        active = module.slots()
        rows, fan_in = active.shape
        row_active = self.row_active[layer.name]
        magnitude = module.unit_magnitudes(active)
        live = int(row_active.sum())
        if self.drop == "layer":
            num_dropped = layer.units_moved(live * fan_in)
            kept = regrow.layerwise_drop(magnitude, row_active, num_dropped)
        else:
            per_row = min(layer.units_moved(fan_in), module.num_candidates - fan_in)
            num_dropped = live * per_row
            kept = regrow.rowwise_drop(magnitude, row_active, per_row)
        if num_dropped == 0 and layer.name not in self._ablated_rows:
            return False
        listed = layer.lists()
        new_row_active = row_active
        start_fan_in = self.budget[layer.name] // rows
        minimum = max(1, math.floor(self.gamma_sal * start_fan_in))
        # with no row ablated, a row can fall below the minimum only if it keeps too little
        if self.may_ablate(layer) and (layer.name in self._ablated_rows
                                       or int(kept.sum(dim=1).min()) < minimum):
            salient = regrow.salience(kept, active, listed.active, listed.layer_wide,
                                      module.in_features, num_dropped)
            fewest = self.budget[layer.name] // module.in_features + 1
            if self.resizes:  # no fan-in beyond the largest the tap lists candidates for
                fewest = max(fewest, -(-self.budget[layer.name] // self._largest_fan_in(layer)))
            new_row_active = regrow.live_rows(salient, minimum, fewest)
        new_fan_in = (self.budget[layer.name] // int(new_row_active.sum()) if self.resizes
                      else fan_in)
        new_active = active.new_empty(rows, new_fan_in)
        source = torch.empty_like(new_active)
        width = layer.listed(active[:1], slice(0, 1))[0].shape[1]
        # a block of rows at a time, a few MiB each: never a layer's worth of temporaries
        # refill holds about four times the scores' bytes (ids, ranks, a sort): a quarter block
        for block in regrow.row_blocks(rows, fan_in, 4 * width):
            candidate_ids, scores, _ = layer.listed(active[block], block)
            new_active[block], source[block] = regrow.refill(
                active[block], kept[block], magnitude[block], candidate_ids, scores,
                new_row_active[block], new_fan_in, module.num_candidates)
        source[~row_active] = -1  # a revived row's old slots held zeros: all new
        # a unit new to a live row (a dead row's slots are always "new": zeros)
        changed = (new_fan_in != fan_in or not torch.equal(new_row_active, row_active)
                   or bool(((source < 0) & new_row_active[:, None]).any()))
        if changed:
            layer.write_slots(new_active, source)
            self._set_row_active(layer.name, new_row_active)
            ablated = self._ablated_rows.get(layer.name)
            if ablated is not None:
                module.zero_rows(ablated)
        return changed

    def _set_row_active(self, name: str, row_active: torch.Tensor) -> None:
        self.row_active[name].copy_(row_active)
        ablated = (~self.row_active[name]).nonzero()[:, 0]
        if ablated.numel():
            self._ablated_rows[name] = ablated
        else:
            self._ablated_rows.pop(name, None)

    def describe(self, layer) -> str:
        return f", {int((~self.row_active[layer.name]).sum())} rows ablated"

    def state_dict(self) -> dict:
        return {"row_active": {name: rows.clone() for name, rows in self.row_active.items()},
                "fan_in_budget": dict(self.budget)}

    def state_layers(self, state: dict) -> set[str]:
        return set(state.get("row_active", {}))

    def load_state_dict(self, ctx, state: dict) -> None:
        for name, rows in state.get("row_active", {}).items():
            self._set_row_active(name, rows)
        self.budget.update(state.get("fan_in_budget", {}))


def _output_layers(model, names: list[str], given: tuple[str, ...] | None) -> set[str]:
    if given is None:
        info = info_of(model)
        order = [name for name in (info.order if info else names) if name in names]
        return {order[-1] if order else names[-1]}
    if not given:
        return set()
    chosen = {name for name in names for pattern in given if re.fullmatch(pattern, name)}
    if not chosen:
        raise ValueError(f"sparsefx.DST: output_layers={given!r} match none of the sparse "
                         f"layers {names}")
    return chosen
