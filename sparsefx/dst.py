"""``sparsefx.DST``: dynamic sparse training that rewrites each layer's structure in place.

    model = sparsefx.transform(model, pattern="diag", sparsity=0.9, init="random")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dst = sparsefx.DST(model, optimizer, method="dynadiag", total_steps=T)
    model = torch.compile(model)
    for x, y in batches:                       # T steps
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        dst.step()                             # after the optimizer, every step

Schedule (RigL): the structure is updated at steps ``t = delta_t, 2 delta_t, ...`` while
``t < t_end * total_steps``; an update moves the fraction
``f(t) = alpha / 2 * (1 + cos(pi * t / (t_end * total_steps)))`` of each layer's units,
``n = round(f(t) * k)`` per row of slots (see ``sparsefx.regrow``). What moves, per method:

``static``    nothing.
``set``       drop the ``n`` smallest-magnitude units, grow ``n`` at random (seeded) among
              the units not kept.
``rigl``      drop as SET; grow the ``n`` not-kept units of largest dense-gradient magnitude.
              Magnitude of a diagonal is its L2 norm; its growth score the L2 norm of the
              dense gradient along it. Fan-in and N:M layers move ``n`` entries in every row
              (N:M regrows within the groups that lost entries); unstructured layers move
              ``n`` elements over the whole layer.
``srigl``     fan-in layers only. First the layer-wide RigL sets: keep = the largest
              ``A k - n_total`` magnitudes over the ``A`` active rows, grow = the ``n_total``
              best gradient scores among the positions not kept. A row whose salient count
              (entries in keep or grow) is below ``max(1, floor(gamma_sal * k))`` is ablated:
              its values are set to zero and held there; an ablated row that becomes salient
              again returns with its ``k`` best-scoring columns at zero. The output head
              (``output_layers``, by default the last sparse layer) is never ablated. Then
              RigL within each active row. ``k`` stays the stored fan-in: the values tensor
              keeps its shape, so the layer's budget is ``A * k``.
``dynadiag``  diag layers only. Each layer learns an importance ``a[P]`` over all candidate
              diagonals; the ``K`` active diagonals compute with values scaled by the soft
              top-K gates ``sigmoid((a_d - theta) / T)`` (``sparsefx.layers.soft_top_k_gates``,
              ``theta`` halfway between the K-th and (K+1)-th largest ``a``). ``a`` is trained
              by Adam (``importance_lr``, torch's fused kernel) on the loss gradient through
              the gates, every step; ``T`` falls linearly from ``temperature`` to 0 at
              ``t_end``, where the gates harden to exactly 1 (at ``total_steps`` they are
              folded into the values and removed, so the trained layer is a plain
              ``DiagLinear``). At update steps: drop the ``n`` active diagonals of lowest
              ``a``, grow the ``n`` not-kept candidates of largest dense-gradient norm (how
              inactive diagonals, which have no gate, re-enter), give grown diagonals the
              median ``a`` of the diagonals active before the update, and reset every
              inactive ``a`` to ``min(active a) - 1``. Only the ``K`` active diagonals are
              stored and computed.

Under DistributedDataParallel (wrap the model, pass the wrapper or the module): the growth
scores come from the all-reduced signed dense gradient, DynaDiag's importance gradients are
averaged over the ranks, and SET draws from the shared ``seed``, so every rank makes the same
decision. All ranks must call ``step()`` on the same steps.

Invariants: storage and shapes never change (``offsets``, ``indices``, ``mask``, ``values``
are written in place, so optimizers and compiled graphs keep their references); newly grown
units start at zero with zeroed optimizer state, everything else in the optimizer is left
alone; a unit dropped and grown back in the same update keeps its slot, value and state.
The dense gradient is read only at update steps, through ``torch.ops.sparsefx.growth_tap``
on the step before: formed one layer at a time inside the backward and reduced there to the
candidates an update could grow (``sparsefx.kernels.growth``). Non-finite gradients skip the
update with a warning.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from sparsefx import regrow
from sparsefx.kernels import distributed, growth
from sparsefx.layers import SPARSE_LAYERS, soft_top_k_gates
from sparsefx.registry import PATTERNS
from sparsefx.schedule import CosineSchedule

__all__ = ["DST", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("static", "set", "rigl", "srigl", "dynadiag")
# the layout of DST.state_dict(): 2 adds this key; format 1 (without it) reads the same
CHECKPOINT_FORMAT = 2
_PATTERNS_OF_METHOD = {  # what each method works on
    "static": tuple(PATTERNS),
    "set": tuple(PATTERNS),
    "rigl": tuple(PATTERNS),
    "srigl": ("fanin",),
    "dynadiag": ("diag",),
}
_NEEDS_GRADIENT = ("rigl", "srigl", "dynadiag")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile's and (Distributed)DataParallel's wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


@dataclass
class _Layer:
    """One sparse layer under the manager, and what the manager keeps about it. What the
    layer's pattern means for an update (its slots, their magnitudes, the candidates, how a
    new structure is written) the layer module itself says (``sparsefx.layers``)."""

    name: str
    module: nn.Module
    probe: torch.Tensor | None = None  # float32 leaf; its .grad holds the growth scores
    row_active: torch.Tensor | None = None  # srigl: [out] bool, False for ablated rows
    ablated_rows: torch.Tensor | None = None  # srigl: ids of the False rows; None if none
    ablate: bool = False  # srigl: may rows of this layer be ablated?

    @property
    def param(self) -> torch.Tensor:
        return self.module.param

    def budget(self) -> int:
        """Active units: diagonals, entries or elements (SRigL: of the live rows)."""
        rows = None if self.row_active is None else int(self.row_active.sum())
        return self.module.active_units(rows)


class DST:
    """Dynamic sparse training of every sparse layer of ``model`` (see the module docstring
    for each method's exact rule).

    Args:
        model: a model holding ``DiagLinear`` / ``FanInLinear`` / ``MaskedLinear`` layers
            (from ``sparsefx.transform``), or its ``torch.compile`` / DDP wrapper.
        optimizer: the optimizer that trains the sparse layers' values; its state for grown
            units is zeroed at updates.
        method: ``"static"``, ``"set"``, ``"rigl"``, ``"srigl"`` (fan-in layers) or
            ``"dynadiag"`` (diag layers).
        total_steps: how many times ``step()`` will be called in the whole run.
        delta_t: steps between structure updates.
        alpha: the fraction moved at step 0 of the cosine schedule, in (0, 1].
        t_end: fraction of ``total_steps`` after which the structure is frozen.
        gamma_sal: srigl's salience threshold, as a fraction of the fan-in.
        output_layers: srigl: layer names (regexes) whose rows are never ablated; default
            the last sparse layer; ``()`` protects none.
        temperature, importance_lr: dynadiag's initial gate temperature and the Adam learning
            rate of its per-diagonal importance.
        seed: seeds SET's random growth.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "rigl",
                 *, total_steps: int, delta_t: int = 100, alpha: float = 0.3,
                 t_end: float = 0.75, gamma_sal: float = 0.3,
                 output_layers: tuple[str, ...] | None = None, temperature: float = 0.25,
                 importance_lr: float = 1e-2, seed: int = 0):
        _check_arguments(method, gamma_sal, temperature, importance_lr)
        self.schedule = CosineSchedule(total_steps, delta_t, alpha, t_end)
        self.method, self.gamma_sal = method, gamma_sal
        self.temperature, self.importance_lr, self.seed = temperature, importance_lr, seed
        self.optimizer = optimizer
        self.layers = _find_layers(_unwrap(model), method)
        _check_optimizer(self.layers, optimizer)
        _check_same_structure_on_every_rank(self.layers)
        self._world = distributed.world_size()  # read once: the group outlives us
        self._step = 0
        self._holding: list[_Layer] = []  # srigl: the layers with ablated rows
        self._generator = torch.Generator().manual_seed(seed)
        self._skipped_updates = 0
        if method == "srigl":
            heads = _output_layers(_unwrap(model), self.layers, output_layers)
            for layer in self.layers:
                layer.row_active = torch.ones(layer.module.out_features, dtype=torch.bool,
                                              device=layer.param.device)
                layer.ablate = layer.name not in heads
        self._importance_optimizer = None
        self._importances: list[torch.Tensor] = []  # dynadiag: each layer's importance
        self._temperatures: list[torch.Tensor] = []  # dynadiag: the gates' temperature
        if method == "dynadiag":
            self._attach_importance()
        if method in _NEEDS_GRADIENT:
            for layer in self.layers:
                self._attach_probe(layer)
        self._armed: bool | None = None  # what the layers' growth probes are set to
        self._arm()

    # ------------------------------------------------------------------------- schedule

    total_steps = property(lambda self: self.schedule.total_steps)
    delta_t = property(lambda self: self.schedule.delta_t)
    alpha = property(lambda self: self.schedule.alpha)
    t_end = property(lambda self: self.schedule.t_end)
    end_step = property(lambda self: self.schedule.end_step,
                        doc="The first step at which no more updates happen.")

    def drop_fraction(self, step: int) -> float:
        """The fraction of each layer's units the update at ``step`` moves."""
        return self.schedule.drop_fraction(step)

    def is_update_step(self, step: int) -> bool:
        return self.method != "static" and self.schedule.is_update_step(step)

    @property
    def next_update(self) -> int | None:
        step = (self._step // self.delta_t + 1) * self.delta_t
        return step if self.is_update_step(step) else None

    @property
    def step_count(self) -> int:
        return self._step

    # ----------------------------------------------------------------------------- step

    def step(self) -> bool:
        """Call once after every ``optimizer.step()``. Returns whether the structure changed."""
        self._step += 1
        # most steps: no update on this step or the next and no importance to train, so
        # nothing to do but hold srigl's ablated rows at zero (this is most of the run)
        if (self._importance_optimizer is None and (self._step + 1) % self.delta_t > 1
                and self._step != self.total_steps):
            if self._holding:
                with torch.no_grad():
                    self._hold_ablated_rows()
            return False
        return self._step_with_work()

    @torch.no_grad()
    def _step_with_work(self) -> bool:
        if self._importance_optimizer is not None:
            self._train_importance()
        self._hold_ablated_rows()
        changed = False
        if self.is_update_step(self._step):
            changed = self._update(self.drop_fraction(self._step))
        if self._armed:
            for layer in self.layers:
                layer.probe.grad = None
        if self._step == self.total_steps and self._importance_optimizer is not None:
            self._release_gates()
        self._arm()
        return changed

    def _arm(self) -> None:
        """Route the next step's backward through the growth tap iff it ends in an update
        (the layers are touched only when that changes: twice per update)."""
        armed = self.method in _NEEDS_GRADIENT and self.is_update_step(self._step + 1)
        if armed != self._armed:
            for layer in self.layers:
                layer.module._growth_probe = layer.probe if armed else None
            self._armed = armed

    def _update(self, fraction: float) -> bool:
        problems = _layers_with_non_finite_gradients(self.layers)
        if problems:
            self._skipped_updates += 1
            warnings.warn(f"sparsefx.DST: step {self._step}: non-finite gradients in "
                          f"{', '.join(problems)}; structure update skipped", stacklevel=3)
            return False
        changed = False
        for layer in self.layers:
            if self.method in _NEEDS_GRADIENT and layer.probe.grad is None:
                warnings.warn(f"sparsefx.DST: step {self._step}: layer {layer.name} got no "
                              "gradient this step (not used in the forward?); its structure "
                              "is left as it is", stacklevel=3)
                continue
            changed |= self._update_layer(layer, fraction)
        logger.info("sparsefx.DST: step %d: structure update, fraction %.4f", self._step,
                    fraction)
        return changed

    def _attach_probe(self, layer: _Layer) -> None:
        """Size the growth lists so that every unit an update could grow is in them (the
        most an update moves is ``ceil(alpha * units)``), and make the probe they come in."""
        module = layer.module
        out_features, in_features = module.out_features, module.in_features
        if max(out_features, in_features) >= 2**24:  # ids travel as float32
            raise ValueError(f"sparsefx.DST: layer {layer.name} is ({out_features}, "
                             f"{in_features}): expected both dimensions < 2**24")
        plan = module.growth_plan(self.alpha, whole_rows=layer.ablate)
        size = growth.probe_size(out_features, in_features, module.growth_granularity, plan,
                                 layer.budget())
        # only the shape matters (scores arrive as its gradient): one element of storage
        storage = torch.zeros(1, dtype=torch.float32, device=layer.param.device)
        layer.probe = storage.expand(size).requires_grad_(True)
        module._growth_plan = plan

    def _growth_scores(self, layer: _Layer) -> torch.Tensor:
        """``[R, C]`` growth scores over every candidate: uniform noise (SET), the gradient
        norm of every diagonal, or (N:M) the listed ``|G|`` with ``-inf`` elsewhere. One
        layer's worth at a time."""
        if self.method == "set":
            return layer.module.random_scores(self._generator)
        return layer.module.growth_scores(layer.probe.grad)

    def _listed(self, layer: _Layer, active: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, growth.Listed]:
        """``(candidate_ids, scores)`` rows for ``regrow.drop_and_grow``: the active slots,
        then the inactive candidates the growth tap listed (fan-in: per row; unstructured:
        layer-wide, as flat ids); and the parsed lists."""
        module = layer.module
        listed = growth.listed_candidates(layer.probe.grad, module.structure,
                                          module.growth_granularity, module._growth_plan,
                                          module.out_features, module.in_features)
        return (*module.listed_candidates(listed, active), listed)

    def _update_layer(self, layer: _Layer, fraction: float) -> bool:
        module = layer.module
        active = module.slots()
        if self.method == "srigl":
            return self._update_srigl(layer, active, fraction)
        magnitude = (module._importance[active] if self.method == "dynadiag"
                     else module.unit_magnitudes(active))
        num_moved = min(round(fraction * active.shape[1]),
                        module.num_candidates - active.shape[1])
        if self.method == "rigl" and module.grows_from_lists:
            candidate_ids, scores, _ = self._listed(layer, active)
            new_active, grown = regrow.drop_and_grow(active, magnitude, scores, num_moved,
                                                     candidate_ids=candidate_ids)
        else:
            new_active, grown = regrow.drop_and_grow(active, magnitude,
                                                     self._growth_scores(layer), num_moved,
                                                     module.group_size)
        if not bool(grown.any()):
            return False
        self._write(layer, active, new_active, grown)
        return True

    def _update_srigl(self, layer: _Layer, active: torch.Tensor, fraction: float) -> bool:
        row_active, fan_in = layer.row_active, active.shape[1]
        magnitude = layer.module.unit_magnitudes(active)
        candidate_ids, scores, listed = self._listed(layer, active)
        num_moved_row = min(round(fraction * fan_in), layer.module.num_candidates - fan_in)
        new_row_active = row_active.clone()
        salient_minimum = max(1, math.floor(self.gamma_sal * fan_in))
        total_moved = round(fraction * int(row_active.sum()) * fan_in)
        # with no row ablated, the salience counts matter only if some row could fall below
        # the minimum: a cheap test rules that out most of the time
        if layer.ablate and (layer.ablated_rows is not None or not regrow.keeps_at_least(
                magnitude, total_moved, salient_minimum)):
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
            self._write(layer, active, new_active, grown)
            self._set_row_active(layer, new_row_active)
            if layer.ablated_rows is not None:
                layer.module.values.index_fill_(0, layer.ablated_rows, 0)
        return changed

    def _write(self, layer: _Layer, active: torch.Tensor, new_active: torch.Tensor,
               grown: torch.Tensor) -> None:
        """Store the new structure in place; zero the grown units and their optimizer state."""
        _zero_units(self.optimizer, layer.param, layer.module.write_structure(new_active, grown))
        if self.method == "dynadiag":
            self._reset_importance(layer, active[0], new_active[0], grown[0])

    # -------------------------------------------------------------------------- srigl

    def _hold_ablated_rows(self) -> None:
        """Ablated rows stay exactly zero, whatever the optimizer did to them: every step,
        one write of those rows per layer that has some. (Their optimizer state may drift
        meanwhile; a row that comes back is grown, which zeroes its state.)"""
        for layer in self._holding:
            layer.module.values.index_fill_(0, layer.ablated_rows, 0)

    def _set_row_active(self, layer: _Layer, row_active: torch.Tensor) -> None:
        layer.row_active.copy_(row_active)
        ablated = (~layer.row_active).nonzero()[:, 0]
        layer.ablated_rows = ablated if ablated.numel() else None
        self._holding = [layer for layer in self.layers if layer.ablated_rows is not None]

    # ----------------------------------------------------------------------- dynadiag

    def _attach_importance(self) -> None:
        importances, temperatures = [], {}
        for layer in self.layers:
            module = layer.module
            device = module.values.device
            importance = torch.zeros(module.num_candidates, dtype=torch.float32, device=device)
            importance[module.offsets] = 1.0
            importance.requires_grad_(True)
            module._importance = importance
            # one temperature tensor per device, shared by the layers: one write per step
            if device not in temperatures:
                temperatures[device] = torch.tensor(self.temperature, dtype=torch.float32,
                                                    device=device)
            module._temperature = temperatures[device]
            importances.append(importance)
        self._importances, self._temperatures = importances, list(temperatures.values())
        # scratch for _importance_adam_step, which holds when all layers share a device
        self._found_inf = self._one = None
        if len(temperatures) == 1:
            self._found_inf = torch.zeros((), device=importances[0].device)
            self._one = torch.ones((), device=importances[0].device)
        # holds the state (and its checkpoint format); _importance_adam_step takes the steps
        self._importance_optimizer = torch.optim.Adam(importances, lr=self.importance_lr,
                                                      fused=True)

    def _release_gates(self) -> None:
        """At the last step the gates are exactly 1 (``T = 0`` from ``t_end`` on): drop them so
        the trained model computes its plain sparse op, as ``densify`` and a state_dict
        loaded elsewhere do."""
        for layer in self.layers:
            gates = soft_top_k_gates(layer.module._importance, layer.module.offsets,
                                     layer.module._temperature)
            layer.module.values.mul_(gates[:, None].to(layer.module.values.dtype))
            layer.module._importance = layer.module._temperature = None
        self._importance_optimizer = None
        self._importances, self._temperatures = [], []

    def _temperature_at(self, step: int) -> float:
        return self.temperature * max(0.0, 1.0 - step / self.end_step)

    def _train_importance(self) -> None:
        """One Adam step on the importances (skipped if a gradient is not finite), then the
        temperature of the next step. Runs every step, so kept to a few small ops."""
        if self._step <= self.end_step:
            grads = [importance.grad for importance in self._importances
                     if importance.grad is not None]
            if self._world > 1:
                distributed.mean_over_ranks_(*grads)
            if self._one is not None:
                _importance_adam_step(self._importance_optimizer, self._found_inf, self._one)
            elif all(bool(torch.isfinite(grad).all()) for grad in grads):  # several devices
                self._importance_optimizer.step()
        for importance in self._importances:
            importance.grad = None
        temperature = self._temperature_at(self._step)
        for tensor in self._temperatures:
            tensor.fill_(temperature)

    def _reset_importance(self, layer: _Layer, old_offsets: torch.Tensor,
                          offsets: torch.Tensor, grown: torch.Tensor) -> None:
        importance = layer.module._importance
        importance[offsets[grown]] = importance[old_offsets].median()
        _zero_state(self._importance_optimizer, importance,
                    torch.zeros_like(importance, dtype=torch.bool).index_fill_(
                        0, offsets[grown], True))
        inactive = torch.ones_like(importance, dtype=torch.bool).index_fill_(0, offsets, False)
        importance[inactive] = importance[offsets].min() - 1.0

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """What ``load_state_dict`` needs to continue the same run; the structure itself is in
        the model's state_dict, the values' optimizer state in the optimizer's."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self._step,
            "config": self._config(),
            "generator": self._generator.get_state(),
            "skipped_updates": self._skipped_updates,
            "row_active": {layer.name: layer.row_active.clone() for layer in self.layers
                           if layer.row_active is not None},
            "importance": {layer.name: layer.module._importance.detach().clone()
                           for layer in self.layers
                           if getattr(layer.module, "_importance", None) is not None},
        }
        if self._importance_optimizer is not None:
            state["importance_optimizer"] = self._importance_optimizer.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved_format = state.get("format", 1)  # format 1 (sparsefx 0.1) had no version key
        if saved_format not in (1, CHECKPOINT_FORMAT):
            raise ValueError(f"sparsefx.DST.load_state_dict: checkpoint format "
                             f"{saved_format!r}: this sparsefx reads formats 1 to "
                             f"{CHECKPOINT_FORMAT} (a checkpoint from a newer sparsefx?)")
        config = self._config()
        if state["config"] != config:
            differ = {key: (state["config"].get(key), value) for key, value in config.items()
                      if state["config"].get(key) != value}
            raise ValueError(f"sparsefx.DST.load_state_dict: the checkpoint was made with other "
                             f"settings (saved, current): {differ}")
        names = {layer.name for layer in self.layers}
        saved = set(state["row_active"]) | set(state["importance"])
        if not saved <= names:
            raise ValueError(f"sparsefx.DST.load_state_dict: layers {sorted(saved - names)} "
                             f"are not in this model's sparse layers {sorted(names)}")
        gated = self._importance_optimizer is not None
        if state["importance"] and not gated:
            self._attach_importance()
        elif self.method == "dynadiag" and gated and not state["importance"]:
            self._release_gates()  # saved after the run finished
        self._step = state["step"]
        self._generator.set_state(state["generator"])
        self._skipped_updates = state["skipped_updates"]
        for layer in self.layers:
            if layer.name in state["row_active"]:
                self._set_row_active(layer, state["row_active"][layer.name])
            if layer.name in state["importance"]:
                layer.module._importance.copy_(state["importance"][layer.name])
                layer.module._temperature.fill_(self._temperature_at(self._step))
        if self._importance_optimizer is not None:
            self._importance_optimizer.load_state_dict(state["importance_optimizer"])
        self._arm()

    def _config(self) -> dict:
        return {"method": self.method, "total_steps": self.total_steps,
                "delta_t": self.delta_t, "alpha": self.alpha, "t_end": self.t_end,
                "gamma_sal": self.gamma_sal, "temperature": self.temperature,
                "importance_lr": self.importance_lr, "seed": self.seed,
                "layers": [layer.name for layer in self.layers]}

    def __repr__(self) -> str:
        upcoming = self.next_update
        lines = [f"DST(method={self.method}, step={self._step}/{self.total_steps}, "
                 f"next update={'none' if upcoming is None else upcoming}"
                 + ("" if upcoming is None else f" (fraction {self.drop_fraction(upcoming):.3f})")
                 + f", delta_t={self.delta_t}, alpha={self.alpha}, updates until step "
                 f"{self.end_step})"]
        for layer in self.layers:
            lines.append(f"  {layer.name}: {_budget_text(layer)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ helpers


def _check_arguments(method, gamma_sal, temperature, importance_lr) -> None:
    where = "sparsefx.DST"
    if method not in METHODS:
        raise ValueError(f"{where}: method={method!r}: expected one of {METHODS}")
    if not 0 <= gamma_sal <= 1:
        raise ValueError(f"{where}: gamma_sal={gamma_sal!r}: expected 0 <= gamma_sal <= 1")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature={temperature!r}: expected > 0")
    if not importance_lr > 0:
        raise ValueError(f"{where}: importance_lr={importance_lr!r}: expected > 0")


def _find_layers(model: nn.Module, method: str) -> list[_Layer]:
    layers = [_Layer(name, module) for name, module in model.named_modules()
              if isinstance(module, SPARSE_LAYERS)]
    if not layers:
        raise ValueError("sparsefx.DST: the model has no sparse layer (DiagLinear, FanInLinear "
                         "or MaskedLinear): make it sparse with sparsefx.transform first")
    allowed = _PATTERNS_OF_METHOD[method]
    wrong = [f"{layer.name} ({layer.module.pattern})" for layer in layers
             if layer.module.pattern not in allowed]
    if wrong:
        raise ValueError(f"sparsefx.DST: method={method!r} works on {', '.join(allowed)} "
                         f"layers; these are not: {', '.join(wrong)}")
    return layers


def _check_optimizer(layers: list[_Layer], optimizer: torch.optim.Optimizer) -> None:
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer in layers if id(layer.param) not in optimized]
    if missing:
        raise ValueError(f"sparsefx.DST: the optimizer does not train the weights of "
                         f"{', '.join(missing)}: build it from model.parameters() after "
                         "sparsefx.transform")


def _output_layers(model: nn.Module, layers: list[_Layer],
                   patterns_given: tuple[str, ...] | None) -> set[str]:
    names = [layer.name for layer in layers]
    if patterns_given is None:
        order = [name for name in getattr(model, "_sparsefx_order", names) if name in names]
        return {order[-1] if order else names[-1]}
    if not patterns_given:
        return set()
    chosen = {name for name in names for pattern in patterns_given
              if re.fullmatch(pattern, name)}
    if not chosen:
        raise ValueError(f"sparsefx.DST: output_layers={patterns_given!r} match none of the "
                         f"sparse layers {names}")
    return chosen


def _check_same_structure_on_every_rank(layers: list[_Layer]) -> None:
    """Under torch.distributed every rank must start from the same structure (transform with
    the same seed everywhere): compare two checksums per layer."""
    if distributed.world_size() == 1:
        return
    local = torch.stack(
        [layer.module.structure.double().sum() for layer in layers]
        + [(layer.module.structure.double().flatten()
            * torch.arange(1, layer.module.structure.numel() + 1,
                           device=layer.module.structure.device)).sum() for layer in layers])
    differs = distributed.differs_across_ranks(local).view(2, -1).any(dim=0).tolist()
    wrong = [layer.name for layer, bad in zip(layers, differs, strict=True) if bad]
    if wrong:
        raise ValueError(f"sparsefx.DST: the ranks hold different structures in {wrong}: "
                         "transform the model with the same seed on every rank")


def _layers_with_non_finite_gradients(layers: list[_Layer]) -> list[str]:
    """Names of the layers whose weight or growth-score gradient holds a NaN or an infinity:
    one pass (the smallest and largest entry, NaN if any is) and one host sync for all."""
    names, extremes = [], []
    for layer in layers:
        for grad in (layer.param.grad, None if layer.probe is None else layer.probe.grad):
            if grad is not None and grad.numel():
                names.append(layer.name)
                extremes.append(torch.stack(grad.aminmax()).float())
    if not extremes:
        return []
    finite = torch.stack(extremes).isfinite().all(dim=1).tolist()
    return list(dict.fromkeys(name for name, ok in zip(names, finite, strict=True) if not ok))


def _zero_units(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                where: torch.Tensor) -> None:
    """Zero ``param`` and every optimizer state tensor shaped like it where ``where`` holds
    (momentum, exp_avg, exp_avg_sq, ...); scalar state such as Adam's step is left alone."""
    param.masked_fill_(where, 0)
    _zero_state(optimizer, param, where)


def _zero_state(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                where: torch.Tensor) -> None:
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


def _importance_adam_step(optimizer: torch.optim.Adam, found_inf: torch.Tensor,
                          one: torch.Tensor) -> None:
    """``optimizer.step()`` for DynaDiag's importances, ``optimizer`` an ``Adam(fused=True)``
    (one group; no weight decay, amsgrad or maximize): the same fused kernel on the same
    state, without Adam's bookkeeping around it. This runs every step, right after the
    model's optimizer, when each op costs far more than its arithmetic (its code and data
    are out of cache): here three ops and a read of one number. A step whose gradients are
    not all finite is skipped. Parameters without a gradient are skipped, as Adam does.
    ``found_inf`` (0-dim, zero) and ``one`` are scratch tensors kept by the caller."""
    group = optimizer.param_groups[0]
    params = [param for param in group["params"] if param.grad is not None]
    if not params:
        return
    grads = [param.grad for param in params]
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)  # grads * 1
    if found_inf.item():
        found_inf.zero_()
        return
    states = []
    for param in params:
        state = optimizer.state[param]
        if not state:  # as Adam(fused=True)'s first step creates it
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        states.append(state)
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, one, alpha=1.0)
    torch._fused_adam_(params, grads, [state["exp_avg"] for state in states],
                       [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False,
                       lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                       weight_decay=0.0, eps=group["eps"], maximize=False, grad_scale=None,
                       found_inf=None)


def _budget_text(layer: _Layer) -> str:
    rows = None if layer.row_active is None else int(layer.row_active.sum())
    text = layer.module.describe(rows)
    if layer.row_active is not None:
        text += f", {int((~layer.row_active).sum())} rows ablated"
    return text
