"""What ``sparsefx.transform`` (and ``sparsefx.load``) record on the model they return: one
``ModelInfo``, read by the report, ``save``, SRigL's default output layer and ``densify``,
instead of loose attributes each reader looks up by name."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["ModelInfo", "info_of", "attach", "detach"]

_ATTRIBUTE = "_sparsefx_info"


@dataclass
class ModelInfo:
    """``order``: every candidate layer's name, in the model's order (sparse or not);
    ``dense``: the candidates that stayed dense, as ``(out_features, in_features, reason)``."""

    order: list[str] = field(default_factory=list)
    dense: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)


def attach(model: nn.Module, info: ModelInfo) -> None:
    model.__dict__[_ATTRIBUTE] = info


def detach(model: nn.Module) -> None:
    model.__dict__.pop(_ATTRIBUTE, None)
    for old in ("_sparsefx_order", "_sparsefx_dense"):  # written by sparsefx 0.1
        model.__dict__.pop(old, None)


def info_of(model: nn.Module) -> ModelInfo | None:
    """The model's ``ModelInfo``, under torch.compile's wrapper too; ``None`` for a model
    sparsefx did not return. A model pickled by sparsefx 0.1 (two attributes) reads the same."""
    model = getattr(model, "_orig_mod", model)
    info = model.__dict__.get(_ATTRIBUTE)
    if info is None and "_sparsefx_order" in model.__dict__:
        info = ModelInfo(list(model._sparsefx_order), dict(model.__dict__.get("_sparsefx_dense",
                                                                             {})))
    return info
