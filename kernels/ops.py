"""The ``sparsefx`` custom ops: diagonal and fan-in sparse linear layers.

Public call forms::

    torch.ops.sparsefx.diag_linear(x, values, offsets, out_features, bias=None)
    torch.ops.sparsefx.fanin_linear(x, values, indices, bias=None)

plus their gradient ops (``*_grad_input``, ``*_grad_values``), which the autograd formulas
call and which are ops themselves so that ``torch.compile`` traces the backward too.
Each op routes by device: Triton kernels for CUDA tensors, the CPU kernels of ``cpu.py``
for CPU tensors. They are ``custom_op``s (opaque to Inductor) because the CPU path is native
code Inductor cannot look into anyway, and one opaque op keeps a single code path on both
devices. fp16/bf16 are computed with fp32 accumulation on both devices.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import cpu
from ._checks import check_diag, check_fanin, check_float_operands

__all__ = ["diag_linear", "fanin_linear"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require_supported_device(op: str, name: str, x: Tensor) -> None:
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on {x.device}: expected cpu or cuda")


def _leading(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


def _features(x: Tensor) -> int:
    # a 0-d tensor has no feature dim; 0 lets the checks report it properly
    return x.shape[-1] if x.dim() else 0


def _add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _bias_grad(grad_out: Tensor) -> Tensor:
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    return rows.sum(0, dtype=_compute_dtype(grad_out.dtype)).to(grad_out.dtype)


# ------------------------------------------------------------------------------ dispatch


def _run_kernel(kernel: str, *operands, **params) -> Tensor:
    """Run ``kernel`` (a function of the same name in the Triton module of its pattern and in
    ``cpu``) on ``operands``; the first operand's dtype is the result's. Triton gets
    contiguous tensors; the CPU kernels get float operands upcast to fp32 (fp64 stays).
    ``SPARSEFX_CPU_KERNELS=triton`` sends CPU tensors to Triton too, for testing the whole op
    under ``TRITON_INTERPRET=1``."""
    lead = operands[0]
    if lead.is_cuda or cpu.backend_name() == "triton":
        if kernel.startswith("diag"):
            from . import diag_triton as triton_kernels
        else:
            from . import fanin_triton as triton_kernels
        return getattr(triton_kernels, kernel)(*(t.contiguous() for t in operands), **params)
    compute = _compute_dtype(lead.dtype)
    if lead.dtype != compute:
        operands = [t.to(compute) if t.is_floating_point() else t for t in operands]
        return getattr(cpu, kernel)(*operands, **params).to(lead.dtype)
    return getattr(cpu, kernel)(*operands, **params)


def _check_rows_match(op: str, grad_out: Tensor, x: Tensor) -> None:
    if _leading(grad_out) != _leading(x):
        raise ValueError(f"{op}: grad_out has leading dims {_leading(grad_out)}: expected "
                         f"{_leading(x)}, the leading dims of x")


def _check_last_dim(op: str, name: str, tensor: Tensor, expected: int, what: str) -> None:
    if tensor.shape[-1] != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}: expected last "
                         f"dimension {expected} ({what})")


# ---------------------------------------------------------------------------------- diag


@torch.library.custom_op("sparsefx::diag_linear", mutates_args=())
def diag_linear(x: Tensor, values: Tensor, offsets: Tensor, out_features: int,
                bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the diagonal-sparse ``W[out_features, in_features]`` that keeps
    diagonals ``offsets[K]`` with entries ``values[K, L]`` (convention: ``kernels.patterns``)."""
    op = "sparsefx.diag_linear"
    _require_supported_device(op, "x", x)
    check_diag(op, x, "x", values, offsets, out_features, _features(x), bias)
    in_features = x.shape[-1]
    y = _run_kernel("diag_apply", x.reshape(-1, in_features), values, offsets,
                    mod=max(out_features, in_features), gather=out_features < in_features)
    return _add_bias(y, bias).reshape(*_leading(x), out_features)


@diag_linear.register_fake
def _(x, values, offsets, out_features, bias=None):
    check_diag("sparsefx.diag_linear", x, "x", values, offsets, out_features, _features(x), bias,
               structure=False)
    return x.new_empty(*_leading(x), out_features)


