"""DynaDiag on diag layers (and blockdiag ones, whose units are whole cosets: read "coset"
for "diagonal" below). Each layer learns an importance ``a[P]`` over all candidate
diagonals; the ``K`` active diagonals compute with values scaled by the soft top-K gates
``sigmoid((a_d - theta) / T)`` (``sparsefx.layers.soft_top_k_gates``, ``theta`` halfway
between the K-th and (K+1)-th largest ``a``), set on the layer through its generic
``value_transform`` hook. ``a`` is trained by Adam (``importance_lr``, torch's fused kernel)
on the loss gradient through the gates, every step; ``T`` falls linearly from
``temperature`` to 0 at ``t_end``, where the gates harden to exactly 1 (at ``total_steps``
they are folded into the values and removed, so the trained layer is a plain
``DiagLinear``). At update steps: drop the ``n`` active diagonals of lowest ``a``, grow the
``n`` not-kept candidates of largest dense-gradient norm (how inactive diagonals, which
have no gate, re-enter), give grown diagonals the median ``a`` of the diagonals active
before the update, and reset every inactive ``a`` to ``min(active a) - 1``. Only the ``K``
active diagonals are stored and computed.

``selection="reference"`` is the rule of DynaDiag's reference code instead, for measuring
against: until ``t_end`` every one of the ``P`` diagonals computes, gated by
``clamp(K * softmax(a / T), 0, 1)`` with ``a`` starting at ``1 / P`` and ``T`` falling on a
cosine from ``temperature`` to ``end_temperature`` (its MLP example: 5 to 0.05); at
``t_end`` the ``K`` diagonals of largest ``a`` are kept with gates of exactly 1 and the
rest removed. The ``P - K`` diagonals the layer does not store are held by the method and
trained by an optimizer of the model optimizer's class and settings (its learning rate
followed every step), so that all ``P`` train as the reference trains them. It costs dense
work and memory until ``t_end``. Diag layers only, one process."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from sparsefx.kernels import distributed
from sparsefx.layers import DiagLinear, soft_top_k_gates
from sparsefx.optimizer_state import zero_state

from .base import Method


class Gates:
    """A layer's ``value_transform`` under DynaDiag: values times the soft top-K gates of
    ``importance`` at ``temperature`` (tensors the method updates in place), one gate per
    active unit (a diagonal; a blockdiag coset), spread over its value rows by the layer."""

    def __init__(self, importance: torch.Tensor, layer, temperature: torch.Tensor):
        self.importance, self.layer, self.temperature = importance, layer, temperature

    def gates(self) -> torch.Tensor:
        """One gate per value row."""
        return self.layer.unit_rows(soft_top_k_gates(self.importance, self.layer.unit_ids(),
                                                     self.temperature))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.gates().to(values.dtype)[:, None]


class ReferenceGates:
    """A layer's ``value_transform`` under ``selection="reference"``: every candidate
    diagonal, the layer's ``K`` and the ``P - K`` of ``bank`` (on ``bank_offsets``), times
    ``clamp(K * softmax(importance / temperature), 0, 1)``."""

    def __init__(self, importance: torch.Tensor, layer, bank: torch.Tensor,
                 bank_offsets: torch.Tensor, temperature: torch.Tensor):
        self.importance, self.layer, self.temperature = importance, layer, temperature
        self.bank, self.bank_offsets = bank, bank_offsets

    def all_gates(self) -> torch.Tensor:
        """``[P]``, by diagonal."""
        num_kept = self.layer.offsets.numel()
        soft = torch.softmax(self.importance / self.temperature, dim=0)
        return (num_kept * soft).clamp(0.0, 1.0)

    def __call__(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.cat([self.layer.offsets, self.bank_offsets])
        every = torch.cat([values, self.bank.to(values.dtype)])
        return every * self.all_gates()[offsets].to(values.dtype)[:, None], offsets


SELECTIONS = ("sparse", "reference")


@dataclass
class DynaDiag(Method):
    temperature: float = 0.25    # the gates' initial temperature, falling to 0 at t_end
    importance_lr: float = 1e-2  # Adam's learning rate for the importances
    selection: str = "sparse"    # "reference": all P diagonals gated by a softmax
    end_temperature: float = 0.05  # selection="reference": the temperature at t_end
    name = "dynadiag"
    option_names = ("temperature", "importance_lr", "selection", "end_temperature")
    legacy_options = {"selection": "sparse", "end_temperature": 0.05}
    gates: dict[str, Gates | ReferenceGates] = field(init=False, repr=False)  # while gated
    _optimizer: torch.optim.Adam | None = field(init=False, default=None, repr=False)
    _bank_optimizer: torch.optim.Optimizer | None = field(init=False, default=None,
                                                          repr=False)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sparsefx.DST: temperature={self.temperature!r}: expected > 0")
        if not self.importance_lr > 0:
            raise ValueError(f"sparsefx.DST: importance_lr={self.importance_lr!r}: "
                             "expected > 0")
        if self.selection not in SELECTIONS:
            raise ValueError(f"sparsefx.DynaDiag: selection={self.selection!r}: expected one "
                             f"of {SELECTIONS}")
        if not self.end_temperature > 0:
            raise ValueError(f"sparsefx.DynaDiag: end_temperature={self.end_temperature!r}: "
                             "expected > 0")
        self.gates = {}

    def works_on(self, pattern) -> bool:  # gates diagonals: diag and its blocked kin
        return issubclass(pattern.layer, DiagLinear)

    @property
    def reference(self) -> bool:
        return self.selection == "reference"

    @property
    def moves(self) -> bool:  # the reference rule selects by its gates, with no updates
        return not self.reference

    @property
    def needs_gradient(self) -> bool:
        return not self.reference

    @property
    def works_every_step(self) -> bool:
        return self._optimizer is not None

    def attach(self, ctx) -> None:
        if self.reference:
            self._attach_reference(ctx)
            return
        temperatures = {}
        for layer in ctx.layers:
            module = layer.module
            device = module.values.device
            importance = torch.zeros(module.num_candidates, dtype=torch.float32, device=device)
            importance[module.unit_ids()] = 1.0
            importance.requires_grad_(True)
            # one temperature tensor per device, shared by the layers: one write per step
            if device not in temperatures:
                temperatures[device] = torch.tensor(self.temperature, dtype=torch.float32,
                                                    device=device)
            self.gates[layer.name] = Gates(importance, module, temperatures[device])
            module.set_value_transform(self.gates[layer.name])
        self._temperatures = list(temperatures.values())
        importances = [gates.importance for gates in self.gates.values()]
        # scratch for _importance_adam_step, which holds when all layers share a device
        self._found_inf = self._one = None
        if len(temperatures) == 1:
            self._found_inf = torch.zeros((), device=importances[0].device)
            self._one = torch.ones((), device=importances[0].device)
        # holds the state (and its checkpoint format); _importance_adam_step takes the steps
        self._optimizer = torch.optim.Adam(importances, lr=self.importance_lr, fused=True)

    def _attach_reference(self, ctx) -> None:
        from sparsefx.layers import BlockDiagLinear
        blocked = [layer.name for layer in ctx.layers
                   if isinstance(layer.module, BlockDiagLinear)]
        if blocked:
            raise ValueError(f"sparsefx.DST: DynaDiag(selection='reference') gates single "
                             f"diagonals: layers {blocked} are blockdiag")
        if ctx.world > 1:
            raise ValueError("sparsefx.DST: DynaDiag(selection='reference') runs in one "
                             "process (its bank of diagonals is not reduced over ranks)")
        temperature = torch.tensor(self.temperature, dtype=torch.float32)
        banks, groups = [], []
        for layer in ctx.layers:
            module = layer.module
            device = module.values.device
            num_candidates = module.num_candidates
            importance = torch.full((num_candidates,), 1.0 / num_candidates, device=device,
                                    requires_grad=True)
            inactive = torch.ones(num_candidates, dtype=torch.bool, device=device)
            inactive[module.offsets] = False
            bank_offsets = inactive.nonzero()[:, 0]
            bound = 1.0 / math.sqrt(module.in_features)  # nn.Linear's initialisation
            bank = torch.empty(bank_offsets.numel(), module.values.shape[1], device=device,
                               dtype=module.values.dtype).uniform_(-bound, bound)
            bank.requires_grad_(True)
            self.gates[layer.name] = ReferenceGates(importance, module, bank, bank_offsets,
                                                    temperature.to(device))
            module.set_value_transform(self.gates[layer.name])
            banks.append(bank)
            groups.append(_group_of(ctx.optimizer, module.values))
        self._temperatures = [gates.temperature for gates in self.gates.values()]
        self._bank_groups = groups
        optimizer = ctx.optimizer
        self._bank_optimizer = type(optimizer)(
            [{"params": [bank], **_settings(optimizer, group)}
             for bank, group in zip(banks, groups, strict=True)],
            **_settings(optimizer, optimizer.defaults))
        self._found_inf = torch.zeros(())
        self._one = torch.ones(())
        self._optimizer = torch.optim.Adam([gates.importance for gates in self.gates.values()],
                                           lr=self.importance_lr, fused=True)

    def _reference_step(self, ctx) -> None:
        """Until ``t_end``: the importances' Adam step, the bank's step at the model
        optimizer's current settings, the next temperature; at ``t_end``, the freeze."""
        if ctx.step <= ctx.end_step:
            _importance_adam_step(self._optimizer, self._found_inf, self._one, self._one)
            for bank_group, group in zip(self._bank_optimizer.param_groups, self._bank_groups,
                                         strict=True):
                bank_group.update(_settings(ctx.optimizer, group))
            if all(gates.bank.grad is not None for gates in self.gates.values()):
                self._bank_optimizer.step()
        for gates in self.gates.values():
            gates.importance.grad = gates.bank.grad = None
        if ctx.step >= ctx.end_step:
            self._freeze(ctx)
            return
        for tensor in self._temperatures:
            tensor.fill_(self._temperature_at(ctx, ctx.step))

    def _freeze(self, ctx) -> None:
        """Keep the ``K`` diagonals of largest importance (ties: the lower offset) with
        gates of 1, as the reference does; a kept diagonal from the bank brings its value
        and its optimizer state into a slot the layer's dropped diagonals freed."""
        from sparsefx.kernels.topk import top_ids
        for layer in ctx.layers:
            gates, module = self.gates[layer.name], layer.module
            num_kept = module.offsets.numel()
            chosen = torch.zeros(module.num_candidates, dtype=torch.bool,
                                 device=module.offsets.device)
            chosen[top_ids(gates.importance.detach()[None, :], num_kept, ordered=False)[0]] = True
            freed = (~chosen[module.offsets]).nonzero()[:, 0]
            incoming = chosen[gates.bank_offsets].nonzero()[:, 0]
            module.offsets[freed] = gates.bank_offsets[incoming]
            module.values.data[freed] = gates.bank.detach()[incoming].to(module.values.dtype)
            user_state = ctx.optimizer.state.get(module.values, {})
            bank_state = self._bank_optimizer.state.get(gates.bank, {})
            for key, value in user_state.items():
                if torch.is_tensor(value) and value.shape == module.values.shape:
                    theirs = bank_state.get(key)
                    value[freed] = (theirs[incoming].to(value.dtype) if torch.is_tensor(theirs)
                                    and theirs.shape == gates.bank.shape else 0)
            module.set_value_transform(None)
        self.gates, self._optimizer, self._bank_optimizer, self._temperatures = {}, None, None, []

    def every_step(self, ctx) -> None:
        """One Adam step on the importances (skipped if a gradient is not finite), then the
        temperature of the next step. Runs every step, so kept to a few small ops."""
        if self._optimizer is None:
            return
        if self.reference:
            self._reference_step(ctx)
            return
        importances = [gates.importance for gates in self.gates.values()]
        if ctx.step <= ctx.end_step:
            grads = [importance.grad for importance in importances
                     if importance.grad is not None]
            if ctx.world > 1:
                distributed.mean_over_ranks_(*grads)
            # under a GradScaler, the gradients as the scaled loss gave them
            inverse_scale = ctx.inverse_grad_scale
            if self._one is not None:
                _importance_adam_step(self._optimizer, self._found_inf, self._one,
                                      self._one if inverse_scale is None else inverse_scale)
            elif all(bool(torch.isfinite(grad).all()) for grad in grads):  # several devices
                if inverse_scale is not None:
                    for grad in grads:
                        grad.mul_(inverse_scale.to(grad.device))
                self._optimizer.step()
        for importance in importances:
            importance.grad = None
        temperature = self._temperature_at(ctx, ctx.step)
        for tensor in self._temperatures:
            tensor.fill_(temperature)

    def _temperature_at(self, ctx, step: int) -> float:
        if self.reference:
            progress = min(1.0, step / ctx.end_step)
            return self.end_temperature + (self.temperature - self.end_temperature) * (
                1 + math.cos(math.pi * progress)) / 2
        return self.temperature * max(0.0, 1.0 - step / ctx.end_step)

    needs_old_slots = True

    def magnitudes(self, layer, active: torch.Tensor, rows=None) -> torch.Tensor:
        return self.gates[layer.name].importance[active]

    def after_write(self, ctx, layer, active, new_active, grown) -> None:
        old_offsets, offsets, grown = active[0], new_active[0], grown[0]
        importance = self.gates[layer.name].importance
        importance[offsets[grown]] = importance[old_offsets].median()
        zero_state(self._optimizer, importance, torch.zeros_like(
            importance, dtype=torch.bool).index_fill_(0, offsets[grown], True))
        inactive = torch.ones_like(importance, dtype=torch.bool).index_fill_(0, offsets, False)
        importance[inactive] = importance[offsets].min() - 1.0

    def finish(self, ctx) -> None:
        """At the last step the gates are exactly 1 (``T = 0`` from ``t_end`` on): fold them
        into the values and drop them, so the trained model computes its plain sparse op, as
        ``densify`` and a state_dict loaded elsewhere do."""
        if self._optimizer is None:
            return
        if self.reference:
            self._freeze(ctx)
            return
        for layer in ctx.layers:
            gates = self.gates[layer.name].gates()
            layer.module.values.mul_(gates[:, None].to(layer.module.values.dtype))
            layer.module.set_value_transform(None)
        self.gates, self._optimizer, self._temperatures = {}, None, []

    def state_dict(self) -> dict:
        state = {"importance": {name: gates.importance.detach().clone()
                                for name, gates in self.gates.items()}}
        if self._optimizer is not None:
            state["importance_optimizer"] = self._optimizer.state_dict()
        if self._bank_optimizer is not None:
            state["bank"] = {name: (gates.bank.detach().clone(), gates.bank_offsets.clone())
                             for name, gates in self.gates.items()}
            state["bank_optimizer"] = self._bank_optimizer.state_dict()
        return state

    @torch.no_grad()
    def state_layers(self, state: dict) -> set[str]:
        return set(state.get("importance", {})) | set(state.get("bank", {}))

    def load_state_dict(self, ctx, state: dict) -> None:
        gated = self._optimizer is not None
        if state["importance"] and not gated:
            self.attach(ctx)
        elif gated and not state["importance"]:
            self.finish(ctx)  # saved after the run finished
        for name, importance in state["importance"].items():
            self.gates[name].importance.copy_(importance)
        for name, (bank, offsets) in state.get("bank", {}).items():
            self.gates[name].bank.copy_(bank)
            self.gates[name].bank_offsets.copy_(offsets)
        for tensor in getattr(self, "_temperatures", []):
            tensor.fill_(self._temperature_at(ctx, ctx.step))
        if self._optimizer is not None:
            self._optimizer.load_state_dict(state["importance_optimizer"])
        if self._bank_optimizer is not None and "bank_optimizer" in state:
            self._bank_optimizer.load_state_dict(state["bank_optimizer"])


