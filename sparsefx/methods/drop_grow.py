"""The drop-and-grow methods that work on every pattern: ``static`` (no change), ``SET``
(grow at random) and ``RigL`` (grow where the dense gradient is largest). Each drops the
``n`` smallest-magnitude units of a row of slots (see ``sparsefx.regrow``)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .base import Method


@dataclass
class Static(Method):
    """The structure never changes (a fixed-structure baseline under the same manager)."""

    name = "static"
    moves = False


@dataclass
class SET(Method):
    """Grow ``n`` units at random among those not kept, drawn from ``seed`` (the same draws on
    every rank of a data-parallel run). The draws come from a stream of SET's own, derived
    from ``seed``: ``transform(init="random", seed=s)`` draws the first structure from ``s``
    itself, and SET's first draw, were it the same, would grow back exactly what it drew."""

    seed: int = 0
    name = "set"
    option_names = ("seed",)
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self._generator = torch.Generator().manual_seed(_stream_seed("SET", self.seed))

    def growth_scores(self, ctx, layer, rows: slice) -> torch.Tensor:
        return layer.module.random_scores(self._generator, rows)

    def grows_from_lists(self, layer) -> bool:
        # an unstructured layer is one row of every element: a random list, not a score each
        return hasattr(layer.module, "random_candidates")

    def candidates(self, ctx, layer, active, rows, num_moved):
        return layer.module.random_candidates(self._generator, active, num_moved)

    def list_width(self, ctx, layer, num_moved: int) -> int:
        return layer.module.slot_shape[1] + num_moved

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, ctx, state: dict) -> None:
        self._generator.set_state(state["generator"])


@dataclass
class RigL(Method):
    """Grow the ``n`` units not kept whose dense gradient is largest (a diagonal's: the L2
    norm of the gradient along it). Fan-in and unstructured layers rank the candidates the
    growth tap listed; N:M regrows within the groups that lost entries."""

    name = "rigl"
    needs_gradient = True

    def grows_from_lists(self, layer) -> bool:
        return layer.module.grows_from_lists


def _stream_seed(stream: str, seed: int) -> int:
    """A seed for the random stream ``stream`` of a run seeded ``seed``, unrelated to ``seed``
    itself and to other streams' (the same on every machine and process)."""
    digest = hashlib.sha256(f"sparsefx.{stream}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