@torch.library.custom_op("sparsefx::diag_linear_grad_input", mutates_args=())
def diag_linear_grad_input(grad_out: Tensor, values: Tensor, offsets: Tensor,
                           in_features: int) -> Tensor:
    """``grad_out @ W``: the transpose of a diagonal matrix is diagonal, so this is the
    forward kernel with the gather and scatter forms swapped."""
    op = "sparsefx.diag_linear_grad_input"
    _require_supported_device(op, "grad_out", grad_out)
    out_features = _features(grad_out)
    check_diag(op, grad_out, "grad_out", values, offsets, out_features, in_features)
    grad_x = _run_kernel("diag_apply", grad_out.reshape(-1, out_features), values, offsets,
                         mod=max(out_features, in_features), gather=out_features >= in_features)
    return grad_x.reshape(*_leading(grad_out), in_features)


@diag_linear_grad_input.register_fake
def _(grad_out, values, offsets, in_features):
    check_diag("sparsefx.diag_linear_grad_input", grad_out, "grad_out", values, offsets,
               _features(grad_out), in_features, structure=False)
    return grad_out.new_empty(*_leading(grad_out), in_features)


def _check_diag_values_grad(op, grad_out, x, values, offsets, structure):
    check_diag(op, x, "x", values, offsets, _features(grad_out), _features(x), structure=structure)
    check_diag(op, grad_out, "grad_out", values, offsets, _features(grad_out), _features(x),
               structure=False)
    _check_rows_match(op, grad_out, x)


@torch.library.custom_op("sparsefx::diag_linear_grad_values", mutates_args=())
def diag_linear_grad_values(grad_out: Tensor, x: Tensor, values: Tensor,
                            offsets: Tensor) -> Tensor:
    """Gradient of ``values[K, L]``: the kept diagonals of ``grad_out.T @ x`` only."""
    op = "sparsefx.diag_linear_grad_values"
    _require_supported_device(op, "x", x)
    _check_diag_values_grad(op, grad_out, x, values, offsets, structure=True)
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    grad_rows, x_rows = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    # wide (out < in): grad[k, t] = sum grad_out[:, t] * x[:, (t + d) % in]; tall: the reverse
    a, b = (grad_rows, x_rows) if out_features < in_features else (x_rows, grad_rows)
    return _run_kernel("diag_values_grad", a, b, offsets, mod=max(out_features, in_features))


@diag_linear_grad_values.register_fake
def _(grad_out, x, values, offsets):
    _check_diag_values_grad("sparsefx.diag_linear_grad_values", grad_out, x, values, offsets,
                            structure=False)
    return values.new_empty(values.shape)


def _diag_setup_context(ctx, inputs, output):
    x, values, offsets, _, _ = inputs
    ctx.save_for_backward(x, values, offsets)


def _diag_backward(ctx, grad_out):
    x, values, offsets = ctx.saved_tensors
    # a call that left bias at its default may report one flag fewer
    need_x, need_values, _, _, need_bias = (*ctx.needs_input_grad, False)[:5]
    grad_x = diag_linear_grad_input(grad_out, values, offsets, x.shape[-1]) if need_x else None
    grad_values = diag_linear_grad_values(grad_out, x, values, offsets) if need_values else None
    grad_bias = _bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, None, grad_bias


diag_linear.register_autograd(_diag_backward, setup_context=_diag_setup_context)


# --------------------------------------------------------------------------------- fanin


