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
``n = round(f(t) * k)`` per row of slots give or take one (the remainder carries over to the
next update, so that a layer of few units moves too: ``CosineSchedule.units_moved``; see
``sparsefx.regrow``). What moves, per method:

``static``, ``set`` and ``rigl`` work on every pattern, ``srigl`` on fan-in layers,
``dynadiag`` on the diagonal ones (``Method.works_on``; the README's pattern table, made from
the registry, lists them); each is a strategy object in ``sparsefx.methods`` (one file
each) with its own options and state: ``DST(model, opt, method=sparsefx.SRigL(gamma_sal=0.3),
total_steps=T)``, or by name with the options as keywords (``method="srigl",
gamma_sal=0.3``). The manager keeps the step count, the schedule
(``sparsefx.schedule.CosineSchedule``), arming the growth taps, skipping updates on
non-finite gradients, writing a new structure in place and zeroing its optimizer state, and
the checkpoint.

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
update with a warning. A layer called more than once in a forward (a shared module) is
refused by the methods that grow by the dense gradient: autograd would add the growth scores
of its calls, which mean nothing summed.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.nn as nn

from sparsefx import fsdp, methods
from sparsefx.dst_layers import (Layer, calls_per_forward, check_optimizer,
                                 check_same_structure_on_every_rank, find_layers,
                                 latest_scores_only, layers_with_non_finite_gradients,
                                 shared_layers_error, unwrap)
from sparsefx.kernels import distributed, growth
from sparsefx.layers import SPARSE_LAYERS
from sparsefx.methods import Method
from sparsefx.schedule import CosineSchedule

