"""``sparsefx.transform``: a dense model in, its sparse counterpart out; and back again."""
from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.nn as nn

from sparsefx import calibration as calibration_
from sparsefx.layers import SPARSE_LAYERS
from sparsefx.layers.loading import check_before_loading
from sparsefx.model_info import ModelInfo, attach, detach
from sparsefx.attention import MultiheadAttention, swap_attention
from sparsefx.experts import Experts, swap_experts
from sparsefx.registry import PATTERNS, build_layer
from sparsefx.passes import analyse
from sparsefx.permutation import permuted_layer
from sparsefx.passes.allocate import allocate
from sparsefx.passes.rewrite import replace_module, rewrite_functional_sites
from sparsefx.passes.sites import find_functional_sites, find_module_sites, mark_routers, \
    parameter_use_counts
from sparsefx.passes.trace import trace_parts

__all__ = ["transform", "densify", "layer_graph", "prepare", "rewrite"]

logger = logging.getLogger(__name__)


def transform(model: nn.Module, pattern: str = "diag", sparsity: float = 0.9, *,
              distribution: str = "uniform", nm: tuple[int, int] = (2, 4),
              include: str | None = None, exclude: str | None = None,
              include_types: tuple[type, ...] = (), exclude_types: tuple[type, ...] = (),
              overrides: dict | None = None, keep_first_dense: bool = False,
              keep_last_dense: bool = False, init: str = "magnitude", seed: int = 0,
              calibration=None, permute: bool = False, progress: bool | None = None,
              leaf_modules: tuple = (), concrete_args: dict | None = None) -> nn.Module:
    """A sparse copy of ``model``; ``model`` itself is never modified, also on error.

    Finds every ``nn.Linear`` (and subclass) and, in the parts torch.fx can trace, every
    ``F.linear`` / ``addmm`` / ``matmul`` on a parameter; decides per layer (see
    ``passes.allocate.allocate`` for ``distribution``, ``include``/``exclude``,
    ``include_types``/``exclude_types``, ``overrides``, ``keep_first_dense``/
    ``keep_last_dense``); and replaces each chosen one by the layer of its pattern (one of
    ``sparsefx.registry.PATTERNS``: ``pattern="nm"`` takes ``nm=(n, m)`` instead of a
    sparsity) built from its dense weights: the largest-magnitude structure
    (``init="magnitude"``), a random one seeded by ``seed`` (``init="random"``), or one
    calibrated on ``calibration``, model inputs (``init="wanda"`` or ``"sparsegpt"``: see
    ``sparsefx.calibration``; ``progress``: a progress bar, default when stderr is a
    terminal; ``distribution="owl"``: the layers' sparsities spread by their share of
    outliers, ``sparsefx.calibration.spread_by_outliers``). ``permute=True``: diagonal layers (``permutable`` ones) also permute their
    inputs to keep the most of that importance (``sparsefx.permutation``; not with
    ``init="random"``). Tied and shared weights stay dense. ``sparsefx.report(result)`` says what happened to every
    candidate. ``leaf_modules`` (types or FQNs) and ``concrete_args`` go to the tracer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsefx.transform: model is a {type(model).__name__}: expected a "
                        "torch.nn.Module")
    inits = ("magnitude", "random") + calibration_.INITS
    if init not in inits:
        raise ValueError(f"sparsefx.transform: init={init!r}: expected one of {inits}")
    calibrated = init in calibration_.INITS
    if distribution == "owl" and not calibrated:
        raise ValueError(f"sparsefx.transform: distribution='owl' with init={init!r}: OWL "
                         "measures outliers on calibration inputs; expected init='wanda' or "
                         "'sparsegpt' with calibration=")
    if permute and init == "random":
        raise ValueError("sparsefx.transform: permute=True with init='random': a permutation "
                         "fits a structure to the weights; expected init='magnitude', "
                         "'wanda' or 'sparsegpt'")
    if calibrated:
        calibration = calibration_.Calibration(calibration)
    elif calibration is not None:
        raise ValueError(f"sparsefx.transform: calibration= given with init={init!r}: expected "
                         f"init in {calibration_.INITS} (or no calibration)")
    new, parts, functional, sites = prepare(model, leaf_modules, concrete_args)
    if not sites:
        warnings.warn("sparsefx.transform: the model has no nn.Linear and no traceable "
                      "F.linear/addmm/matmul on a parameter; returning it unchanged",
                      stacklevel=2)
        return model
    site_types = {site.name: type(new.get_submodule(site.name if site.kind == "module"
                                                    else site.name.rpartition(".")[0]))
                  for site in sites}
    decisions = allocate(sites, site_types, PATTERNS, pattern=pattern, sparsity=sparsity,
                         distribution=distribution, nm=nm, include=include, exclude=exclude,
                         include_types=include_types, exclude_types=exclude_types,
                         overrides=overrides, keep_first_dense=keep_first_dense,
                         keep_last_dense=keep_last_dense)
    chosen = {d.site.name: d for d in decisions if d.pattern is not None}
    if not chosen:
        if include is not None:
            raise ValueError(f"include={include!r} selects no layer that can be sparsified: "
                             f"{ {d.site.name: d.reason for d in decisions} }")
        warnings.warn("sparsefx.transform: every candidate layer stays dense "
                      f"({ {d.site.name: d.reason for d in decisions} }); returning the "
                      "model unchanged", stacklevel=2)
        return model

    generator = torch.Generator().manual_seed(seed)

    def make_layer(site, weight, bias):
        decision = chosen[site.name]
        if calibrated:
            return calibrating(site, weight, bias, decision)
        if init == "magnitude" and not weight.is_meta:
            bad = int((~torch.isfinite(weight)).sum())
            if bad:
                raise ValueError(f"layer {site.name}: weight holds {bad} NaN or infinite "
                                 "entries: init='magnitude' cannot rank them (fix the weights, "
                                 "or draw the structure with init='random', which keeps them)")
            if permute and PATTERNS[decision.pattern].layer.permutable:
                return scored(site, decision, weight, bias, weight.detach().double().square())
        try:
            layer = build_layer(decision.pattern, weight, bias, sparsity=decision.sparsity,
                                nm=decision.nm, init=init, generator=generator,
                                **decision.options)
        except ValueError as error:
            raise ValueError(f"layer {site.name}: {error}") from None
        layer._sparsefx_name = site.name
        return layer

    def calibrating(site, weight, bias, decision):
        if weight.is_meta or not bool(torch.isfinite(weight).all()):
            what = "on the meta device" if weight.is_meta else "NaN or infinite"
            raise ValueError(f"layer {site.name}: init={init!r} needs the weight's values: "
                             f"expected finite weights, not {what} ones (transform after "
                             "loading them)")

        return calibration_.Calibrating(site.name, weight, bias,
                                        lambda *args: scored(site, decision, *args))

    def scored(site, decision, weight, bias, scores):
        """The layer of largest kept ``scores``, its inputs permuted if ``permute``."""
        pattern = PATTERNS[decision.pattern]
        structure = {**pattern.structure(decision.sparsity, decision.nm), **decision.options}
        try:
            if permute and pattern.layer.permutable:
                layer = permuted_layer(pattern.layer, weight, bias, scores, **structure)
            else:
                layer = pattern.layer.from_scores(weight, bias, scores, **structure)
        except ValueError as error:
            raise ValueError(f"layer {site.name}: {error}") from None
        layer._sparsefx_name = site.name
        return layer

    new = rewrite(new, parts, functional, sites, chosen, make_layer,
                   {d.site.name: d.reason for d in decisions if d.pattern is None})
    if calibrated:
        if distribution == "owl":  # the global sparsity's layers, spread by their outliers
            calibration_.spread_by_outliers(new, calibration, [
                d for d in chosen.values() if not PATTERNS[d.pattern].takes_nm
                and d.sparsity == sparsity], sparsity)
        new = calibration_.calibrate(new, init, calibration, progress)
    logger.info("sparsefx.transform: %d of %d candidate layers made sparse", len(chosen),
                len(decisions))
    return new


def prepare(model: nn.Module, leaf_modules=(), concrete_args=None):
    """Transform's first half, which ``sparsefx.load`` shares: a copy of ``model`` with its
    attention swapped (``sparsefx.attention``), its traced parts, their functional sites and
    every site: ``(new, parts, functional, sites)``."""
    new = copy.deepcopy(model)
    # projections and experts held as raw parameters become modules, so that they can be
    # made sparse
    swap_attention(new)
    swap_experts(new)
    parts = trace_parts(new, tuple(leaf_modules) + SPARSE_LAYERS + (MultiheadAttention,
                                                                    Experts), concrete_args)
    uses = parameter_use_counts(new)
    sites = find_module_sites(new)
    functional = {part: find_functional_sites(part, gm, uses) for part, gm in parts.items()}
    if any(site.kind == "module" and not site.name for site in sites):
        functional = {}  # the model is one linear layer: its trace is that layer's own call
    sites += [site for found in functional.values() for site in found]
    mark_routers(new, sites)
    return new, parts, functional, sites


def rewrite(new: nn.Module, parts: dict, functional: dict, sites: list, chosen,
             make_layer, dense_reasons: dict[str, str]) -> nn.Module:
    """Transform's second half, which ``sparsefx.load`` shares: ``new`` with the sites named
    in ``chosen`` replaced by ``make_layer(site, weight, bias)``, the others recorded as
    dense with ``dense_reasons`` (``ModelInfo``)."""
    for part, found in functional.items():
        selected = [site for site in found if site.name in chosen]
        if not selected:
            continue
        gm = rewrite_functional_sites(parts[part], selected, make_layer)
        if part:
            replace_module(new, part, gm)
        else:
            new = gm
    for site in sites:
        if site.kind == "module" and site.name in chosen:
            linear = new.get_submodule(site.name)
            layer = make_layer(site, linear.weight, linear.bias)
            if site.name:
                replace_module(new, site.name, layer)
            else:
                new = layer

    # a checkpoint that does not fit is refused before any module is loaded
    new.register_load_state_dict_pre_hook(check_before_loading)
    attach(new, ModelInfo(order=[site.name for site in sites],
                          dense={site.name: (site.out_features, site.in_features,
                                             dense_reasons.get(site.name))
                                 for site in sites if site.name not in chosen}))
    return new


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every sparse layer replaced by the equivalent ``nn.Linear``
    (for export, or to compare against dense); ``model`` is not modified. A compiled model
    gives back the plain module it wraps, densified."""
    dense = copy.deepcopy(getattr(model, "_orig_mod", model))  # unwrap torch.compile
    for kinds, back in (((MultiheadAttention, Experts), "to_torch"),  # what they replaced
                        (SPARSE_LAYERS, "to_dense")):
        for name, module in list(dense.named_modules()):
            if isinstance(module, kinds):
                if name:
                    replace_module(dense, name, getattr(module, back)())
                else:  # the model is that one module
                    dense = getattr(module, back)()
    detach(dense)
    return dense


def layer_graph(model: nn.Module):
    """The ``networkx.DiGraph`` of which sparse layer feeds which in ``model`` (through
    elementwise ops only), each node carrying the ``input`` it reads; see
    ``sparsefx.passes.analyse``. ``analyse.shared_inputs(graph)`` lists the layers that read
    the same input."""
    return analyse.layer_graph(model, SPARSE_LAYERS)
