"""``torch.ops.sparsefx.fanin_linear`` and its gradient ops (N:M layers use them too):
schemas, the Python op functions (the CUDA path with the Triton kernels, and the CPU path
without the native library), fakes, the Python autograd for that case, and FLOP formulas.
The C++ CPU kernels and autograd: ``fanin_ops.cpp``.

    torch.ops.sparsefx.fanin_linear(x, values, indices, bias=None)

plus ``fanin_linear_grad_input`` and ``fanin_linear_grad_values``, which the backward calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_kernels
from .._checks import check_float_operands, check_last_dim, check_rows_match
from .._library import (PatternOps, add_bias, bias_grad, define_ops, features, leading,
                        require_supported_device)
from .checks import check_fanin

__all__ = ["fanin_linear"]

SCHEMAS = {
    "fanin_linear": "fanin_linear(Tensor x, Tensor values, Tensor indices, "
                    "Tensor? bias=None) -> Tensor",
    "fanin_linear_grad_input": "fanin_linear_grad_input(Tensor grad_out, Tensor values, "
                               "Tensor indices, SymInt in_features) -> Tensor",
    "fanin_linear_grad_values": "fanin_linear_grad_values(Tensor grad_out, Tensor x, "
                                "Tensor indices) -> Tensor",
}


def _fanin_linear(kernels, x: Tensor, values: Tensor, indices: Tensor,
                  bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the constant fan-in ``W[out, in]`` whose row ``o`` holds
    ``values[o, j]`` at column ``indices[o, j]``."""
    op = "sparsefx.fanin_linear"
    require_supported_device(op, "x", x)
    check_fanin(op, x, "x", values, indices, features(x), bias)
    y = kernels.fanin_forward(x.reshape(-1, x.shape[-1]), values, indices)
    return add_bias(y, bias).reshape(*leading(x), values.shape[0])


def _check_grad_input(op, grad_out, values, indices, in_features, structure):
    check_fanin(op, grad_out, "grad_out", values, indices, in_features, structure=structure)
    check_last_dim(op, "grad_out", grad_out, values.shape[0], "out features, rows of values")


def _fanin_linear_grad_input(kernels, grad_out: Tensor, values: Tensor, indices: Tensor,
                             in_features: int) -> Tensor:
    """``grad_out @ W`` for the fan-in ``W``."""
    op = "sparsefx.fanin_linear_grad_input"
    require_supported_device(op, "grad_out", grad_out)
    _check_grad_input(op, grad_out, values, indices, in_features, structure=True)
    grad_x = kernels.fanin_input_grad(grad_out.reshape(-1, grad_out.shape[-1]), values,
                                      indices, in_features=in_features)
    return grad_x.reshape(*leading(grad_out), in_features)


def _check_values_grad(op, grad_out, x, indices, structure):
    check_fanin(op, x, "x", None, indices, features(x), structure=structure)
    check_fanin(op, grad_out, "grad_out", None, indices, features(x), structure=False)
    check_float_operands(op, {"x": x, "grad_out": grad_out})
    check_last_dim(op, "grad_out", grad_out, indices.shape[0], "out features, rows of indices")
    check_rows_match(op, grad_out, x)


def _fanin_linear_grad_values(kernels, grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """Gradient of ``values[out, k]``: ``grad_out.T @ x`` read at the stored entries only."""
    op = "sparsefx.fanin_linear_grad_values"
    require_supported_device(op, "x", x)
    _check_values_grad(op, grad_out, x, indices, structure=True)
    return kernels.fanin_values_grad(grad_out.reshape(-1, grad_out.shape[-1]),
                                     x.reshape(-1, x.shape[-1]), indices)


# ---------------------------------------------------------------------------------- fakes


def _fake_fanin_linear(x, values, indices, bias=None):
    check_fanin("sparsefx.fanin_linear", x, "x", values, indices, features(x), bias,
                structure=False)
    return x.new_empty(*leading(x), values.shape[0])


def _fake_grad_input(grad_out, values, indices, in_features):
    _check_grad_input("sparsefx.fanin_linear_grad_input", grad_out, values, indices,
                      in_features, structure=False)
    return grad_out.new_empty(*leading(grad_out), in_features)


def _fake_grad_values(grad_out, x, indices):
    _check_values_grad("sparsefx.fanin_linear_grad_values", grad_out, x, indices,
                       structure=False)
    return x.new_empty(indices.shape)


# ------------------------------------------------------------ autograd without native code


def _setup_context(ctx, inputs, output):
    x, values, indices, _ = inputs
    ctx.save_for_backward(x, values, indices)


def _backward(ctx, grad_out):
    x, values, indices = ctx.saved_tensors
    need_x, need_values, _, need_bias = (*ctx.needs_input_grad, False)[:4]
    ops = torch.ops.sparsefx
    grad_x = (ops.fanin_linear_grad_input(grad_out, values, indices, x.shape[-1]) if need_x
              else None)
    grad_values = ops.fanin_linear_grad_values(grad_out, x, indices) if need_values else None
    grad_bias = bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, grad_bias


define_ops(PatternOps(
    schemas=SCHEMAS,
    functions={"fanin_linear": _fanin_linear,
               "fanin_linear_grad_input": _fanin_linear_grad_input,
               "fanin_linear_grad_values": _fanin_linear_grad_values},
    cuda=f"{__package__}.triton_kernels",
    torch_kernels=torch_kernels,
    flops={"fanin_linear": 1, "fanin_linear_grad_input": 1, "fanin_linear_grad_values": 2},
    fakes={"fanin_linear": _fake_fanin_linear, "fanin_linear_grad_input": _fake_grad_input,
           "fanin_linear_grad_values": _fake_grad_values},
    autograd={"fanin_linear": (_backward, _setup_context)},
))

fanin_linear = torch.ops.sparsefx.fanin_linear