@torch.library.custom_op("sparsefx::fanin_linear", mutates_args=())
def fanin_linear(x: Tensor, values: Tensor, indices: Tensor,
                 bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the constant fan-in ``W[out, in]`` whose row ``o`` holds
    ``values[o, j]`` at column ``indices[o, j]``. N:M layers use this op too."""
    op = "sparsefx.fanin_linear"
    _require_supported_device(op, "x", x)
    check_fanin(op, x, "x", values, indices, _features(x), bias)
    y = _run_kernel("fanin_forward", x.reshape(-1, x.shape[-1]), values, indices)
    return _add_bias(y, bias).reshape(*_leading(x), values.shape[0])


@fanin_linear.register_fake
def _(x, values, indices, bias=None):
    check_fanin("sparsefx.fanin_linear", x, "x", values, indices, _features(x), bias,
                structure=False)
    return x.new_empty(*_leading(x), values.shape[0])


def _check_fanin_grad_input(op, grad_out, values, indices, in_features, structure):
    check_fanin(op, grad_out, "grad_out", values, indices, in_features, structure=structure)
    _check_last_dim(op, "grad_out", grad_out, values.shape[0], "out features, rows of values")


@torch.library.custom_op("sparsefx::fanin_linear_grad_input", mutates_args=())
def fanin_linear_grad_input(grad_out: Tensor, values: Tensor, indices: Tensor,
                            in_features: int) -> Tensor:
    """``grad_out @ W`` for the fan-in ``W``."""
    op = "sparsefx.fanin_linear_grad_input"
    _require_supported_device(op, "grad_out", grad_out)
    _check_fanin_grad_input(op, grad_out, values, indices, in_features, structure=True)
    grad_x = _run_kernel("fanin_input_grad", grad_out.reshape(-1, grad_out.shape[-1]), values,
                         indices, in_features=in_features)
    return grad_x.reshape(*_leading(grad_out), in_features)


@fanin_linear_grad_input.register_fake
def _(grad_out, values, indices, in_features):
    _check_fanin_grad_input("sparsefx.fanin_linear_grad_input", grad_out, values, indices,
                            in_features, structure=False)
    return grad_out.new_empty(*_leading(grad_out), in_features)


def _check_fanin_values_grad(op, grad_out, x, indices, structure):
    check_fanin(op, x, "x", None, indices, _features(x), structure=structure)
    check_fanin(op, grad_out, "grad_out", None, indices, _features(x), structure=False)
    check_float_operands(op, {"x": x, "grad_out": grad_out})
    _check_last_dim(op, "grad_out", grad_out, indices.shape[0], "out features, rows of indices")
    _check_rows_match(op, grad_out, x)


@torch.library.custom_op("sparsefx::fanin_linear_grad_values", mutates_args=())
def fanin_linear_grad_values(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """Gradient of ``values[out, k]``: ``grad_out.T @ x`` read at the stored entries only."""
    op = "sparsefx.fanin_linear_grad_values"
    _require_supported_device(op, "x", x)
    _check_fanin_values_grad(op, grad_out, x, indices, structure=True)
    return _run_kernel("fanin_values_grad", grad_out.reshape(-1, grad_out.shape[-1]),
                       x.reshape(-1, x.shape[-1]), indices)


@fanin_linear_grad_values.register_fake
def _(grad_out, x, indices):
    _check_fanin_values_grad("sparsefx.fanin_linear_grad_values", grad_out, x, indices,
                             structure=False)
    return x.new_empty(indices.shape)


def _fanin_setup_context(ctx, inputs, output):
    x, values, indices, _ = inputs
    ctx.save_for_backward(x, values, indices)


def _fanin_backward(ctx, grad_out):
    x, values, indices = ctx.saved_tensors
    need_x, need_values, _, need_bias = (*ctx.needs_input_grad, False)[:4]
    grad_x = (fanin_linear_grad_input(grad_out, values, indices, x.shape[-1]) if need_x
              else None)
    grad_values = fanin_linear_grad_values(grad_out, x, indices) if need_values else None
    grad_bias = _bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, grad_bias


fanin_linear.register_autograd(_fanin_backward, setup_context=_fanin_setup_context)


# ---------------------------------------------------------------------------------- flops
# FlopCounterMode counts 2 FLOPs per stored multiply-add, as it does for dense matmuls: each
# op does one per stored weight per activation row. The rows come from the first operand;
# the stored weights are the shape of ``values`` (or of ``indices``), at the position below.


def _register_flops(op, stored_position: int) -> None:
    @register_flop_formula(op)
    def flops(*shapes, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(shapes[0][:-1]) * math.prod(shapes[stored_position])


for _name, _stored_position in [("diag_linear", 1), ("diag_linear_grad_input", 1),
                                ("diag_linear_grad_values", 2), ("fanin_linear", 1),
                                ("fanin_linear_grad_input", 1), ("fanin_linear_grad_values", 2)]:
    _register_flops(getattr(torch.ops.sparsefx, _name), _stored_position)
