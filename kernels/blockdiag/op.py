"""``torch.ops.sparsefx.blockdiag_linear`` and its gradient ops: schemas, the Python op
functions (the CUDA path, and the CPU path without the native library), fakes, the Python
autograd for that case, and FLOP formulas. The C++ CPU kernels and autograd:
``blockdiag_ops.cpp``.

    torch.ops.sparsefx.blockdiag_linear(x, values, offsets, out_features, groups, bias=None)

The operands are those of ``diag_linear`` (a blockdiag layer is a diag layer whose offsets
are whole cosets of ``g Z_P``, ``patterns.blockdiag_offsets``) plus ``groups`` (``g``); the
kernels compute with the ``c`` dense ``(out/g) x (in/g)`` blocks per block-row as batched
GEMMs. ``blockdiag_linear_grad_input`` and ``blockdiag_linear_grad_values`` are the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_kernels
from .._checks import check_rows_match
from .._library import (PatternOps, add_bias, bias_grad, define_ops, features, leading,
                        require_supported_device)
from ..diag.checks import check_diag
from .checks import check_blockdiag

__all__ = ["blockdiag_linear"]

SCHEMAS = {
    "blockdiag_linear": "blockdiag_linear(Tensor x, Tensor values, Tensor offsets, "
                        "SymInt out_features, SymInt groups, Tensor? bias=None) -> Tensor",
    "blockdiag_linear_grad_input": "blockdiag_linear_grad_input(Tensor grad_out, Tensor values, "
                                   "Tensor offsets, SymInt in_features, SymInt groups) -> Tensor",
    "blockdiag_linear_grad_values": "blockdiag_linear_grad_values(Tensor grad_out, Tensor x, "
                                    "Tensor values, Tensor offsets, SymInt groups) -> Tensor",
}


def _blockdiag_linear(kernels, x: Tensor, values: Tensor, offsets: Tensor, out_features: int,
                      groups: int, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the blocked-diagonal ``W[out_features, in_features]``."""
    op = "sparsefx.blockdiag_linear"
    require_supported_device(op, "x", x)
    check_blockdiag(op, x, "x", values, offsets, out_features, features(x), groups, bias)
    y = kernels.blockdiag_forward(x.reshape(-1, x.shape[-1]), values, offsets,
                                  out_features=out_features, groups=groups)
    return add_bias(y, bias).reshape(*leading(x), out_features)


def _blockdiag_linear_grad_input(kernels, grad_out: Tensor, values: Tensor, offsets: Tensor,
                                 in_features: int, groups: int) -> Tensor:
    """``grad_out @ W``."""
    op = "sparsefx.blockdiag_linear_grad_input"
    require_supported_device(op, "grad_out", grad_out)
    check_blockdiag(op, grad_out, "grad_out", values, offsets, features(grad_out), in_features,
                    groups)
    grad_x = kernels.blockdiag_input_grad(grad_out.reshape(-1, grad_out.shape[-1]), values,
                                          offsets, in_features=in_features, groups=groups)
    return grad_x.reshape(*leading(grad_out), in_features)


def _check_values_grad(op, grad_out, x, values, offsets, groups, structure):
    check_blockdiag(op, x, "x", values, offsets, features(grad_out), features(x), groups,
                    structure=structure)
    check_diag(op, grad_out, "grad_out", values, offsets, features(grad_out), features(x),
               structure=False)
    check_rows_match(op, grad_out, x)


def _blockdiag_linear_grad_values(kernels, grad_out: Tensor, x: Tensor, values: Tensor,
                                  offsets: Tensor, groups: int) -> Tensor:
    """Gradient of ``values[K, L]``: the kept blocks of ``grad_out.T @ x`` only."""
    op = "sparsefx.blockdiag_linear_grad_values"
    require_supported_device(op, "x", x)
    _check_values_grad(op, grad_out, x, values, offsets, groups, structure=True)
    return kernels.blockdiag_values_grad(grad_out.reshape(-1, grad_out.shape[-1]),
                                         x.reshape(-1, x.shape[-1]), offsets, groups=groups)


# ---------------------------------------------------------------------------------- fakes


def _fake_blockdiag_linear(x, values, offsets, out_features, groups, bias=None):
    check_blockdiag("sparsefx.blockdiag_linear", x, "x", values, offsets, out_features,
                    features(x), groups, bias, structure=False)
    return x.new_empty(*leading(x), out_features)


def _fake_grad_input(grad_out, values, offsets, in_features, groups):
    check_blockdiag("sparsefx.blockdiag_linear_grad_input", grad_out, "grad_out", values,
                    offsets, features(grad_out), in_features, groups, structure=False)
    return grad_out.new_empty(*leading(grad_out), in_features)


def _fake_grad_values(grad_out, x, values, offsets, groups):
    _check_values_grad("sparsefx.blockdiag_linear_grad_values", grad_out, x, values, offsets,
                       groups, structure=False)
    return values.new_empty(values.shape)


# ------------------------------------------------------------ autograd without native code


def _setup_context(ctx, inputs, output):
    x, values, offsets, _, groups, _ = inputs
    ctx.save_for_backward(x, values, offsets)
    ctx.groups = groups


def _backward(ctx, grad_out):
    x, values, offsets = ctx.saved_tensors
    need_x, need_values, _, _, _, need_bias = (*ctx.needs_input_grad, False)[:6]
    ops = torch.ops.sparsefx
    grad_x = (ops.blockdiag_linear_grad_input(grad_out, values, offsets, x.shape[-1],
                                              ctx.groups) if need_x else None)
    grad_values = (ops.blockdiag_linear_grad_values(grad_out, x, values, offsets, ctx.groups)
                   if need_values else None)
    grad_bias = bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, None, None, grad_bias


define_ops(PatternOps(
    schemas=SCHEMAS,
    functions={"blockdiag_linear": _blockdiag_linear,
               "blockdiag_linear_grad_input": _blockdiag_linear_grad_input,
               "blockdiag_linear_grad_values": _blockdiag_linear_grad_values},
    cuda=f"{__package__}.triton_kernels",
    torch_kernels=torch_kernels,
    flops={"blockdiag_linear": 1, "blockdiag_linear_grad_input": 1,
           "blockdiag_linear_grad_values": 2},
    fakes={"blockdiag_linear": _fake_blockdiag_linear,
           "blockdiag_linear_grad_input": _fake_grad_input,
           "blockdiag_linear_grad_values": _fake_grad_values},
    autograd={"blockdiag_linear": (_backward, _setup_context)},
))

blockdiag_linear = torch.ops.sparsefx.blockdiag_linear
