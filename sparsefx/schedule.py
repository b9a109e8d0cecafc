"""When DST updates the structure, and how much it moves: RigL's cosine schedule.

Updates happen at steps ``t = delta_t, 2 delta_t, ...`` while ``t < t_end * total_steps``;
the update at step ``t`` moves the fraction
``f(t) = alpha / 2 * (1 + cos(pi * t / (t_end * total_steps)))`` of each layer's units, in
whole units with the remainder carried to the next update (``units_moved``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

__all__ = ["CosineSchedule"]


@dataclass(frozen=True)
class CosineSchedule:
    total_steps: int      # how many times DST.step() is called in the whole run
    delta_t: int = 100    # steps between structure updates
    alpha: float = 0.3    # the fraction moved at step 0, in (0, 1]
    t_end: float = 0.75   # fraction of total_steps after which the structure is frozen

    def __post_init__(self):
        where = "sparsefx.DST"
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"{where}: total_steps={self.total_steps!r}: expected an int >= 1")
        if not isinstance(self.delta_t, int) or self.delta_t <= 0:
            raise ValueError(f"{where}: delta_t={self.delta_t!r}: expected an int > 0")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"{where}: alpha={self.alpha!r}: expected 0 < alpha <= 1")
        if not 0 < self.t_end <= 1:
            raise ValueError(f"{where}: t_end={self.t_end!r}: expected 0 < t_end <= 1")

    @property
    def end_step(self) -> int:
        """The first step at which no more updates happen."""
        return int(self.t_end * self.total_steps)

    def drop_fraction(self, step: int) -> float:
        """``alpha / 2 * (1 + cos(pi * step / end_step))``; 0 from ``end_step`` on."""
        if step >= self.end_step:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * step / self.end_step))

    def is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.delta_t == 0 and step < self.end_step

    def units_moved(self, step: int, units: int) -> int:
        """How many of ``units`` the update at ``step`` moves: ``round(units * F(step)) -
        round(units * F(step - delta_t))`` (rounding half up), where ``F(t)`` sums ``f`` over the updates up to
        ``t``. Over a run a layer moves ``round(units * F)`` units, which per update is
        ``round(f * units)`` give or take one; but a layer of few units (one diagonal at
        99 % sparsity, a row of 2 entries) still moves every few updates, where
        ``round(f * units)`` would be 0 every time."""
        if not self.is_update_step(step):
            return 0
        # rounding half up (not to even): then no update moves more than ceil(f * units),
        # what the growth tap's lists are sized for
        return (math.floor(units * self._moved_so_far(step) + 0.5)
                - math.floor(units * self._moved_so_far(step - self.delta_t) + 0.5))

    @functools.lru_cache(maxsize=64)
    def _moved_so_far(self, step: int) -> float:
        """``F(step)``: the sum of the fractions of the updates at or before ``step``."""
        return math.fsum(self.drop_fraction(t) for t in range(self.delta_t, step + 1,
                                                               self.delta_t)
                         if self.is_update_step(t))
