"""Mixture-of-experts weights as one Linear per expert, so that each expert can be sparse.

The MoE models of ``transformers`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
Granite-MoE, ...) keep all of a layer's experts in two 3D parameters, ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]``, applied as ``F.linear(x, self.gate_up_proj[e])``
inside a loop over the experts the router picked: no Linear call, no traceable site, so no
rewrite reaches the weights that make up most of an MoE model. ``sparsefx.transform`` swaps
each such module for an ``Experts`` here: the same computation (the same ``forward(
hidden_states, top_k_index, top_k_weights)``, the eager loop), with ``gate_up[e]`` and
``down[e]`` as ``nn.Linear`` modules, which the transform then makes sparse one by one like
any other Linear, and DST moves each expert's structure on its own. It loads the original
module's state dict (``gate_up_proj``, ``down_proj``), and ``to_torch()`` (used by
``sparsefx.densify``) gives back the original module with its 3D parameters.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.nn as nn

__all__ = ["Experts", "is_expert_bank", "swap_experts"]

_FORWARD = ["hidden_states", "top_k_index", "top_k_weights"]


def is_expert_bank(module: nn.Module) -> bool:
    """Whether ``module`` keeps its experts as ``gate_up_proj [E, 2I, H]`` and ``down_proj
    [E, H, I]`` (its only parameters), applied by ``forward(hidden_states, top_k_index,
    top_k_weights)`` with ``act_fn``, as the transformers MoE models do."""
    parameters = dict(module.named_parameters(recurse=False))
    children = [name for name, _ in module.named_children()]
    if set(parameters) != {"gate_up_proj", "down_proj"} or children not in ([], ["act_fn"]):
        return False
    gate_up, down = parameters["gate_up_proj"], parameters["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts, double_intermediate, hidden = gate_up.shape
    if double_intermediate % 2 or tuple(down.shape) != (experts, hidden,
                                                        double_intermediate // 2):
        return False
    try:
        arguments = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return arguments == _FORWARD and callable(getattr(module, "act_fn", None))


class Experts(nn.Module):
    """An expert bank with one ``nn.Linear`` per expert and projection (see the module
    docstring)."""

    def __init__(self, bank: nn.Module):
        super().__init__()
        gate_up, down = bank.gate_up_proj, bank.down_proj
        self.num_experts, double_intermediate, self.hidden_dim = gate_up.shape
        self.intermediate_dim = double_intermediate // 2
        factory = dict(device=gate_up.device, dtype=gate_up.dtype)
        self.gate_up = nn.ModuleList(
            nn.Linear(self.hidden_dim, double_intermediate, bias=False, **factory)
            for _ in range(self.num_experts))
        self.down = nn.ModuleList(
            nn.Linear(self.intermediate_dim, self.hidden_dim, bias=False, **factory)
            for _ in range(self.num_experts))
        self.act_fn = bank.act_fn
        # the original module without its data, to give it back (to_torch); not a submodule
        # (nothing of it is state)
        object.__setattr__(self, "_original", _without_data(bank))
        self._register_load_state_dict_pre_hook(_from_bank_keys)
        self.load_state_dict({"gate_up_proj": gate_up.detach(), "down_proj": down.detach()})

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' eager loop, as the original module's: each token through the
        ``top_k`` experts the router gave it, weighted and summed."""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == self.num_experts:
                continue
            position, token = torch.where(mask[expert])
            gate, up = self.gate_up[expert](hidden_states[token]).chunk(2, dim=-1)
            out = self.down[expert](self.act_fn(gate) * up)
            out = out * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    @torch.no_grad()
    def to_torch(self) -> nn.Module:
        """The original module, its 3D parameters stacked from the experts' (dense) weights."""
        bank = copy.deepcopy(self._original)
        dense = lambda layer: (layer.dense_weight() if hasattr(layer, "dense_weight")
                               else layer.weight).detach()
        bank.gate_up_proj = nn.Parameter(torch.stack([dense(l) for l in self.gate_up]))
        bank.down_proj = nn.Parameter(torch.stack([dense(l) for l in self.down]))
        bank.train(self.training)
        return bank


def _without_data(bank: nn.Module) -> nn.Module:
    """A copy of ``bank`` whose parameters are on the meta device (no memory)."""
    parameters = bank._parameters
    bank._parameters = {}
    try:
        template = copy.deepcopy(bank)
    finally:
        bank._parameters = parameters
    for name, parameter in parameters.items():
        template._parameters[name] = nn.Parameter(torch.empty_like(parameter, device="meta"))
    return template


def _from_bank_keys(state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """Load hook: the original module's ``gate_up_proj`` / ``down_proj`` become the experts'
    ``gate_up.<e>.weight`` / ``down.<e>.weight``."""
    for stacked, name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        weights = state_dict.pop(prefix + stacked, None)
        if weights is not None:
            for expert, weight in enumerate(weights.unbind(0)):
                state_dict[f"{prefix}{name}.{expert}.weight"] = weight


def swap_experts(model: nn.Module) -> list[str]:
    """Replace every expert bank of ``model`` (``is_expert_bank``), in place, by an
    ``Experts``; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if name and is_expert_bank(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Experts(module))
            swapped.append(name)
    return swapped
