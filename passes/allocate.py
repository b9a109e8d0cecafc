"""Decide, per site, which pattern and sparsity it gets, or why it stays dense."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sparsefx.kernels import patterns

from .sites import Site

__all__ = ["Decision", "allocate", "DISTRIBUTIONS"]


@dataclass
class Decision:
    """What the rewrite does with one site."""

    site: Site
    pattern: str | None          # None: stays dense
    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    reason: str | None = None    # why it stays dense
    options: dict = field(default_factory=dict)  # the pattern's own per-layer options


DISTRIBUTIONS = ("uniform", "erk", "owl")


def _matches(key: str, name: str) -> bool:
    return key == name or re.fullmatch(key, name) is not None


def _check_sparsity(sparsity, where: str) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"{where}: sparsity={sparsity!r}: expected a fraction in (0, 1)")


def _check_pattern(pattern, known: Mapping, where: str) -> None:
    if pattern not in known:
        raise ValueError(f"{where}: pattern={pattern!r}: expected one of {tuple(known)}")


def allocate(sites: list[Site], site_types: dict[str, type], known: Mapping, *, pattern: str,
             sparsity: float,
             distribution: str = "uniform", nm: tuple[int, int] = (2, 4),
             include: str | None = None, exclude: str | None = None,
             include_types: tuple[type, ...] = (), exclude_types: tuple[type, ...] = (),
             overrides: dict | None = None, keep_first_dense: bool = False,
             keep_last_dense: bool = False) -> list[Decision]:
    """One ``Decision`` per site, in the order given. ``known``: the patterns by name
    (``sparsefx.registry.PATTERNS``; each says whether it ``takes_nm``).

    Filters apply first (``include`` / ``exclude``: regexes on the FQN, full match;
    ``include_types`` / ``exclude_types``: the layer's module type, or for a functional site
    the type of the module owning the weight), then keep-first/last, then ``overrides``
    (FQN or regex -> ``"dense"``, a sparsity, or ``dict(pattern=..., sparsity=..., nm=...)``
    plus the pattern's own ``options``, e.g. blockdiag's ``groups``;
    an override that names no site is an error), then ``distribution`` spreads ``sparsity``
    over the remaining sites: ``uniform`` gives each the same, ``erk`` follows
    ``patterns.erk_densities``; ``owl`` gives each the same here, and transform spreads it
    by the layers' outliers once calibration has measured them
    (``patterns.owl_densities``).
    """
    _check_pattern(pattern, known, "transform")
    if not known[pattern].takes_nm:
        _check_sparsity(sparsity, "transform")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}: expected one of {DISTRIBUTIONS}")
    if distribution != "uniform" and known[pattern].takes_nm:
        raise ValueError(f"distribution={distribution!r} with pattern={pattern!r}: N:M fixes "
                         "each layer's density at n/m; use distribution='uniform'")
    decisions = [Decision(site, None, reason=site.dense_reason or site.default_dense)
                 for site in sites]
    eligible = [d for d in decisions if d.reason is None]
    for decision in eligible:
        name, kind = decision.site.name, site_types.get(decision.site.name)
        if include is not None and not _matches(include, name):
            decision.reason = f"not matched by include={include!r}"
        elif exclude is not None and _matches(exclude, name):
            decision.reason = f"matched by exclude={exclude!r}"
        elif include_types and not (kind and issubclass(kind, tuple(include_types))):
            decision.reason = "type not in include_types"
        elif exclude_types and kind and issubclass(kind, tuple(exclude_types)):
            decision.reason = "type in exclude_types"
    eligible = [d for d in decisions if d.reason is None]
    if eligible and keep_first_dense:
        eligible[0].reason = "keep_first_dense"
    if eligible and keep_last_dense:
        eligible[-1].reason = "keep_last_dense"

    overridden = set()
    for key, value in (overrides or {}).items():
        hits = [d for d in decisions if _matches(key, d.site.name)]
        if not hits:
            raise ValueError(f"overrides[{key!r}] names no layer: the candidate layers are "
                             f"{[d.site.name for d in decisions]}")
        for decision in hits:
            if decision.site.dense_reason is not None and value != "dense":
                raise ValueError(f"overrides[{key!r}]: {decision.site.name} must stay dense "
                                 f"({decision.site.dense_reason})")
            if _apply_override(decision, key, value, pattern, nm, known):
                overridden.add(id(decision))

    rest = [d for d in decisions if d.reason is None and id(d) not in overridden]
    if distribution == "erk" and rest:
        shapes = [(d.site.out_features, d.site.in_features) for d in rest]
        for decision, density in zip(rest, patterns.erk_densities(shapes, sparsity),
                                     strict=True):
            if density >= 1.0:
                decision.pattern, decision.reason = None, "ERK gives this layer density 1"
            else:
                decision.pattern = decision.pattern or pattern
                decision.sparsity = 1.0 - density
    else:
        for decision in rest:
            decision.pattern, decision.sparsity = decision.pattern or pattern, sparsity
            if not known[decision.pattern].takes_nm:  # e.g. a diag override under nm
                _check_sparsity(sparsity, "transform")
    for decision in decisions:
        if decision.pattern is not None and known[decision.pattern].takes_nm:
            decision.nm = decision.nm or tuple(nm)
            n, m = decision.nm
            try:
                patterns.nm_num_kept(decision.site.in_features, n, m)
            except ValueError as error:
                raise ValueError(f"layer {decision.site.name}: {error}") from None
            decision.sparsity = 1.0 - n / m
    return decisions


def _apply_override(decision: Decision, key: str, value, pattern: str, nm,
                    known: Mapping) -> bool:
    """Apply one override to ``decision``; True when it fixes the layer's sparsity (a dict
    without ``sparsity`` sets the pattern or its options and leaves the layer its share of
    ``distribution``)."""
    where = f"overrides[{key!r}]"
    if value == "dense":
        decision.pattern, decision.reason = None, f"overridden by {where}"
        return True
    if isinstance(value, (int, float)):
        value = {"sparsity": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}={value!r}: expected 'dense', a sparsity or a dict")
    decision.pattern = value.get("pattern", pattern)
    _check_pattern(decision.pattern, known, where)
    layer_options = tuple(known[decision.pattern].options)  # e.g. blockdiag's groups
    allowed = ("pattern", "sparsity", "nm") + layer_options
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValueError(f"{where} has keys {sorted(unknown)}: expected {', '.join(allowed)} "
                         f"(for pattern {decision.pattern!r})")
    decision.options = {key: value[key] for key in layer_options if key in value}
    decision.reason = None
    if known[decision.pattern].takes_nm:
        decision.nm = tuple(value.get("nm", nm))
        return True
    if "sparsity" not in value:
        return False
    decision.sparsity = value["sparsity"]
    _check_sparsity(decision.sparsity, where)
    return True
