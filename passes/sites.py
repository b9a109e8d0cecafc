"""Find the matmuls a transform may sparsify, and which of them must stay dense.

Two kinds of site:

* ``module``: an ``nn.Linear`` (or subclass), matched by type anywhere in the model;
* ``functional``: in a traced part, ``F.linear``, ``torch.addmm`` or ``torch.matmul`` / ``@``
  whose weight operand is a parameter or its transpose (GPT-2's ``Conv1D`` keeps ``W`` as
  ``(in, out)`` and calls ``addmm``).

A site stays dense, with the reason recorded, when its weight is tied or shared (used by
another module or op too), or when its owner reads the weight directly instead of calling
the layer (``nn.MultiheadAttention``'s ``out_proj``).
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Site", "find_module_sites", "find_functional_sites", "parameter_use_counts",
           "mark_routers", "ROUTER"]


@dataclass
class Site:
    """One matmul that could become sparse."""

    name: str                 # FQN the sparse layer takes (the module, or the weight's path)
    out_features: int
    in_features: int
    kind: str                 # "module" or "functional"
    dense_reason: str | None = None  # why it must stay dense, if it must
    part: str | None = None   # functional: FQN of the traced part holding the node
    node: str | None = None   # functional: the node's name in that part's graph
    transposed: bool = False  # functional: the weight parameter is stored as (in, out)
    default_dense: str | None = None  # why it stays dense unless an override names it


ROUTER = "router: its outputs pick the experts (name it in overrides= to make it sparse)"


def mark_routers(model: nn.Module, sites: list[Site]) -> None:
    """A site whose module (a Linear, or the module owning a functional site's weight) sits
    beside an ``experts`` module and has one output per expert is a mixture-of-experts
    router: it stays dense by default (``Site.default_dense``): tiny, and every token's
    choice of experts goes through it."""
    modules = dict(model.named_modules())
    for site in sites:
        owner = site.name if site.kind == "module" else site.name.rpartition(".")[0]
        parent = modules.get(owner.rpartition(".")[0] if "." in owner else "")
        experts = getattr(parent, "experts", None) if parent is not None else None
        count = getattr(experts, "num_experts", None)
        if count is None and isinstance(experts, nn.ModuleList):
            count = len(experts)
        if count is not None and site.out_features == count and owner != "":
            site.default_dense = ROUTER


def parameter_use_counts(model: nn.Module) -> Counter:
    """How many (module, name) slots hold each parameter: more than one means tied."""
    return Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))


def find_module_sites(model: nn.Module) -> list[Site]:
    """Every ``nn.Linear`` of ``model`` in definition order (subclasses included)."""
    uses = parameter_use_counts(model)
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        parent = modules[name.rpartition(".")[0]]
        reason = None
        if module.weight.numel() == 0:
            reason = "empty weight: nothing to sparsify"
        elif isinstance(parent, nn.MultiheadAttention):
            reason = "read directly by nn.MultiheadAttention, which never calls it"
        elif uses[id(module.weight)] > 1:
            reason = "weight is tied to another module"
        sites.append(Site(name, module.out_features, module.in_features, "module", reason))
    return sites


_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, operator.matmul}


def _parameter(gm: fx.GraphModule, node) -> tuple[str, bool] | None:
    """``(target, transposed)`` if ``node`` is a 2-D parameter or its transpose."""
    transposed = False
    if isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        is_t = (node.op == "call_method" and node.target == "t") or node.target is torch.t
        is_transpose = (node.op == "call_method" and node.target == "transpose"
                        and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1])
        is_attr_t = node.target is getattr and node.args[1:] == ("T",)
        if not (is_t or is_transpose or is_attr_t):
            return None
        node, transposed = node.args[0], True
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return (node.target, transposed) if value.dim() == 2 else None


def is_metadata_read(node: fx.Node) -> bool:
    """``p.shape``, ``p.size(...)``, ``p.dim()``, ``p.dtype``, ``p.device``: reads that do not
    use the values, so a weight read this way is not shared."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


def find_functional_sites(part: str, gm: fx.GraphModule, model_uses: Counter) -> list[Site]:
    """Functional matmuls on a parameter in the traced part ``gm`` (at FQN ``part``)."""
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _LINEAR:
            weight_arg, stored_in_out = node.args[1] if len(node.args) > 1 else None, False
        elif node.target is torch.addmm:
            weight_arg, stored_in_out = node.args[2] if len(node.args) > 2 else None, True
        elif node.target in _MATMUL:
            weight_arg, stored_in_out = node.args[1] if len(node.args) > 1 else None, True
        else:
            continue
        found = _parameter(gm, weight_arg)
        if found is None:
            continue
        target, transpose_op = found
        transposed = stored_in_out != transpose_op  # stored as (in, out)
        rows, cols = gm.get_parameter(target).shape
        out_features, in_features = (cols, rows) if transposed else (rows, cols)
        param_node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
        owner = target.rpartition(".")[0]
        reason = None
        if rows * cols == 0:
            reason = "empty weight: nothing to sparsify"
        elif model_uses[id(gm.get_parameter(target))] > 1:
            reason = "weight is tied to another module"
        elif any(owner == c or owner.startswith(f"{c}.") for c in called if owner):
            reason = "weight is also used by the module that owns it"
        elif (sum(not is_metadata_read(user) for user in param_node.users) > 1
              or (weight_arg is not param_node and len(weight_arg.users) > 1)):
            reason = "weight is shared by several ops"
        elif node.target is torch.addmm and (node.kwargs.get("alpha", 1) != 1
                                             or node.kwargs.get("beta", 1) != 1):
            reason = "addmm with alpha/beta other than 1"
        name = f"{part}.{target}" if part else target
        sites.append(Site(name, out_features, in_features, "functional", reason, part,
                          node.name, transposed))
    return sites
