"""What every DST method is to the manager (``sparsefx.dst.DST``), and the drop-and-grow
update most of them share.

A method is handed, on every call, a ``StepContext``: the step, the run's settings and its
layers; each layer as a ``Layer`` handle, through which it reads the layer's units and the
listed candidates and writes a new structure (the manager zeroes the grown units' optimizer
state). From these it decides; it keeps and checkpoints its own state. It imports neither
``sparsefx.dst`` nor ``sparsefx.dst_layers`` (which build on the methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from sparsefx import regrow
from sparsefx.kernels import growth


class Layer(Protocol):
    """One sparse layer as a method sees it (the manager's ``sparsefx.dst_layers.Layer``):
    the layer module, its growth probe, and what the method may do to it at an update."""

    name: str
    module: nn.Module             # the sparse layer (``sparsefx.layers.SparseLinear``)
    probe: torch.Tensor | None    # the growth tap's probe on an armed step

    @property
    def param(self) -> torch.Tensor: ...
    def units_moved(self, units: int) -> int:
        """How many of ``units`` this update moves (the schedule's, remainder carried)."""
    def lists(self) -> growth.Listed:
        """The growth tap's lists at this update, parsed once."""
    def listed(self, active: torch.Tensor, rows: slice | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, growth.Listed]:
        """``(candidate_ids, scores)``: the slots ``active`` of the slot rows ``rows``, then
        the candidates listed for them; and the lists of those rows."""
    def write(self, new_active: torch.Tensor, grown: torch.Tensor) -> None:
        """Store the new slots in place; the grown units and their optimizer state zeroed."""
    def write_slots(self, new_active: torch.Tensor, source: torch.Tensor) -> None:
        """Store slots that continue the old slots ``source`` names (-1: new), resizing the
        layer if their number changed; the optimizer's state carried with them."""


@dataclass(frozen=True)
class StepContext:
    """What a method is told of the run on the step it is called on (built by the manager
    for each call; nothing in it is for writing)."""

    step: int                     # steps taken (an update at ``step``: its step)
    end_step: int                 # the first step with no more updates
    total_steps: int
    world: int                    # torch.distributed's world size (1 without it)
    inverse_grad_scale: torch.Tensor | None  # 1 / GradScaler's scale on this step, if any
    optimizer: torch.optim.Optimizer  # the model's
    model: nn.Module              # the user's module (under its wrappers)
    layers: tuple[Layer, ...]


class Method:
    """A DST method. Subclasses are dataclasses of their options and keep their own state.

    The manager calls, in a run: ``attach`` once; every step ``between_updates`` (the cheap
    path) or, on steps with work, ``every_step`` then ``update_layer`` per layer on update
    steps; ``finish`` at the last step. ``state_dict`` / ``load_state_dict`` go into the
    manager's checkpoint.
    """

    name: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    moves: ClassVar[bool] = True           # static: the structure never changes
    needs_gradient: ClassVar[bool] = False  # dense-gradient growth: the tap is armed

    def works_on(self, pattern) -> bool:
        """Whether the method updates layers of ``pattern`` (a ``sparsefx.registry.Pattern``);
        every pattern unless a method says otherwise."""
        return True

    def options(self) -> dict:
        """The method's settings, as the checkpoint records them."""
        return {name: getattr(self, name) for name in self.option_names}

    def attach(self, ctx: StepContext) -> None:
        """Set up the method's state for ``ctx.layers``."""

    @property
    def works_every_step(self) -> bool:
        """Whether ``every_step`` must run on every step (not only around updates)."""
        return False

    @property
    def writes_between_updates(self) -> bool:
        """Whether ``between_updates`` writes the layers' weights (gathered whole under FSDP2
        for it)."""
        return False

    def between_updates(self, ctx: StepContext) -> None:
        """The cheap path of most steps."""

    def every_step(self, ctx: StepContext) -> None:
        """Before an update (and, if ``works_every_step``, on every step)."""
        self.between_updates(ctx)

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

    def growth_scores(self, ctx: StepContext, layer: Layer, rows: slice) -> torch.Tensor:
        """``[rows, C]`` scores over every candidate of the slot rows ``rows``: what growth
        ranks (largest grown)."""
        return layer.module.growth_scores(layer.probe.grad, rows)

    def grows_from_lists(self, layer: Layer) -> bool:
        """Whether growth ranks listed candidates (``candidates``) instead of every
        candidate."""
        return False

    def candidates(self, ctx: StepContext, layer: Layer, active: torch.Tensor, rows: slice,
                   num_moved: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidate_ids, scores) [rows, k + c]``: the slots ``active`` of the slot rows
        ``rows``, then the candidates listed for them (default: the growth tap's), enough
        for a move of ``num_moved`` units."""
        return layer.listed(active, rows)[:2]

    def list_width(self, ctx: StepContext, layer: Layer, num_moved: int) -> int:
        """``k + c`` of ``candidates``."""
        return layer.listed(layer.module.slots(slice(0, 1)), slice(0, 1))[0].shape[1]

    def update_layer(self, ctx: StepContext, layer: Layer, fraction: float) -> bool:
        """Move ``fraction`` of the layer's units (``layer.units_moved``); whether anything
        moved."""
        module = layer.module
        num_rows, slots = module.slot_shape
        num_moved = min(layer.units_moved(slots), module.num_candidates - slots)
        if num_moved == 0:
            return False
        new_active = module.new_slots()
        grown = torch.empty(num_rows, slots, dtype=torch.bool, device=new_active.device)
        # a block of rows at a time, a few MiB each: never a layer's worth of temporaries
        listed = self.grows_from_lists(layer)
        width = self.list_width(ctx, layer, num_moved) if listed else module.num_candidates
        for rows in regrow.row_blocks(num_rows, slots, width):
            active = module.slots(rows)
            magnitude = self.magnitudes(layer, active, rows)
            if listed:
                candidate_ids, scores = self.candidates(ctx, layer, active, rows, num_moved)
                new_active[rows], grown[rows] = regrow.drop_and_grow(
                    active, magnitude, scores, num_moved, candidate_ids=candidate_ids)
            else:  # scores over every candidate
                new_active[rows], grown[rows] = regrow.drop_and_grow(
                    active, magnitude, self.growth_scores(ctx, layer, rows), num_moved,
                    module.group_size)
        if not bool(grown.any()):
            return False
        if self.needs_old_slots:  # a copy: the slots may be a view of what write changes
            active = module.slots().clone()
        layer.write(new_active, grown)
        self.after_write(ctx, layer, active if self.needs_old_slots else None, new_active,
                         grown)
        return True

    needs_old_slots = False  # whether after_write is handed the old slots

    def after_write(self, ctx: StepContext, layer: Layer, active: torch.Tensor | None,
                    new_active: torch.Tensor, grown: torch.Tensor) -> None:
        """What the method keeps about a layer whose structure just changed: ``active`` its
        old slots if ``needs_old_slots``, ``new_active`` and ``grown`` its new ones."""

    def finish(self, ctx: StepContext) -> None:
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

    def load_state_dict(self, ctx: StepContext, state: dict) -> None:
        """``state``: the manager's checkpoint (this method's keys among others)."""
