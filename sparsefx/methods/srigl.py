"""SRigL (Lasby et al., ICLR 2024) on fan-in layers: RigL within each row, plus neuron
ablation. First the layer-wide RigL sets: keep = the largest ``A k - n_total`` magnitudes
over the ``A`` active rows, grow = the ``n_total`` best gradient scores among the positions
not kept. A row whose salient count (entries in keep or grow) is below
``max(1, floor(gamma_sal * k))`` is ablated: its values are set to zero and held there; an
ablated row that becomes salient again returns with its ``k`` best-scoring columns at zero.
The output head (``output_layers``, by default the last sparse layer) is never ablated.
``k`` stays the stored fan-in: the values keep their shape, so the budget is ``A * k``."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from sparsefx import regrow
from sparsefx.kernels import growth

from .base import Method


@dataclass
class SRigL(Method):
    gamma_sal: float = 0.3                   # salience threshold, a fraction of the fan-in
    output_layers: tuple[str, ...] | None = None  # regexes of layers never ablated;
    #                                          None: the last sparse layer; (): none
    name = "srigl"
    option_names = ("gamma_sal", "output_layers")
    patterns = ("fanin",)
    needs_gradient = True
    row_active: dict[str, torch.Tensor] = field(init=False, repr=False)  # [out] bool
    _ablate: set[str] = field(init=False, repr=False)  # layers whose rows may be ablated
    _ablated_rows: dict[str, torch.Tensor] = field(init=False, repr=False)  # ids, if any

    def __post_init__(self):
        if not 0 <= self.gamma_sal <= 1:
            raise ValueError(f"sparsefx.DST: gamma_sal={self.gamma_sal!r}: expected "
                             "0 <= gamma_sal <= 1")
        self.row_active, self._ablate, self._ablated_rows = {}, set(), {}

    def options(self) -> dict:  # the checkpoint's settings (as sparsefx 0.1 recorded them)
        return {"gamma_sal": self.gamma_sal}

    def attach(self, dst) -> None:
        heads = _output_layers(dst.model, [layer.name for layer in dst.layers],
                               self.output_layers)
        for layer in dst.layers:
            self.row_active[layer.name] = torch.ones(layer.module.out_features,
                                                     dtype=torch.bool, device=layer.param.device)
            if layer.name not in heads:
                self._ablate.add(layer.name)

    def may_ablate(self, layer) -> bool:
        return layer.name in self._ablate

    def whole_rows(self, layer) -> bool:
        return self.may_ablate(layer)

    def live_rows(self, layer) -> int | None:
        return int(self.row_active[layer.name].sum())

    @property
    def writes_between_updates(self) -> bool:
        return bool(self._ablated_rows)

    def between_updates(self, dst) -> None:
        """Ablated rows stay exactly zero, whatever the optimizer did to them: every step,
        one write of those rows per layer that has some. (Their optimizer state may drift
        meanwhile; a row that comes back is grown, which zeroes its state.)"""
        if self._ablated_rows:
            with torch.no_grad():
                for layer in dst.layers:
                    rows = self._ablated_rows.get(layer.name)
                    if rows is not None:
                        layer.module.values.index_fill_(0, rows, 0)

    def update_layer(self, dst, layer, fraction: float) -> bool:
        module = layer.module
        active = module.slots()
        row_active, fan_in = self.row_active[layer.name], active.shape[1]
        magnitude = module.unit_magnitudes(active)
        candidate_ids, scores, listed = dst.listed(layer, active)
        num_moved_row = min(round(fraction * fan_in), module.num_candidates - fan_in)
        new_row_active = row_active.clone()
        salient_minimum = max(1, math.floor(self.gamma_sal * fan_in))
        total_moved = round(fraction * int(row_active.sum()) * fan_in)
        # with no row ablated, the salience counts matter only if some row could fall below
        # the minimum: a cheap test rules that out most of the time
        if self.may_ablate(layer) and (layer.name in self._ablated_rows or
                                       not regrow.keeps_at_least(magnitude, total_moved,
                                                                 salient_minimum)):
            listed_scores, listed_rows, _ = listed.layer_wide
            salient = regrow.layerwise_salience(magnitude, row_active, listed.active,
                                                listed_rows, listed_scores, total_moved)
            new_row_active = salient >= salient_minimum
            if not bool(new_row_active.any()):  # never ablate a whole layer
                new_row_active = row_active.clone()
        new_active, grown = regrow.drop_and_grow(active, magnitude, scores, num_moved_row,
                                                 candidate_ids=candidate_ids)
        stay = row_active & new_row_active
        new_active = torch.where(stay[:, None], new_active, active)
        grown = grown & stay[:, None]
        revived = new_row_active & ~row_active
        if bool(revived.any()):  # its best k columns, from its slots and its listed ones
            best = growth.top_ids(scores[revived], fan_in, ordered=False)
            new_active[revived] = candidate_ids[revived].gather(1, best)
            grown[revived] = True
        ablated = row_active & ~new_row_active
        changed = bool(grown.any()) or bool(ablated.any())
        if changed:
            dst.write(layer, new_active, grown)
            self._set_row_active(layer.name, new_row_active)
            rows = self._ablated_rows.get(layer.name)
            if rows is not None:
                module.values.index_fill_(0, rows, 0)
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
        return {"row_active": {name: rows.clone() for name, rows in self.row_active.items()}}

    def load_state_dict(self, dst, state: dict) -> None:
        for name, rows in state.get("row_active", {}).items():
            self._set_row_active(name, rows)


def _output_layers(model, names: list[str], given: tuple[str, ...] | None) -> set[str]:
    if given is None:
        order = [name for name in getattr(model, "_sparsefx_order", names) if name in names]
        return {order[-1] if order else names[-1]}
    if not given:
        return set()
    chosen = {name for name in names for pattern in given if re.fullmatch(pattern, name)}
    if not chosen:
        raise ValueError(f"sparsefx.DST: output_layers={given!r} match none of the sparse "
                         f"layers {names}")
    return chosen
