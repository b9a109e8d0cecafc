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
active diagonals are stored and computed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsefx.kernels import distributed
from sparsefx.layers import soft_top_k_gates

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


@dataclass
class DynaDiag(Method):
    temperature: float = 0.25    # the gates' initial temperature, falling to 0 at t_end
    importance_lr: float = 1e-2  # Adam's learning rate for the importances
    name = "dynadiag"
    option_names = ("temperature", "importance_lr")
    patterns = ("diag", "blockdiag")
    needs_gradient = True
    gates: dict[str, Gates] = field(init=False, repr=False)  # by layer name, while gated
    _optimizer: torch.optim.Adam | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sparsefx.DST: temperature={self.temperature!r}: expected > 0")
        if not self.importance_lr > 0:
            raise ValueError(f"sparsefx.DST: importance_lr={self.importance_lr!r}: "
                             "expected > 0")
        self.gates = {}

    @property
    def works_every_step(self) -> bool:
        return self._optimizer is not None

    def attach(self, dst) -> None:
        temperatures = {}
        for layer in dst.layers:
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
            module.value_transform = self.gates[layer.name]
        self._temperatures = list(temperatures.values())
        importances = [gates.importance for gates in self.gates.values()]
        # scratch for _importance_adam_step, which holds when all layers share a device
        self._found_inf = self._one = None
        if len(temperatures) == 1:
            self._found_inf = torch.zeros((), device=importances[0].device)
            self._one = torch.ones((), device=importances[0].device)
        # holds the state (and its checkpoint format); _importance_adam_step takes the steps
        self._optimizer = torch.optim.Adam(importances, lr=self.importance_lr, fused=True)

    def every_step(self, dst) -> None:
        """One Adam step on the importances (skipped if a gradient is not finite), then the
        temperature of the next step. Runs every step, so kept to a few small ops."""
        if self._optimizer is None:
            return
        importances = [gates.importance for gates in self.gates.values()]
        if dst.step_count <= dst.end_step:
            grads = [importance.grad for importance in importances
                     if importance.grad is not None]
            if dst.world > 1:
                distributed.mean_over_ranks_(*grads)
            # under a GradScaler, the gradients as the scaled loss gave them
            inverse_scale = dst.inverse_grad_scale
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
        temperature = self._temperature_at(dst, dst.step_count)
        for tensor in self._temperatures:
            tensor.fill_(temperature)

    def _temperature_at(self, dst, step: int) -> float:
        return self.temperature * max(0.0, 1.0 - step / dst.end_step)

    def magnitudes(self, layer, active: torch.Tensor) -> torch.Tensor:
        return self.gates[layer.name].importance[active]

    def after_write(self, dst, layer, active, new_active, grown) -> None:
        old_offsets, offsets, grown = active[0], new_active[0], grown[0]
        importance = self.gates[layer.name].importance
        importance[offsets[grown]] = importance[old_offsets].median()
        dst.zero_state(self._optimizer, importance, torch.zeros_like(
            importance, dtype=torch.bool).index_fill_(0, offsets[grown], True))
        inactive = torch.ones_like(importance, dtype=torch.bool).index_fill_(0, offsets, False)
        importance[inactive] = importance[offsets].min() - 1.0

    def finish(self, dst) -> None:
        """At the last step the gates are exactly 1 (``T = 0`` from ``t_end`` on): fold them
        into the values and drop them, so the trained model computes its plain sparse op, as
        ``densify`` and a state_dict loaded elsewhere do."""
        if self._optimizer is None:
            return
        for layer in dst.layers:
            gates = self.gates[layer.name].gates()
            layer.module.values.mul_(gates[:, None].to(layer.module.values.dtype))
            layer.module.value_transform = None
        self.gates, self._optimizer, self._temperatures = {}, None, []

    def state_dict(self) -> dict:
        state = {"importance": {name: gates.importance.detach().clone()
                                for name, gates in self.gates.items()}}
        if self._optimizer is not None:
            state["importance_optimizer"] = self._optimizer.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, dst, state: dict) -> None:
        gated = self._optimizer is not None
        if state["importance"] and not gated:
            self.attach(dst)
        elif gated and not state["importance"]:
            self.finish(dst)  # saved after the run finished
        for name, importance in state["importance"].items():
            self.gates[name].importance.copy_(importance)
        for tensor in getattr(self, "_temperatures", []):
            tensor.fill_(self._temperature_at(dst, dst.step_count))
        if self._optimizer is not None:
            self._optimizer.load_state_dict(state["importance_optimizer"])


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
