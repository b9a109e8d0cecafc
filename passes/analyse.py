"""Graph questions about a transformed model, answered with networkx.

``layer_graph`` traces the model (sparse layers as leaves) and returns a ``networkx.DiGraph``
whose nodes are the sparse layers' FQNs and whose edges ``a -> b`` say that ``a``'s outputs
reach ``b``'s inputs feature for feature: through elementwise ops only (activations,
dropout, per-feature bias or scale). Along such an edge, an output neuron of ``a`` that is
ablated leaves the matching input column of ``b`` unused, so ``b`` can shrink with it. Each
node's ``input`` attribute names the graph value it reads: layers with equal ``input`` share
their input (query/key/value projections, say), which ``shared_inputs`` groups.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .trace import trace_parts

__all__ = ["layer_graph", "shared_inputs"]

_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                        nn.Dropout, nn.Identity, nn.Mish, nn.Hardswish)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu,
                          F.elu, F.dropout, F.mish, torch.relu, F.hardswish}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
_ARITHMETIC = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul}


def _passes_features_through(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """True if ``node`` maps each feature of ``source`` to the same feature, alone."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ELEMENTWISE_MODULES)
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _ELEMENTWISE_FUNCTIONS:
        return True
    if node.target in _ARITHMETIC:  # with a constant or a parameter, not another activation
        others = [a for a in node.args if a is not source]
        return all(not isinstance(a, fx.Node) or a.op == "get_attr" for a in others)
    return False


def layer_graph(model: nn.Module, layer_types: tuple[type, ...]) -> nx.DiGraph:
    """The feeds-into graph of the layers of ``layer_types`` in ``model`` (see module doc)."""
    graph = nx.DiGraph()
    for part, gm in trace_parts(model, layer_types).items():
        prefix = f"{part}." if part else ""
        layers = {node: prefix + node.target for node in gm.graph.nodes
                  if node.op == "call_module"
                  and isinstance(gm.get_submodule(node.target), layer_types)}
        for node, name in layers.items():
            source = node.args[0]
            graph.add_node(name, input=prefix + getattr(source, "name", str(source)))
        for node, name in layers.items():
            frontier, seen = [node], {node}
            while frontier:
                current = frontier.pop()
                for user in current.users:
                    if user in seen:
                        continue
                    seen.add(user)
                    if user in layers and user.args and user.args[0] is current:
                        graph.add_edge(name, layers[user])
                    elif _passes_features_through(gm, user, current):
                        frontier.append(user)
    return graph


def shared_inputs(graph: nx.DiGraph) -> list[list[str]]:
    """Groups (of two or more) of layers that read the same input."""
    groups = defaultdict(list)
    for name, data in graph.nodes(data=True):
        groups[data["input"]].append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]
