"""The ideal-sparse reference of a sparsefx model: what its sparse layers would cost if they
ran at dense-GEMM efficiency with no overhead.

Each Linear (or GPT-2 ``Conv1D``) that ``sparsefx.transform`` made sparse is replaced, in the
*dense* model, by ``IdealSparseLinear``: a dense ``nn.Linear`` holding ``ceil((1 - s) * out)``
of the rows (the sparse layer's stored weights, as one small dense matrix) whose output is
repeated to the full ``out`` width. It moves the sparse layer's bytes and does its FLOPs in
one dense GEMM, with the dense model's bias handling; everything else in the model (and every
layer sparsefx left dense) is the dense model, unchanged. ``t_ideal / t_sparse`` is then the
fraction of the reachable speed-up that sparsefx achieves.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

import sparsefx
from sparsefx.layers import SPARSE_LAYERS


class IdealSparseLinear(nn.Module):
    """``in -> rows`` dense, then the ``rows`` outputs repeated cyclically to ``out``."""

    def __init__(self, in_features: int, out_features: int, rows: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compact = nn.Linear(in_features, rows, bias=bias)
        # one gather writes the full-width output, as the sparse kernel writes it
        self.register_buffer("spread", torch.arange(out_features) % rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compact(x).index_select(-1, self.spread)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows={self.compact.out_features}")


def stored_rows(layer: nn.Module) -> int:
    """Dense rows holding as many weights as the sparse layer stores: ``ceil(stored / in)``
    (``= ceil((1 - s) * out)``; the epsilon keeps float noise from adding a row)."""
    return max(1, math.ceil(layer.stored / layer.in_features - 1e-9))


def sparsified_layers(sparse_model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """FQN of every layer sparsefx sparsified -> ``(in, out, rows)``. A functional site (GPT-2's
    ``Conv1D``) is named by its weight, ``...c_attn.weight``, as in ``sparsefx.report``."""
    modules = dict(sparse_model.named_modules())
    layers = {}
    for row in sparsefx.report(sparse_model):
        if row.pattern == "dense":
            continue
        module = modules[row.name]
        assert isinstance(module, SPARSE_LAYERS), (row.name, type(module))
        layers[row.name] = (module.in_features, module.out_features, stored_rows(module))
    return layers


def ideal_sparse(dense_model: nn.Module, sparse_model: nn.Module) -> nn.Module:
    """A copy of ``dense_model`` with every layer that ``sparse_model`` (its
    ``sparsefx.transform``) made sparse replaced by an ``IdealSparseLinear`` of the same
    shape; raises if a sparsified site is neither an ``nn.Linear`` nor a GPT-2 ``Conv1D``."""
    ideal = copy.deepcopy(dense_model)
    for name, (in_features, out_features, rows) in sparsified_layers(sparse_model).items():
        owner_name = name
        owner = ideal.get_submodule(name) if _is_module(ideal, name) else None
        if owner is None:  # a functional site: the module that owns the weight parameter
            owner_name = name.rpartition(".")[0]
            owner = ideal.get_submodule(owner_name)
            if type(owner).__name__ != "Conv1D" or name.rpartition(".")[2] != "weight":
                raise TypeError(f"{name}: the ideal reference replaces nn.Linear and GPT-2 "
                                f"Conv1D layers; this site is in a {type(owner).__name__}")
            weight_shape = (owner.weight.shape[1], owner.weight.shape[0])  # Conv1D: (in, out)
        elif isinstance(owner, nn.Linear):
            weight_shape = tuple(owner.weight.shape)
        else:
            raise TypeError(f"{name}: expected an nn.Linear, found {type(owner).__name__}")
        if weight_shape != (out_features, in_features):
            raise ValueError(f"{name}: the dense layer is {weight_shape} (out, in), the sparse "
                             f"one ({out_features}, {in_features})")
        replacement = IdealSparseLinear(in_features, out_features, rows,
                                        bias=owner.bias is not None)
        parent_name, _, child = owner_name.rpartition(".")
        setattr(ideal.get_submodule(parent_name), child, replacement)
    return ideal


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
