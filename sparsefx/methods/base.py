"""What every DST method is to the manager (``sparsefx.dst.DST``), and the drop-and-grow
update most of them share.

A method sees the manager and its layers through the two protocols below, ``DST`` and
``Layer``: what it may read and call. It imports neither ``sparsefx.dst`` nor
``sparsefx.dst_layers`` (which build on the methods), so there is no import circle.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from sparsefx import regrow
from sparsefx.kernels import growth


class Layer(Protocol):
    """One sparse layer under the manager (``sparsefx.dst_layers.Layer``)."""

    name: str
    module: nn.Module             # the sparse layer (``sparsefx.layers.SparseLinear``)
    probe: torch.Tensor | None    # the growth tap's probe on an armed step

    @property
    def param(self) -> torch.Tensor: ...


class DST(Protocol):
    """What a method reads of the manager (``sparsefx.dst.DST``) and calls on it."""

    layers: list[Layer]
    model: nn.Module
    world: int                    # torch.distributed's world size (1 without it)
    inverse_grad_scale: torch.Tensor | None  # 1 / GradScaler's scale on this step, if any

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def step_count(self) -> int: ...
    @property
    def end_step(self) -> int: ...
    def units_moved(self, units: int, step: int | None = None) -> int: ...
    def listed(self, layer: Layer, active: torch.Tensor, rows: slice | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, growth.Listed]: ...
    def lists(self, layer: Layer) -> growth.Listed: ...
    def write(self, layer: Layer, new_active: torch.Tensor, grown: torch.Tensor) -> None: ...
    def write_slots(self, layer: Layer, new_active: torch.Tensor,
                    source: torch.Tensor) -> None: ...
    @staticmethod
    def zero_state(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                   where: torch.Tensor) -> None: ...


class Method:
    """A DST method. Subclasses are dataclasses of their options and keep their own state.

    The manager calls, in a run: ``attach`` once; every step ``between_updates`` (the cheap
    path) or, on steps with work, ``every_step`` then ``update_layer`` per layer on update
    steps; ``finish`` at the last step. ``state_dict`` / ``load_state_dict`` go into the
    manager's checkpoint.
    """

    name: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    patterns: ClassVar[tuple[str, ...] | None] = None  # what it works on; None: every one
    moves: ClassVar[bool] = True           # static: the structure never changes
    needs_gradient: ClassVar[bool] = False  # dense-gradient growth: the tap is armed

    def options(self) -> dict:
        """The method's settings, as the checkpoint records them."""
        return {name: getattr(self, name) for name in self.option_names}

    def attach(self, dst: DST) -> None:
        """Set up the method's state for ``dst.layers``."""

    @property
    def works_every_step(self) -> bool:
        """Whether ``every_step`` must run on every step (not only around updates)."""
        return False

    @property
    def writes_between_updates(self) -> bool:
        """Whether ``between_updates`` writes the layers' weights (gathered whole under FSDP2
        for it)."""
        return False

    def between_updates(self, dst: DST) -> None:
        """The cheap path of most steps."""

    def every_step(self, dst: DST) -> None:
        """Before an update (and, if ``works_every_step``, on every step)."""
        self.between_updates(dst)

    def growth_needs(self, layer: Layer) -> dict:
        """What the layer's growth tap must list beyond what an update moving ``alpha`` of the
        units needs (``growth_plan``'s keywords: ``per_row``, ``layer_wide``)."""
        return {}

    def live_rows(self, layer: Layer) -> int | None:
        """Output rows that still compute (SRigL's ablation); ``None``: all."""
        return None

    def magnitudes(self, layer: Layer, active: torch.Tensor, rows: slice | None = None
                   ) -> torch.Tensor:
        """``[R, k]``: what drop ranks (smallest dropped) of the units ``active`` (the slot
        rows ``rows``, default all)."""
        return layer.module.unit_magnitudes(active, rows)

    def growth_scores(self, dst: DST, layer: Layer, rows: slice) -> torch.Tensor:
        """``[rows, C]`` scores over every candidate of the slot rows ``rows``: what growth
        ranks (largest grown)."""
        return layer.module.growth_scores(layer.probe.grad, rows)

    def grows_from_lists(self, layer: Layer) -> bool:
        """Whether growth ranks listed candidates (``candidates``) instead of every
        candidate."""
        return False

    def candidates(self, dst: DST, layer: Layer, active: torch.Tensor, rows: slice,
                   num_moved: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidate_ids, scores) [rows, k + c]``: the slots ``active`` of the slot rows
        ``rows``, then the candidates listed for them (default: the growth tap's), enough
        for a move of ``num_moved`` units."""
        return dst.listed(layer, active, rows)[:2]

    def list_width(self, dst: DST, layer: Layer, num_moved: int) -> int:
        """``k + c`` of ``candidates``."""
        return dst.listed(layer, layer.module.slots(slice(0, 1)), slice(0, 1))[0].shape[1]

    def update_layer(self, dst: DST, layer: Layer, fraction: float) -> bool:
        """Move ``fraction`` of the layer's units (``dst.units_moved``); whether anything
        moved."""
        module = layer.module
        num_rows, slots = module.slot_shape
        num_moved = min(dst.units_moved(slots), module.num_candidates - slots)
        if num_moved == 0:
            return False
        new_active = module.new_slots()
        grown = torch.empty(num_rows, slots, dtype=torch.bool, device=new_active.device)
        # a block of rows at a time, a few MiB each: never a layer's worth of temporaries
        listed = self.grows_from_lists(layer)
        width = self.list_width(dst, layer, num_moved) if listed else module.num_candidates
        for rows in regrow.row_blocks(num_rows, slots, width):
            active = module.slots(rows)
            magnitude = self.magnitudes(layer, active, rows)
            if listed:
                candidate_ids, scores = self.candidates(dst, layer, active, rows, num_moved)
                new_active[rows], grown[rows] = regrow.drop_and_grow(
                    active, magnitude, scores, num_moved, candidate_ids=candidate_ids)
            else:  # scores over every candidate
                new_active[rows], grown[rows] = regrow.drop_and_grow(
                    active, magnitude, self.growth_scores(dst, layer, rows), num_moved,
                    module.group_size)
        if not bool(grown.any()):
            return False
        if self.needs_old_slots:  # a copy: the slots may be a view of what write changes
            active = module.slots().clone()
        dst.write(layer, new_active, grown)
        self.after_write(dst, layer, active if self.needs_old_slots else None, new_active,
                         grown)
        return True

    needs_old_slots = False  # whether after_write is handed the old slots

    def after_write(self, dst: DST, layer: Layer, active: torch.Tensor | None,
                    new_active: torch.Tensor, grown: torch.Tensor) -> None:
        """What the method keeps about a layer whose structure just changed: ``active`` its
        old slots if ``needs_old_slots``, ``new_active`` and ``grown`` its new ones."""

    def finish(self, dst: DST) -> None:
        """At the last step."""

    def describe(self, layer: Layer) -> str:
        """What ``repr(dst)`` adds to the layer's line."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def state_layers(self, state: dict) -> set[str]:
        """The layer names this method's keys of the checkpoint ``state`` mention (the manager
        checks they are its layers before anything is loaded)."""
        return set()

    def load_state_dict(self, dst: DST, state: dict) -> None:
        """``state``: the manager's checkpoint (this method's keys among others)."""
