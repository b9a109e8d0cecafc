"""DST methods: what an update moves, as small strategy objects, one file each.

``drop_grow``  ``Static``, ``SET``, ``RigL``: drop the smallest units, grow at random (SET)
               or by dense-gradient magnitude (RigL); every pattern.
``srigl``      ``SRigL``: RigL per row plus neuron ablation; fan-in layers.
``dynadiag``   ``DynaDiag``: learned importances gate the diagonals; diag layers.

``sparsefx.DST`` (the manager) keeps the schedule, the steps, the growth taps, writing a new
structure and zeroing its optimizer state, and the checkpoint; it asks its method what to do
(``base.Method``), handing it a ``base.StepContext`` and a ``base.Layer`` handle per layer.
``DST(method="srigl", gamma_sal=...)`` builds the method from its name.
"""
from __future__ import annotations

from .base import Layer, Method, StepContext
from .drop_grow import SET, RigL, Static
from .dynadiag import DynaDiag
from .srigl import SRigL

__all__ = ["Method", "StepContext", "Layer", "Static", "SET", "RigL", "SRigL", "DynaDiag", "METHODS", "method_named"]

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Static, SET, RigL, SRigL,
                                                                   DynaDiag)}


def method_named(name: str, options: dict) -> Method:
    """The method called ``name``, built from those of ``options`` (DST's keyword arguments)
    it takes; the others are left aside (each method checks its own)."""
    if name not in METHODS:
        raise ValueError(f"sparsefx.DST: method={name!r}: expected one of {tuple(METHODS)}")
    known = {option for cls in METHODS.values() for option in cls.option_names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"sparsefx.DST: got {', '.join(unknown)}: no method takes "
                        f"{'it' if len(unknown) == 1 else 'them'} (the methods' options: "
                        f"{sorted(known)})")
    cls = METHODS[name]
    return cls(**{key: value for key, value in options.items()
                  if key in cls.option_names and value is not None})
