"""Trace a model with torch.fx, whole if it can be, else its largest traceable submodules."""
from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

__all__ = ["trace_parts"]

logger = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    """The default tracer, plus the user's leaf modules (by type or by FQN within the part)."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_types, self.leaf_names = leaf_types, leaf_names

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, self.leaf_types) or qualified_name in self.leaf_names
                or super().is_leaf_module(module, qualified_name))


def trace_parts(model: nn.Module, leaf_modules=(), concrete_args: dict | None = None
                ) -> dict[str, fx.GraphModule]:
    """``{fqn: GraphModule}`` for the largest traceable submodules of ``model``.

    Tries the whole model first (with ``concrete_args``); where ``symbolic_trace`` fails
    (data-dependent control flow, unsupported Python), tries each child in turn, and so on
    down. Leaf modules -- ``torch.nn`` built-ins, types or FQNs named in ``leaf_modules`` --
    are never traced into. The model is not modified.
    """
    leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    leaf_names = frozenset(leaf for leaf in leaf_modules if isinstance(leaf, str))

    def visit(fqn: str, module: nn.Module) -> dict[str, fx.GraphModule]:
        prefix = f"{fqn}." if fqn else ""
        tracer = _Tracer(leaf_types, frozenset(name[len(prefix):] for name in leaf_names
                                               if name.startswith(prefix)))
        if fqn in leaf_names or isinstance(module, leaf_types):
            return {}
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # no forward: go inside
            return {name: gm for child_name, child in module.named_children()
                    for name, gm in visit(prefix + child_name, child).items()}
        if fqn and tracer.is_leaf_module(module, ""):
            return {}
        try:
            graph = tracer.trace(module, concrete_args if not fqn else None)
        except Exception as error:  # fx raises many kinds; any of them means "go deeper"
            logger.debug("sparsefx: %s is not traceable (%s); tracing its children",
                         fqn or "the model", error)
            parts = {}
            for child_name, child in module.named_children():
                parts |= visit(prefix + child_name, child)
            return parts
        return {fqn: fx.GraphModule(tracer.root, graph, type(module).__name__)}

    return visit("", model)
