"""The sparse layers under the DST manager: the user's module found under its wrappers, one
``Layer`` record per sparse layer, and the checks the manager makes of them when it starts
and before an update (the optimizer trains them, every rank holds the same structure, no
layer is called twice in one forward, the gradients are finite)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from sparsefx.kernels import distributed, growth
from sparsefx.layers import SPARSE_LAYERS
from sparsefx.methods import Method
from sparsefx.optimizer_state import carried_state, zero_state
from sparsefx.registry import PATTERNS

__all__ = ["unwrap", "Layer", "find_layers", "check_optimizer",
           "check_same_structure_on_every_rank", "layers_with_non_finite_gradients",
           "shared_layers_error", "calls_per_forward",
           "latest_scores_only"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile's and (Distributed)DataParallel's wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


class Owner(Protocol):
    """What a ``Layer`` asks of the manager that holds it."""

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    def units_moved(self, units: int) -> int: ...
    def resized(self, layer: Layer) -> None: ...


@dataclass(eq=False)
class Layer:
    """One sparse layer under the manager, and the handle a method is given for it
    (``sparsefx.methods.base.Layer``): its units, the listed candidates and the writes of a
    new structure. What its pattern means for an update the layer module says
    (``sparsefx.layers``); what the method keeps about it, the method."""

    name: str
    module: nn.Module
    owner: Owner = field(repr=False)
    probe: torch.Tensor | None = None  # float32 leaf; its .grad holds the growth scores
    probe_for: tuple[int, ...] = ()  # the structure shape the probe was sized for
    # what the layer held when DST was made: an update checks it still does
    trained: torch.Tensor | None = None
    structure_shape: tuple[int, ...] = ()
    _lists: growth.Listed | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.trained = self.module.param
        self.structure_shape = tuple(self.module.structure.shape)

    @property
    def param(self) -> torch.Tensor:
        return self.module.param

    def units_moved(self, units: int) -> int:
        return self.owner.units_moved(units)

    def lists(self) -> growth.Listed:
        """The growth tap's lists at this update (views of the probe), parsed once per update:
        a method asks for them a block of rows at a time."""
        if self._lists is None:
            module = self.module
            self._lists = growth.listed_candidates(
                self.probe.grad, module.structure, module.growth_granularity,
                module.tap_plan, module.out_features, module.in_features)
        return self._lists

    def forget_lists(self) -> None:
        """After the update: the next one parses its own."""
        self._lists = None

    def listed(self, active: torch.Tensor, rows: slice | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, growth.Listed]:
        """``(candidate_ids, scores)`` rows for ``regrow.drop_and_grow``: the active slots
        ``active`` (of the slot rows ``rows``, default all), then the inactive candidates the
        growth tap listed; and the parsed lists (of those rows)."""
        listed = self.lists()
        if rows is not None:
            listed = listed.rows(rows)
        return (*self.module.listed_candidates(listed, active), listed)

    def write(self, new_active: torch.Tensor, grown: torch.Tensor) -> None:
        """Store the new structure in place; zero the grown units and their optimizer state."""
        where = self.module.write_structure(new_active, grown)
        self.param.masked_fill_(where, 0)
        zero_state(self.owner.optimizer, self.param, where)

    def write_slots(self, new_active: torch.Tensor, source: torch.Tensor) -> None:
        """Store ``new_active [R, k']`` where each unit continues the old slot ``source``
        names (-1: a new unit, at zero with zeroed optimizer state). With ``k'`` the stored
        fan-in and every unit in its own slot, this is ``write``; otherwise the layer is
        resized (``FanInLinear.resize``: the same Parameter, new data) and the optimizer's
        state tensors are carried over with it. The growth probe is sized anew."""
        module = self.module
        slots = torch.arange(new_active.shape[1], device=source.device)[None, :]
        if (tuple(new_active.shape) == module.slot_shape
                and bool(((source == slots) | (source < 0)).all())):
            self.write(new_active, source < 0)
            return
        param, optimizer = self.param, self.owner.optimizer
        old_shape = param.shape
        module.resize(new_active, source)
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == old_shape:
                optimizer.state[param][key] = carried_state(value, source)
        param.grad = None  # this step's gradient was for the old slots, and is spent
        self.structure_shape = tuple(module.structure.shape)
        self.owner.resized(self)


def shared_layers_error(where: str, calls: dict[str, int], method: str) -> ValueError:
    described = ", ".join(f"{name} ({count} times)" for name, count in calls.items())
    error = (RuntimeError if where != "sparsefx.DST" else ValueError)
    return error(f"{where}: layer{'s' if len(calls) > 1 else ''} {described} called more than "
                 f"once in one forward (a shared module): method={method!r} grows by the "
                 "dense gradient of each layer, and the gradients of several calls cannot be "
                 "told apart in its growth scores. Give each use a layer of its own, keep the "
                 "shared layer dense (sparsefx.transform(..., exclude=...)), or use "
                 "method='set' or 'static', which read no gradient")


def calls_per_forward(model: nn.Module, layer: nn.Module) -> int:
    """The most calls of ``layer`` in one traced graph of ``model`` (``sparsefx.transform``'s
    GraphModules): a layer called twice there is known to be shared before any step. Eager
    code is not visible; the growth tap counts its calls at the first update."""
    most = 0
    for module in model.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(module, torch.fx.GraphModule) or graph is None:
            continue
        calls = sum(1 for node in graph.nodes if node.op == "call_module"
                    and _submodule(module, node.target) is layer)
        most = max(most, calls)
    return most


def _submodule(module: nn.Module, target: str) -> nn.Module | None:
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None




def find_layers(model: nn.Module, method: Method, owner: Owner) -> list[Layer]:
    layers = [Layer(name, module, owner) for name, module in model.named_modules()
              if isinstance(module, SPARSE_LAYERS)]
    if not layers:
        raise ValueError("sparsefx.DST: the model has no sparse layer (of the patterns "
                         f"{', '.join(PATTERNS)}): make it sparse with sparsefx.transform "
                         "first")
    allowed = tuple(name for name, pattern in PATTERNS.items() if method.works_on(pattern))
    wrong = [f"{layer.name} ({layer.module.pattern})" for layer in layers
             if layer.module.pattern not in allowed]
    if wrong:
        raise ValueError(f"sparsefx.DST: method={method.name!r} works on {', '.join(allowed)} "
                         f"layers; these are not: {', '.join(wrong)}")
    return layers


def check_optimizer(layers: list[Layer], optimizer: torch.optim.Optimizer) -> None:
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer in layers if id(layer.param) not in optimized]
    if missing:
        raise ValueError(f"sparsefx.DST: the optimizer does not train the weights of "
                         f"{', '.join(missing)}: build it from model.parameters() after "
                         "sparsefx.transform")


def check_same_structure_on_every_rank(layers: list[Layer]) -> None:
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


def layers_with_non_finite_gradients(layers: list[Layer]) -> list[str]:
    """Names of the layers whose weight gradient holds a NaN or an infinity, or whose growth
    tap saw one (its trailer says): one pass (the smallest and largest entry, NaN if any is)
    and one host sync for all."""
    names, extremes = [], []
    for layer in layers:
        grad = layer.param.grad
        if grad is not None and grad.numel():
            names.append(layer.name)
            extremes.append(torch.stack(grad.aminmax()).float())
        if layer.probe is not None and layer.probe.grad is not None:
            names.append(layer.name)
            extremes.append(growth.trailer(layer.probe.grad).float())
    if not extremes:
        return []
    finite = torch.stack(extremes).isfinite().all(dim=1).tolist()
    return list(dict.fromkeys(name for name, ok in zip(names, finite, strict=True) if not ok))


def latest_scores_only(probe: torch.Tensor):
    """A hook for ``probe``: the scores of a backward replace those of an earlier one in the
    same step (gradient accumulation runs several) instead of being added to them, which
    would be meaningless for norms and would corrupt the listed candidates' ids. So with
    gradient accumulation, the growth scores come from the step's last micro-batch."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        probe.grad = None
        return grad
    return hook
