"""The per-layer report of a transformed model: returned as data, printable as a table."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from sparsefx.layers import SPARSE_LAYERS, MaskedLinear
from sparsefx.model_info import info_of
from sparsefx.passes import analyse

__all__ = ["LayerReport", "Report", "report"]


@dataclass
class LayerReport:
    """One candidate matmul: what it became, or why it stayed dense."""

    name: str
    out_features: int
    in_features: int
    pattern: str              # the layer's pattern_label ("nm 2:4", ...) or "dense"
    sparsity: float
    dense_params: int
    params: int               # weights stored
    dense_flops: int          # per activation row: 2 * out * in
    flops: int                # per activation row, as the layer runs
    note: str = ""            # why a candidate stayed dense
    feeds: tuple[str, ...] = ()  # sparse layers its outputs reach through elementwise ops


class Report(list):
    """A list of ``LayerReport`` rows with totals and a readable ``str``."""

    @property
    def dense_params(self) -> int:
        return sum(row.dense_params for row in self)

    @property
    def params(self) -> int:
        return sum(row.params for row in self)

    def __str__(self) -> str:
        header = ("layer", "shape", "pattern", "sparsity", "params dense -> sparse",
                  "FLOPs/row dense -> sparse", "feeds", "note")
        rows = [(r.name, f"{r.out_features}x{r.in_features}", r.pattern, f"{r.sparsity:.1%}",
                 f"{r.dense_params:,} -> {r.params:,}", f"{r.dense_flops:,} -> {r.flops:,}",
                 ", ".join(r.feeds), r.note) for r in self]
        rows.append(("total", "", "", f"{1 - self.params / max(1, self.dense_params):.1%}",
                     f"{self.dense_params:,} -> {self.params:,}",
                     f"{sum(r.dense_flops for r in self):,} -> {sum(r.flops for r in self):,}",
                     "", ""))
        widths = [max(len(str(cell)) for cell in column)
                  for column in zip(header, *rows, strict=True)]
        line = lambda cells: "  ".join(str(c).ljust(w)
                                       for c, w in zip(cells, widths, strict=True)).rstrip()
        return "\n".join([line(header), line(["-" * w for w in widths])] +
                         [line(r) for r in rows])


def report(model: nn.Module) -> Report:
    """The report of a model returned by ``sparsefx.transform``: every sparse layer as it is
    now (DST may have changed it) and every candidate that stayed dense, with the reason,
    and which sparse layers each one feeds (``passes.analyse.layer_graph``). A compiled
    model reports on the module it wraps."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    graph = analyse.layer_graph(model, SPARSE_LAYERS)
    modules = dict(model.named_modules())
    info = info_of(model)
    stayed_dense = info.dense if info else {}
    order = (info.order if info else None) or [
        name for name, module in modules.items() if isinstance(module, SPARSE_LAYERS)]
    rows = Report()
    for name in order:
        if name in stayed_dense:
            out_features, in_features, reason = stayed_dense[name]
            dense = out_features * in_features
            rows.append(LayerReport(name, out_features, in_features, "dense", 0.0, dense,
                                    dense, 2 * dense, 2 * dense, reason))
            continue
        module = modules[name]
        dense = module.out_features * module.in_features
        runs_dense = isinstance(module, MaskedLinear)  # a masked layer computes densely
        feeds = tuple(sorted(graph.successors(name))) if name in graph else ()
        rows.append(LayerReport(name, module.out_features, module.in_features,
                                module.pattern_label, module.sparsity, dense, module.stored, 2 * dense,
                                2 * (dense if runs_dense else module.stored), feeds=feeds))
    return rows