__all__ = ["DST", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = tuple(methods.METHODS)
# the layout of DST.state_dict(): 2 adds this key; format 1 (without it) reads the same
CHECKPOINT_FORMAT = 2



class DST:
    """Dynamic sparse training of every sparse layer of ``model`` (see the module docstring
    and ``sparsefx.methods`` for each method's exact rule).

    Args:
        model: a model holding sparse layers (any pattern's, from ``sparsefx.transform``),
            or its ``torch.compile`` / DDP wrapper.
        optimizer: the optimizer that trains the sparse layers' values; its state for grown
            units is zeroed at updates.
        method: a ``sparsefx.methods.Method`` (``Static()``, ``SET(seed)``, ``RigL()``,
            ``SRigL(gamma_sal, output_layers)``, ``DynaDiag(temperature, importance_lr)``)
            or its name: ``"static"``, ``"set"``, ``"rigl"``, ``"srigl"``, ``"dynadiag"``.
        total_steps: how many times ``step()`` will be called in the whole run.
        delta_t: steps between structure updates.
        alpha: the fraction moved at step 0 of the cosine schedule, in (0, 1].
        t_end: fraction of ``total_steps`` after which the structure is frozen.
        grad_scaler: the ``torch.amp.GradScaler`` the loss is scaled by, if any; call
            ``dst.step()`` after ``scaler.update()``. The gradients DST feeds an optimizer
            (DynaDiag's importances) are unscaled by it. The growth scores are only ranked
            within a layer, and the scale is a power of two, so they decide the same
            scaled or not.
        **method_options: with a method name, its options (``gamma_sal=0.3``,
            ``temperature=...``, ``seed=...``: see the method's class; ``None``: its
            default), passed through unread; an option of another method is left aside,
            one no method has is an error. With a method object, leave them out.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 method: str | Method = "rigl", *, total_steps: int, delta_t: int = 100,
                 alpha: float = 0.3, t_end: float = 0.75,
                 grad_scaler: torch.amp.GradScaler | None = None, **method_options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"sparsefx.DST: model is a {type(model).__name__}: expected the "
                            "torch.nn.Module sparsefx.transform returned (or its wrapper)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"sparsefx.DST: optimizer is a {type(optimizer).__name__}: "
                            "expected a torch.optim.Optimizer")
        if isinstance(method, Method):
            given = [key for key, value in method_options.items() if value is not None]
            if given:
                raise ValueError(f"sparsefx.DST: {', '.join(given)} given with a method "
                                 f"object {method!r}: pass them to the method instead")
        else:
            method = methods.method_named(method, method_options)
        self.method = method
        self.schedule = CosineSchedule(total_steps, delta_t, alpha, t_end)
        self.model = unwrap(model)
        self.layers = find_layers(self.model, method, self)
        self._optimizer, self._optimizer_hook = None, None
        self.optimizer = optimizer
        check_same_structure_on_every_rank(self.layers)
        self.world = distributed.world_size()  # read once: the group outlives the manager
        self.grad_scaler = grad_scaler
        self.inverse_grad_scale: torch.Tensor | None = None
        self._record_grad_scale()
        self._step = 0
        self._skipped_updates = 0
        method.attach(self._context())
        if method.needs_gradient:
            for layer in self.layers:
                self._attach_probe(layer)
        self._armed: bool | None = None  # what the layers' growth probes are set to
        self._arm()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state DST zeroes for grown units; assign a rebuilt one."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        check_optimizer(self.layers, optimizer)
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self._optimizer = optimizer
        self._optimizer_stepped = False
        self._optimizer_hook = optimizer.register_step_post_hook(self._note_optimizer_step)

    def _note_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_stepped = True

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

    def units_moved(self, units: int, step: int | None = None) -> int:
        """How many of ``units`` the update at ``step`` (default: the current one) moves:
        ``round(drop_fraction(step) * units)``, give or take the remainder carried from the
        updates before (``CosineSchedule.units_moved``)."""
        return self.schedule.units_moved(self._step if step is None else step, units)

    def is_update_step(self, step: int) -> bool:
        return self.method.moves and self.schedule.is_update_step(step)

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
        if self.is_update_step(self._step + 1):
            self._check_before_update(self._step + 1)
        self._step += 1
        # most steps: no update on this step or the next and nothing the method does every
        # step, so only its cheap part (SRigL holds its ablated rows at zero)
        if (not self.method.works_every_step and (self._step + 1) % self.delta_t > 1
                and self._step != self.total_steps):
            with self._whole_parameters(self.method.writes_between_updates):
                self.method.between_updates(self._context())
            changed = False
        else:
            changed = self._step_with_work()
        self._record_grad_scale()
        self._optimizer_stepped = False
        return changed

    def _check_before_update(self, step: int) -> None:
        """Before an update touches anything: raise a ``RuntimeError`` saying what to do if
        the model's sparse layers are not those DST was made with, if no backward reached
        them, or if the optimizer did not step (while the gradients are finite: a GradScaler
        skips the step of an overflow, and so does the update)."""
        where = f"sparsefx.DST.step() at step {step} (a structure update)"
        current = [module for module in self.model.modules()
                   if isinstance(module, SPARSE_LAYERS)]
        for layer in self.layers:
            try:
                found = self.model.get_submodule(layer.name)
            except AttributeError:
                found = None
            what = ("is no longer in the model" if found is not layer.module else
                    "has new trained weights (a new Parameter)" if layer.module.param
                    is not layer.trained else
                    f"has a {layer.module.structure_name} of shape "
                    f"{tuple(layer.module.structure.shape)}, not {layer.structure_shape}"
                    if tuple(layer.module.structure.shape) != layer.structure_shape
                    and not layer.module.resizable else None)
            if what:
                raise RuntimeError(f"{where}: layer {layer.name} {what}: the model was changed "
                                   "after DST(...) was made. Write weights and structure in "
                                   "place, or make a new DST for the changed model")
        if len(current) != len(self.layers):
            added = [name for name, module in self.model.named_modules()
                     if isinstance(module, SPARSE_LAYERS)
                     and all(module is not layer.module for layer in self.layers)]
            raise RuntimeError(f"{where}: the model has sparse layers DST was not made with "
                               f"({added}): make a new DST for the changed model")
        if self.method.needs_gradient:
            if all(layer.probe.grad is None for layer in self.layers):
                raise RuntimeError(f"{where}: no backward reached a sparse layer since the "
                                   "last dst.step(): call dst.step() once per training step, "
                                   "after loss.backward() and optimizer.step()")
            self._check_single_calls(where)
        if not self._optimizer_stepped and not layers_with_non_finite_gradients(self.layers):
            raise RuntimeError(f"{where}: the optimizer DST was given has not stepped since the "
                               "last dst.step(). Call dst.step() after optimizer.step(); if "
                               "the optimizer was rebuilt, hand DST the new one "
                               "(dst.optimizer = optimizer)")

    def _check_single_calls(self, where: str) -> None:
        """Raise unless every layer's last backward came from one call of the layer (the
        growth tap counts them in the probe's trailer)."""
        tapped = [layer for layer in self.layers if layer.probe.grad is not None]
        calls = torch.stack([growth.trailer(layer.probe.grad)[0] for layer in tapped]).tolist()
        shared = {layer.name: int(count) for layer, count in zip(tapped, calls, strict=True)
                  if count > 1}
        if shared:
            raise shared_layers_error(where, shared, self.method.name)

    def _record_grad_scale(self) -> None:
        """``1 / scale`` of the GradScaler (0-dim, on its device; no host sync): the scale
        the next backward multiplies the loss by, once ``scaler.update()`` has run."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return
        scale = scaler._scale  # None until its first scale(loss): then its init_scale
        if scale is None:
            scale = torch.tensor(scaler.get_scale(), device=self.layers[0].param.device)
        scale = scale.double()
        self.inverse_grad_scale = scale.reciprocal().float()  # a power of two: exact

    @torch.no_grad()
    def _step_with_work(self) -> bool:
        changed = False
        updating = self.is_update_step(self._step)
        finishing = self._step == self.total_steps
        with self._whole_parameters(updating or finishing
                                    or self.method.writes_between_updates):
            self.method.every_step(self._context())
            if updating:
                changed = self._update(self.drop_fraction(self._step))
            if finishing:
                self.method.finish(self._context())
        if self._armed:
            for layer in self.layers:
                layer.probe.grad = None
        self._arm()
        return changed

    def _whole_parameters(self, needed: bool):
        """Under FSDP2, the layers' sharded weights, gradients and optimizer state gathered
        whole while an update (or the method) writes them: only on the steps that need it."""
        if needed and any(fsdp.is_sharded(layer.param) for layer in self.layers):
            return fsdp.whole_parameters([layer.module for layer in self.layers],
                                                self.optimizer)
        return contextlib.nullcontext()

    def _arm(self) -> None:
        """Route the next step's backward through the growth tap iff it ends in an update
        (the layers are touched only when that changes: twice per update)."""
        armed = self.method.needs_gradient and self.is_update_step(self._step + 1)
        if armed != self._armed:
            for layer in self.layers:
                if armed and layer.probe_for != tuple(layer.module.structure.shape):
                    self._attach_probe(layer)  # resized since (a checkpoint loaded)
                layer.module.arm(layer.probe if armed else None)
            self._armed = armed

    def _update(self, fraction: float) -> bool:
        problems = layers_with_non_finite_gradients(self.layers)
        if problems:
            self._skipped_updates += 1
            warnings.warn(f"sparsefx.DST: step {self._step}: non-finite gradients in "
                          f"{', '.join(problems)}; structure update skipped", stacklevel=3)
            return False
        changed = False
        context = self._context()
        for layer in self.layers:
            if self.method.needs_gradient and layer.probe.grad is None:
                warnings.warn(f"sparsefx.DST: step {self._step}: layer {layer.name} got no "
                              "gradient this step (not used in the forward?); its structure "
                              "is left as it is", stacklevel=3)
                continue
            try:
                changed |= self.method.update_layer(context, layer, fraction)
            finally:
                layer.forget_lists()  # parsed once per layer and update
        logger.info("sparsefx.DST: step %d: structure update, fraction %.4f", self._step,
                    fraction)
        return changed

    def _attach_probe(self, layer: Layer) -> None:
        """Size the growth lists so that every unit an update could grow is in them (the
        most an update moves is ``ceil(alpha * units)``), and make the probe they come in."""
        module = layer.module
        out_features, in_features = module.out_features, module.in_features
        if max(out_features, in_features) >= 2**24:  # ids travel as float32
            raise ValueError(f"sparsefx.DST: layer {layer.name} is ({out_features}, "
                             f"{in_features}): expected both dimensions < 2**24")
        calls = calls_per_forward(self.model, layer.module)
        if calls > 1:
            raise shared_layers_error("sparsefx.DST", {layer.name: calls}, self.method.name)
        plan = module.growth_plan(self.alpha, **self.method.growth_needs(layer))
        size = growth.probe_size(out_features, in_features, module.growth_granularity, plan,
                                 growth.active_count(module.structure,
                                                     module.growth_granularity))
        # only the shape matters (scores arrive as its gradient): one element of storage
        storage = torch.zeros(1, dtype=torch.float32, device=layer.param.device)
        layer.probe = storage.expand(size).requires_grad_(True)
        layer.probe.register_hook(latest_scores_only(layer.probe))
        module.set_growth_plan(plan)
        layer.probe_for = tuple(module.structure.shape)

    # ------------------------------------------------------------ what methods are given

    def _context(self) -> methods.StepContext:
        return methods.StepContext(
            step=self._step, end_step=self.end_step, total_steps=self.total_steps,
            world=self.world, inverse_grad_scale=self.inverse_grad_scale,
            optimizer=self.optimizer, model=self.model, layers=tuple(self.layers))

    def budget(self, layer: Layer) -> int:
        """Active units of ``layer``: diagonals, entries or elements (of its live rows)."""
        return layer.module.active_units(self.method.live_rows(layer))

    def resized(self, layer: Layer) -> None:
        """``layer``'s number of slots changed (``Layer.write_slots``): its growth probe is
        sized anew."""
        if self.method.needs_gradient:
            self._attach_probe(layer)
            if self._armed:
                layer.module.arm(layer.probe)

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """What ``load_state_dict`` needs to continue the same run; the structure itself is in
        the model's state_dict, the values' optimizer state in the optimizer's."""
        return {"format": CHECKPOINT_FORMAT, "step": self._step, "config": self._config(),
                "skipped_updates": self._skipped_updates, **self.method.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self._step = state["step"]
        self._skipped_updates = state.get("skipped_updates", 0)
        self.method.load_state_dict(self._context(), state)
        self._arm()

    def check_state(self, state: dict) -> None:
        """Raise a ``ValueError`` saying what differs unless ``state`` (a ``state_dict()``)
        continues a run of this manager's settings and layers. Nothing is loaded."""
        if not isinstance(state, dict) or not {"step", "config"} <= set(state):
            raise ValueError(f"sparsefx.DST.load_state_dict: got {type(state).__name__}"
                             f"{sorted(state) if isinstance(state, dict) else ''}: expected "
                             "what DST.state_dict() returns")
        saved_format = state.get("format", 1)  # format 1 (sparsefx 0.1) had no version key
        if saved_format not in (1, CHECKPOINT_FORMAT):
            raise ValueError(f"sparsefx.DST.load_state_dict: checkpoint format "
                             f"{saved_format!r}: this sparsefx reads formats 1 to "
                             f"{CHECKPOINT_FORMAT} (a checkpoint from a newer sparsefx?)")
        config = self._config()
        # format 1 recorded every method's options; compare those this method has (an option
        # added since is what the method did before it existed)
        legacy = getattr(self.method, "legacy_options", {})
        saved = {key: state["config"].get(key, legacy.get(key)) for key in config}
        if saved != config:
            differ = {key: (saved[key], value) for key, value in config.items()
                      if saved[key] != value}
            raise ValueError(f"sparsefx.DST.load_state_dict: the checkpoint was made with other "
                             f"settings (saved, current): {differ}")
        names = {layer.name for layer in self.layers}
        mentioned = self.method.state_layers(state)
        if not mentioned <= names:
            raise ValueError(f"sparsefx.DST.load_state_dict: layers {sorted(mentioned - names)} "
                             f"are not in this model's sparse layers {sorted(names)}")
        if not isinstance(state["step"], int) or not 0 <= state["step"] <= self.total_steps:
            raise ValueError(f"sparsefx.DST.load_state_dict: step={state['step']!r}: expected "
                             f"an int in [0, {self.total_steps}]")

    def _config(self) -> dict:
        return {"method": self.method.name, "total_steps": self.total_steps,
                "delta_t": self.delta_t, "alpha": self.alpha, "t_end": self.t_end,
                **self.method.options(), "layers": [layer.name for layer in self.layers]}

    def __repr__(self) -> str:
        upcoming = self.next_update
        lines = [f"DST(method={self.method.name}, step={self._step}/{self.total_steps}, "
                 f"next update={'none' if upcoming is None else upcoming}"
                 + ("" if upcoming is None else f" (fraction {self.drop_fraction(upcoming):.3f})")
                 + f", delta_t={self.delta_t}, alpha={self.alpha}, updates until step "
                 f"{self.end_step})"]
        for layer in self.layers:
            rows = self.method.live_rows(layer)
            lines.append(f"  {layer.name}: {layer.module.describe(rows)}"
                         f"{self.method.describe(layer)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ helpers
