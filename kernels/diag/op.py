"""``torch.ops.sparsefx.diag_linear`` and its gradient ops: schemas, the Python op functions
(the CUDA path with the Triton kernels, and the CPU path without the native library), fakes,
the Python autograd for that case, and FLOP formulas. The C++ CPU kernels and autograd:
``diag_ops.cpp``.

    torch.ops.sparsefx.diag_linear(x, values, offsets, out_features, bias=None)

plus ``diag_linear_grad_input`` and ``diag_linear_grad_values``, which the backward calls and
which are ops themselves so that ``torch.compile`` traces the backward too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_kernels
from .._checks import check_rows_match
from .._library import (PatternOps, add_bias, bias_grad, define_ops, features, leading,
                        require_supported_device)
from .checks import check_diag

__all__ = ["diag_linear"]

SCHEMAS = {
    "diag_linear": "diag_linear(Tensor x, Tensor values, Tensor offsets, SymInt out_features, "
                   "Tensor? bias=None) -> Tensor",
    "diag_linear_grad_input": "diag_linear_grad_input(Tensor grad_out, Tensor values, "
                              "Tensor offsets, SymInt in_features) -> Tensor",
    "diag_linear_grad_values": "diag_linear_grad_values(Tensor grad_out, Tensor x, "
                               "Tensor values, Tensor offsets) -> Tensor",
}


def _diag_linear(kernels, x: Tensor, values: Tensor, offsets: Tensor, out_features: int,
                 bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the diagonal-sparse ``W[out_features, in_features]`` that keeps
    diagonals ``offsets[K]`` with entries ``values[K, L]`` (convention: ``kernels.patterns``)."""
    op = "sparsefx.diag_linear"
    require_supported_device(op, "x", x)
    check_diag(op, x, "x", values, offsets, out_features, features(x), bias)
    in_features = x.shape[-1]
    y = kernels.diag_apply(x.reshape(-1, in_features), values, offsets,
                           mod=max(out_features, in_features),
                           gather=out_features < in_features)
    return add_bias(y, bias).reshape(*leading(x), out_features)


def _diag_linear_grad_input(kernels, grad_out: Tensor, values: Tensor, offsets: Tensor,
                            in_features: int) -> Tensor:
    """``grad_out @ W``: the transpose of a diagonal matrix is diagonal, so this is the
    forward kernel with the gather and scatter forms swapped."""
    op = "sparsefx.diag_linear_grad_input"
    require_supported_device(op, "grad_out", grad_out)
    out_features = features(grad_out)
    check_diag(op, grad_out, "grad_out", values, offsets, out_features, in_features)
    grad_x = kernels.diag_apply(grad_out.reshape(-1, out_features), values, offsets,
                                mod=max(out_features, in_features),
                                gather=out_features >= in_features)
    return grad_x.reshape(*leading(grad_out), in_features)


def _check_values_grad(op, grad_out, x, values, offsets, structure):
    check_diag(op, x, "x", values, offsets, features(grad_out), features(x), structure=structure)
    check_diag(op, grad_out, "grad_out", values, offsets, features(grad_out), features(x),
               structure=False)
    check_rows_match(op, grad_out, x)


def _diag_linear_grad_values(kernels, grad_out: Tensor, x: Tensor, values: Tensor,
                             offsets: Tensor) -> Tensor:
    """Gradient of ``values[K, L]``: the kept diagonals of ``grad_out.T @ x`` only."""
    op = "sparsefx.diag_linear_grad_values"
    require_supported_device(op, "x", x)
    _check_values_grad(op, grad_out, x, values, offsets, structure=True)
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    grad_rows, x_rows = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    # wide (out < in): grad[k, t] = sum grad_out[:, t] * x[:, (t + d) % in]; tall: the reverse
    a, b = (grad_rows, x_rows) if out_features < in_features else (x_rows, grad_rows)
    return kernels.diag_values_grad(a, b, offsets, mod=max(out_features, in_features))


# ---------------------------------------------------------------------------------- fakes
# Shapes, dtypes and the checks that need no data: a compiled model fails while tracing with
# the same message as an eager call.


def _fake_diag_linear(x, values, offsets, out_features, bias=None):
    check_diag("sparsefx.diag_linear", x, "x", values, offsets, out_features, features(x), bias,
               structure=False)
    return x.new_empty(*leading(x), out_features)


def _fake_grad_input(grad_out, values, offsets, in_features):
    check_diag("sparsefx.diag_linear_grad_input", grad_out, "grad_out", values, offsets,
               features(grad_out), in_features, structure=False)
    return grad_out.new_empty(*leading(grad_out), in_features)


def _fake_grad_values(grad_out, x, values, offsets):
    _check_values_grad("sparsefx.diag_linear_grad_values", grad_out, x, values, offsets,
                       structure=False)
    return values.new_empty(values.shape)


# ------------------------------------------------------------ autograd without native code
# Only where the native library failed to build: its C++ autograd function does the same.


def _setup_context(ctx, inputs, output):
    x, values, offsets, _, _ = inputs
    ctx.save_for_backward(x, values, offsets)


def _backward(ctx, grad_out):
    x, values, offsets = ctx.saved_tensors
    # a call that left bias at its default may report one flag fewer
    need_x, need_values, _, _, need_bias = (*ctx.needs_input_grad, False)[:5]
    ops = torch.ops.sparsefx
    grad_x = (ops.diag_linear_grad_input(grad_out, values, offsets, x.shape[-1]) if need_x
              else None)
    grad_values = (ops.diag_linear_grad_values(grad_out, x, values, offsets) if need_values
                   else None)
    grad_bias = bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, None, grad_bias


define_ops(PatternOps(
    schemas=SCHEMAS,
    functions={"diag_linear": _diag_linear, "diag_linear_grad_input": _diag_linear_grad_input,
               "diag_linear_grad_values": _diag_linear_grad_values},
    cuda=f"{__package__}.triton_kernels",
    torch_kernels=torch_kernels,
    flops={"diag_linear": 1, "diag_linear_grad_input": 1, "diag_linear_grad_values": 2},
    fakes={"diag_linear": _fake_diag_linear, "diag_linear_grad_input": _fake_grad_input,
           "diag_linear_grad_values": _fake_grad_values},
    autograd={"diag_linear": (_backward, _setup_context)},
))

diag_linear = torch.ops.sparsefx.diag_linear
