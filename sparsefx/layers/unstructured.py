"""``MaskedLinear``: a dense weight times a 0/1 mask, the unstructured baseline (not
accelerated)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsefx.kernels import growth, patterns, topk
from .base import SparseLinear, _check_init


class MaskedLinear(SparseLinear):
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
        pool, filled = topk.LayerPool(count), 0
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

    def values_from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight * self.mask).to(self.weight.dtype)

    def kept_mask(self) -> torch.Tensor:
        return self.mask.bool()

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.mask
