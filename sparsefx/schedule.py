"""When DST updates the structure, and how much it moves: RigL's cosine schedule.

Updates happen at steps ``t = delta_t, 2 delta_t, ...`` while ``t < t_end * total_steps``;
the update at step ``t`` moves the fraction
``f(t) = alpha / 2 * (1 + cos(pi * t / (t_end * total_steps)))`` of each layer's units.
"""
from __future__ import annotations

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
