"""A model's sparse layers checked against a state dict before any of it is loaded: pattern,
shapes, sparsity and a valid structure, so that a checkpoint that does not fit raises a
``ValueError`` naming the layer and changes nothing."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["check_state_dict", "check_before_loading"]


def check_state_dict(model: nn.Module, state_dict: dict, prefix: str = "",
                     strict: bool = True) -> None:
    """Raise a ``ValueError`` naming the layer and what differs unless every sparse layer of
    ``model`` fits its entries in ``state_dict`` (keys under ``prefix``); loads nothing.
    ``model.load_state_dict`` runs this first on a model from ``sparsefx.transform``."""
    from sparsefx.layers import SPARSE_LAYERS
    for name, module in model.named_modules():
        if isinstance(module, SPARSE_LAYERS) and not module.param.is_meta:
            module.check_state(state_dict, f"{prefix}{name}." if name else prefix, strict)


def check_before_loading(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of a transformed model: every sparse layer is checked
    before any module is loaded, so a checkpoint that does not fit changes nothing."""
    check_state_dict(module, state_dict, prefix, strict)
