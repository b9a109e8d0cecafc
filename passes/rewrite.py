"""Rewrite sites into sparse layer modules."""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .sites import Site, is_metadata_read

__all__ = ["replace_module", "rewrite_functional_sites"]

# builds the sparse layer for a site from its dense weight (out, in) and bias (or None)
MakeLayer = Callable[[Site, torch.Tensor, torch.Tensor | None], nn.Module]


def replace_module(root: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at FQN ``name`` of ``root`` (the FQN stays what it was)."""
    if not name:
        raise ValueError("replace_module: name is '': the root module cannot be replaced in "
                         "place (the caller returns the new module instead)")
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, layer)


def _inline_metadata_reads(gm: fx.GraphModule, target: str, weight: torch.Tensor) -> None:
    """Replace reads of the weight's shape / dtype / device by their (static) values, since
    the parameter is about to go."""
    for param_node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]:
        for user in [u for u in param_node.users if is_metadata_read(u)]:
            if user.op == "call_function":
                value = getattr(weight, user.args[1])
            else:
                value = getattr(weight, user.target)(*user.args[1:], **user.kwargs)
            for consumer in list(user.users):
                substitute = lambda a, u=user, v=value: v if a is u else a
                consumer.args = fx.node.map_arg(consumer.args, substitute)
                consumer.kwargs = fx.node.map_arg(consumer.kwargs, substitute)
            gm.graph.erase_node(user)


def _takes_bias(layer: nn.Module) -> bool:
    """Does ``layer.forward`` take a ``bias`` argument (the sparse layers do; a layer kept
    dense, an ``nn.Linear``, does not)?"""
    return "bias" in inspect.signature(layer.forward).parameters


def _is_vector_parameter(gm: fx.GraphModule, node, length: int) -> bool:
    """Is ``node`` a ``get_attr`` of a ``[length]`` tensor (a bias the op can take)?"""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    owner_name, _, attribute = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner_name), attribute, None)
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (length,)


def rewrite_functional_sites(gm: fx.GraphModule, sites: list[Site],
                             make_layer: MakeLayer) -> fx.GraphModule:
    """Replace each site's ``F.linear`` / ``addmm`` / ``matmul`` node in ``gm`` by a call to a
    sparse layer that takes the weight parameter's place (and FQN, relative to ``gm``).

    The layer computes ``x @ W.T``; a bias the op added stays its own parameter (FQN and
    value untouched) and is passed to the layer, which adds it in the same pass, when it is
    a ``[out]`` parameter; any other bias (a broadcast ``addmm`` input) stays a separate
    ``add``. Everything else in the graph is left alone. Returns ``gm``, linted and
    recompiled.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    prefix = f"{sites[0].part}." if sites and sites[0].part else ""
    for site in sites:
        node = nodes[site.node]
        target = site.name[len(prefix):]
        weight = gm.get_parameter(target).detach()
        if node.target is torch.addmm:
            bias, x = node.args[0], node.args[1]
        elif node.target in (torch.matmul, operator.matmul):
            bias, x = None, node.args[0]
        else:  # F.linear
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        layer = make_layer(site, weight.T if site.transposed else weight, None)
        _inline_metadata_reads(gm, target, weight)
        owner_name, _, attribute = target.rpartition(".")
        delattr(gm.get_submodule(owner_name), attribute)
        gm.get_submodule(owner_name).add_module(attribute, layer)
        with gm.graph.inserting_before(node):
            if _takes_bias(layer) and _is_vector_parameter(gm, bias, site.out_features):
                replacement = gm.graph.call_module(target, (x,), {"bias": bias})
            else:
                replacement = gm.graph.call_module(target, (x,))
                if bias is not None:
                    replacement = gm.graph.call_function(operator.add, (replacement, bias))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