def _importance_adam_step(optimizer: torch.optim.Adam, found_inf: torch.Tensor,
                          one: torch.Tensor, inverse_scale: torch.Tensor) -> None:
    """``optimizer.step()`` for DynaDiag's importances, ``optimizer`` an ``Adam(fused=True)``
    (one group; no weight decay, amsgrad or maximize): the same fused kernel on the same
    state, without Adam's bookkeeping around it. This runs every step, right after the
    model's optimizer, when each op costs far more than its arithmetic (its code and data
    are out of cache): here three ops and a read of one number. A step whose gradients are
    not all finite is skipped. Parameters without a gradient are skipped, as Adam does.
    ``found_inf`` (0-dim, zero) and ``one`` are scratch tensors kept by the caller; the
    gradients are multiplied by ``inverse_scale`` (``one``, or a GradScaler's ``1 / scale``)."""
    group = optimizer.param_groups[0]
    params = [param for param in group["params"] if param.grad is not None]
    if not params:
        return
    grads = [param.grad for param in params]
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse_scale)
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


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("sparsefx.DST: the optimizer does not train a diag layer's values")


def _settings(optimizer: torch.optim.Optimizer, group: dict) -> dict:
    """The constructor settings of ``group`` (lr, betas, weight decay, ...), as a learning
    rate schedule left them this step."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {key: group[key] for key in optimizer.defaults if key in group and key in accepted}
