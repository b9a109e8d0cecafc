"""The patterns sparsefx knows, by the name ``sparsefx.transform(pattern=...)`` takes.

One table, read by transform (which patterns exist, and which take ``nm=(n, m)`` instead of
a sparsity), ``build_layer``, ``sparsefx.DST`` (which patterns each method works on), the
report (through the layers) and the examples. A pattern is a layer class
(a ``sparsefx.layers.SparseLinear``, which owns what DST needs of it) with its ops, and one
entry here: sparsefx's own in ``sparsefx.layers`` and ``sparsefx.kernels``, one defined
elsewhere by ``register_pattern`` (``tests/test_custom_pattern.py`` defines one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsefx.layers import (BlockDiagLinear, DiagLinear, FanInLinear, MaskedLinear,
                             SparseLinear)

__all__ = ["Pattern", "PATTERNS", "register_pattern", "pattern_named", "build_layer",
           "layer_classes", "patterns_table"]


@dataclass(frozen=True)
class Pattern:
    """One pattern: its name, the layer that holds it, and what its users need to know."""

    name: str
    layer: type                 # the sparse layer class (sparsefx.layers)
    takes_nm: bool              # the density follows from nm=(n, m): no sparsity asked
    default_method: str         # the DST method it is meant for (the examples' default)
    summary: str                # one line for help texts and docs
    options: tuple[str, ...] = ()  # per-layer options of its from_dense (transform overrides)

    def structure(self, sparsity: float | None, nm: tuple[int, int] | None) -> dict:
        """``from_dense``'s structure keywords: ``nm=`` or ``sparsity=``."""
        return {"nm": nm} if self.takes_nm else {"sparsity": sparsity}

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, *,
              sparsity: float | None, nm: tuple[int, int] | None, init: str,
              generator: torch.Generator | None, **options):
        """The layer of this pattern for the dense ``weight [out, in]`` and ``bias``;
        ``options``: those of ``self.options`` given."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"pattern {self.name!r} takes no option {sorted(unknown)}: "
                             f"expected {self.options or 'none'}")
        structure = self.structure(sparsity, nm)
        if not weight.is_meta:
            return self.layer.from_dense(weight, bias, init=init, generator=generator,
                                         **structure, **options)
        # a model built on the meta device: the structure is drawn on the CPU from the
        # generator, then everything goes to meta; the layer keeps the structure drawn and
        # takes it back when it leaves meta (to_empty)
        if init != "random":
            raise ValueError(f"the weight is on the meta device and init={init!r} reads its "
                             "values: expected init='random' (the structure is drawn from "
                             "seed), or transform after loading the weights")
        placeholder = torch.empty(weight.shape, dtype=weight.dtype)
        layer = self.layer.from_dense(placeholder, None, init=init, generator=generator,
                                      **structure, **options)
        drawn = {name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)}
        layer = layer.to("meta")
        if bias is not None:
            layer.bias = torch.nn.Parameter(torch.empty_like(bias, device="meta"),
                                            requires_grad=bias.requires_grad)
        layer._drawn_on_cpu = drawn
        return layer


PATTERNS: dict[str, Pattern] = {pattern.name: pattern for pattern in (
    Pattern("diag", DiagLinear, False, "dynadiag", "K whole wrap-around diagonals (DynaDiag)"),
    Pattern("blockdiag", BlockDiagLinear, False, "rigl",
            "whole cosets of diagonals: c dense blocks per block-row after a fixed permutation",
            options=("groups",)),
    Pattern("fanin", FanInLinear, False, "srigl", "k inputs per output row (SRigL)"),
    Pattern("nm", FanInLinear, True, "rigl", "n of every m inputs per output row"),
    Pattern("unstructured", MaskedLinear, False, "rigl",
            "a dense weight times a 0/1 mask: the accuracy baseline, not accelerated"),
)}


def register_pattern(pattern: Pattern) -> Pattern:
    """Add ``pattern`` to the table: ``transform(pattern=pattern.name)``, ``build_layer``,
    the report, ``densify``, ``sparsefx.save``/``load`` and DST's generic methods (``static``,
    ``set``, ``rigl``) then take it. Its layer must be a ``SparseLinear`` whose class name no
    other pattern's layer has (``sparsefx.save`` records layers by class name)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"sparsefx.register_pattern: {pattern!r}: expected a "
                        "sparsefx.registry.Pattern")
    if pattern.name in PATTERNS:
        raise ValueError(f"sparsefx.register_pattern: pattern={pattern.name!r} exists: "
                         f"expected a new name, not one of {tuple(PATTERNS)}")
    if not (isinstance(pattern.layer, type) and issubclass(pattern.layer, SparseLinear)):
        raise TypeError(f"sparsefx.register_pattern: pattern {pattern.name!r}: layer "
                        f"{pattern.layer!r}: expected a subclass of "
                        "sparsefx.layers.SparseLinear")
    other = layer_classes().get(pattern.layer.__name__)
    if other is not None and other is not pattern.layer:
        raise ValueError(f"sparsefx.register_pattern: pattern {pattern.name!r}: a layer class "
                         f"named {pattern.layer.__name__} is registered already ({other!r}): "
                         "expected a class name of its own")
    PATTERNS[pattern.name] = pattern
    return pattern


def layer_classes() -> dict[str, type]:
    """Every registered pattern's layer class, by class name (what ``sparsefx.save``
    records)."""
    return {pattern.layer.__name__: pattern.layer for pattern in PATTERNS.values()}


def pattern_named(name: str, where: str = "sparsefx") -> Pattern:
    """The pattern called ``name``; a ``ValueError`` naming ``where`` if there is none."""
    if name not in PATTERNS:
        raise ValueError(f"{where}: pattern={name!r}: expected one of {tuple(PATTERNS)}")
    return PATTERNS[name]


def build_layer(pattern: str, weight: torch.Tensor, bias: torch.Tensor | None, *,
                sparsity: float | None, nm: tuple[int, int] | None = None,
                init: str = "magnitude", generator: torch.Generator | None = None, **options):
    """The sparse layer of ``pattern`` for the dense ``weight [out, in]`` and ``bias``
    (``options``: the pattern's own, e.g. blockdiag's ``groups``)."""
    return pattern_named(pattern, "build_layer").build(weight, bias, sparsity=sparsity, nm=nm,
                                                       init=init, generator=generator,
                                                       **options)


def patterns_table() -> str:
    """The registered patterns as a Markdown table (the README's: ``python -m
    sparsefx.readme_tables README.md`` rewrites it there)."""
    from sparsefx.methods import METHODS
    lines = ["| pattern | layer | structure | DST methods (default first) |",
             "|---|---|---|---|"]
    for pattern in PATTERNS.values():
        methods = [pattern.default_method] + sorted(
            name for name, cls in METHODS.items()
            if name != pattern.default_method and cls().works_on(pattern))
        asks = "`nm=(n, m)`" if pattern.takes_nm else "`sparsity`"
        options = "".join(f", `{option}=`" for option in pattern.options)
        lines.append(f"| `{pattern.name}` | `{pattern.layer.__name__}` | {pattern.summary} "
                     f"({asks}{options}) | {', '.join(methods)} |")
    return "\n".join(lines)

