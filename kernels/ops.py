"""The ``sparsefx`` custom ops: diagonal and fan-in sparse linear layers.

Public call forms::

    torch.ops.sparsefx.diag_linear(x, values, offsets, out_features, bias=None)
    torch.ops.sparsefx.fanin_linear(x, values, indices, bias=None)

plus their gradient ops (``*_grad_input``, ``*_grad_values``), which the backward calls and
which are ops themselves so that ``torch.compile`` traces the backward too. fp16/bf16 are
computed with fp32 accumulation on both devices.

Where each part lives, so that a CPU call runs no Python:

* the schemas: here (``_SCHEMAS``), one definition for every backend;
* CPU kernels, their argument checks and the autograd of ``diag_linear`` / ``fanin_linear``
  (one C++ autograd function serving every device): C++, ``csrc/ops.cpp``, loaded by
  ``cpu.load_native()`` at import;
* CUDA kernels: the Triton kernels of ``diag_triton.py`` / ``fanin_triton.py``, registered
  here with the Python checks of ``_checks.py``;
* fake (meta) implementations and FLOP formulas: here.

Where the native library cannot be built, the PyTorch kernels of ``cpu.py`` and the autograd
formulas below take the CPU's place. ``use_cpu_kernels("torch" | "triton" | "native")``
switches the CPU kernels at run time (``"triton"`` runs the Triton kernels on CPU tensors
under ``TRITON_INTERPRET=1``, for tests); ``SPARSEFX_CPU_KERNELS`` sets the initial choice.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import cpu
from ._checks import check_diag, check_fanin, check_float_operands

__all__ = ["diag_linear", "fanin_linear", "use_cpu_kernels", "cpu_kernels", "CPU_KERNELS"]

CPU_KERNELS = ("native", "torch", "triton")

_SCHEMAS = {
    "diag_linear": "diag_linear(Tensor x, Tensor values, Tensor offsets, SymInt out_features, "
                   "Tensor? bias=None) -> Tensor",
    "diag_linear_grad_input": "diag_linear_grad_input(Tensor grad_out, Tensor values, "
                              "Tensor offsets, SymInt in_features) -> Tensor",
    "diag_linear_grad_values": "diag_linear_grad_values(Tensor grad_out, Tensor x, "
                               "Tensor values, Tensor offsets) -> Tensor",
    "fanin_linear": "fanin_linear(Tensor x, Tensor values, Tensor indices, "
                    "Tensor? bias=None) -> Tensor",
    "fanin_linear_grad_input": "fanin_linear_grad_input(Tensor grad_out, Tensor values, "
                               "Tensor indices, SymInt in_features) -> Tensor",
    "fanin_linear_grad_values": "fanin_linear_grad_values(Tensor grad_out, Tensor x, "
                                "Tensor indices) -> Tensor",
}

_LIB = torch.library.Library("sparsefx", "FRAGMENT")
for _schema in _SCHEMAS.values():
    _LIB.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))

diag_linear = torch.ops.sparsefx.diag_linear
fanin_linear = torch.ops.sparsefx.fanin_linear


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


# ------------------------------------------------------------------- Python kernels
# What CUDA tensors run (the Triton kernels), and CPU tensors where the native library is not
# used (the PyTorch kernels of ``cpu.py``, or Triton under the interpreter for tests): the
# same checks as the C++ ones, then one pattern's kernels, bound per device at registration.


class _TritonKernels:
    """A pattern's Triton kernels (its ``*_triton`` module, imported on first use: Triton is
    only needed where they run), called on contiguous operands."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, kernel: str):  # first use of ``kernel`` only: then it is cached
        function = getattr(importlib.import_module(f".{self._module}", __package__), kernel)

        def run(*operands, **params):
            return function(*(t.contiguous() for t in operands), **params)
        setattr(self, kernel, run)
        return run


class _TorchKernels:
    """The PyTorch kernels of ``cpu.py``: float operands upcast to fp32 (fp64 stays), the
    result in the first operand's dtype."""

    def __getattr__(self, kernel: str):  # first use of ``kernel`` only: then it is cached
        function = getattr(cpu, kernel)

        def run(*operands, **params):
            lead = operands[0]
            compute = _compute_dtype(lead.dtype)
            if lead.dtype == compute:
                return function(*operands, **params)
            operands = [t.to(compute) if t.is_floating_point() else t for t in operands]
            return function(*operands, **params).to(lead.dtype)
        setattr(self, kernel, run)  # later calls find it without __getattr__
        return run


# each backend's kernels, per pattern
_BACKENDS = {
    "triton": {"diag": _TritonKernels("diag_triton"), "fanin": _TritonKernels("fanin_triton")},
    "torch": {"diag": _TorchKernels(), "fanin": _TorchKernels()},
}


def _check_rows_match(op: str, grad_out: Tensor, x: Tensor) -> None:
    if _leading(grad_out) != _leading(x):
        raise ValueError(f"{op}: grad_out has leading dims {_leading(grad_out)}: expected "
                         f"{_leading(x)}, the leading dims of x")


def _check_last_dim(op: str, name: str, tensor: Tensor, expected: int, what: str) -> None:
    if tensor.shape[-1] != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}: expected last "
                         f"dimension {expected} ({what})")


def _diag_linear(kernels, x: Tensor, values: Tensor, offsets: Tensor, out_features: int,
                 bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the diagonal-sparse ``W[out_features, in_features]`` that keeps
    diagonals ``offsets[K]`` with entries ``values[K, L]`` (convention: ``kernels.patterns``)."""
    op = "sparsefx.diag_linear"
    _require_supported_device(op, "x", x)
    check_diag(op, x, "x", values, offsets, out_features, _features(x), bias)
    in_features = x.shape[-1]
    y = kernels.diag_apply(x.reshape(-1, in_features), values, offsets,
                    mod=max(out_features, in_features), gather=out_features < in_features)
    return _add_bias(y, bias).reshape(*_leading(x), out_features)


def _diag_linear_grad_input(kernels, grad_out: Tensor, values: Tensor, offsets: Tensor,
                            in_features: int) -> Tensor:
    """``grad_out @ W``: the transpose of a diagonal matrix is diagonal, so this is the
    forward kernel with the gather and scatter forms swapped."""
    op = "sparsefx.diag_linear_grad_input"
    _require_supported_device(op, "grad_out", grad_out)
    out_features = _features(grad_out)
    check_diag(op, grad_out, "grad_out", values, offsets, out_features, in_features)
    grad_x = kernels.diag_apply(grad_out.reshape(-1, out_features), values, offsets,
                         mod=max(out_features, in_features), gather=out_features >= in_features)
    return grad_x.reshape(*_leading(grad_out), in_features)


def _check_diag_values_grad(op, grad_out, x, values, offsets, structure):
    check_diag(op, x, "x", values, offsets, _features(grad_out), _features(x), structure=structure)
    check_diag(op, grad_out, "grad_out", values, offsets, _features(grad_out), _features(x),
               structure=False)
    _check_rows_match(op, grad_out, x)


def _diag_linear_grad_values(kernels, grad_out: Tensor, x: Tensor, values: Tensor,
                             offsets: Tensor) -> Tensor:
    """Gradient of ``values[K, L]``: the kept diagonals of ``grad_out.T @ x`` only."""
    op = "sparsefx.diag_linear_grad_values"
    _require_supported_device(op, "x", x)
    _check_diag_values_grad(op, grad_out, x, values, offsets, structure=True)
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    grad_rows, x_rows = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    # wide (out < in): grad[k, t] = sum grad_out[:, t] * x[:, (t + d) % in]; tall: the reverse
    a, b = (grad_rows, x_rows) if out_features < in_features else (x_rows, grad_rows)
    return kernels.diag_values_grad(a, b, offsets, mod=max(out_features, in_features))


def _fanin_linear(kernels, x: Tensor, values: Tensor, indices: Tensor,
                  bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for the constant fan-in ``W[out, in]`` whose row ``o`` holds
    ``values[o, j]`` at column ``indices[o, j]``. N:M layers use this op too."""
    op = "sparsefx.fanin_linear"
    _require_supported_device(op, "x", x)
    check_fanin(op, x, "x", values, indices, _features(x), bias)
    y = kernels.fanin_forward(x.reshape(-1, x.shape[-1]), values, indices)
    return _add_bias(y, bias).reshape(*_leading(x), values.shape[0])


def _check_fanin_grad_input(op, grad_out, values, indices, in_features, structure):
    check_fanin(op, grad_out, "grad_out", values, indices, in_features, structure=structure)
    _check_last_dim(op, "grad_out", grad_out, values.shape[0], "out features, rows of values")


def _fanin_linear_grad_input(kernels, grad_out: Tensor, values: Tensor, indices: Tensor,
                             in_features: int) -> Tensor:
    """``grad_out @ W`` for the fan-in ``W``."""
    op = "sparsefx.fanin_linear_grad_input"
    _require_supported_device(op, "grad_out", grad_out)
    _check_fanin_grad_input(op, grad_out, values, indices, in_features, structure=True)
    grad_x = kernels.fanin_input_grad(grad_out.reshape(-1, grad_out.shape[-1]), values,
                         indices, in_features=in_features)
    return grad_x.reshape(*_leading(grad_out), in_features)


def _check_fanin_values_grad(op, grad_out, x, indices, structure):
    check_fanin(op, x, "x", None, indices, _features(x), structure=structure)
    check_fanin(op, grad_out, "grad_out", None, indices, _features(x), structure=False)
    check_float_operands(op, {"x": x, "grad_out": grad_out})
    _check_last_dim(op, "grad_out", grad_out, indices.shape[0], "out features, rows of indices")
    _check_rows_match(op, grad_out, x)


def _fanin_linear_grad_values(kernels, grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """Gradient of ``values[out, k]``: ``grad_out.T @ x`` read at the stored entries only."""
    op = "sparsefx.fanin_linear_grad_values"
    _require_supported_device(op, "x", x)
    _check_fanin_values_grad(op, grad_out, x, indices, structure=True)
    return kernels.fanin_values_grad(grad_out.reshape(-1, grad_out.shape[-1]),
                       x.reshape(-1, x.shape[-1]), indices)


_PYTHON_KERNELS = {  # op -> (its Python function, its pattern)
    "diag_linear": (_diag_linear, "diag"),
    "diag_linear_grad_input": (_diag_linear_grad_input, "diag"),
    "diag_linear_grad_values": (_diag_linear_grad_values, "diag"),
    "fanin_linear": (_fanin_linear, "fanin"),
    "fanin_linear_grad_input": (_fanin_linear_grad_input, "fanin"),
    "fanin_linear_grad_values": (_fanin_linear_grad_values, "fanin"),
}


def _register(lib: torch.library.Library, backend: str, device: str) -> None:
    """Register every op's Python function with ``backend``'s kernels for ``device``."""
    for name, (function, pattern) in _PYTHON_KERNELS.items():
        lib.impl(name, functools.partial(function, _BACKENDS[backend][pattern]), device)


_register(_LIB, "triton", "CUDA")


# ---------------------------------------------------------------------------------- fakes
# Shapes, dtypes and the checks that need no data: a compiled model fails while tracing with
# the same message as an eager call.


@torch.library.register_fake("sparsefx::diag_linear", lib=_LIB)
def _(x, values, offsets, out_features, bias=None):
    check_diag("sparsefx.diag_linear", x, "x", values, offsets, out_features, _features(x), bias,
               structure=False)
    return x.new_empty(*_leading(x), out_features)


@torch.library.register_fake("sparsefx::diag_linear_grad_input", lib=_LIB)
def _(grad_out, values, offsets, in_features):
    check_diag("sparsefx.diag_linear_grad_input", grad_out, "grad_out", values, offsets,
               _features(grad_out), in_features, structure=False)
    return grad_out.new_empty(*_leading(grad_out), in_features)


@torch.library.register_fake("sparsefx::diag_linear_grad_values", lib=_LIB)
def _(grad_out, x, values, offsets):
    _check_diag_values_grad("sparsefx.diag_linear_grad_values", grad_out, x, values, offsets,
                            structure=False)
    return values.new_empty(values.shape)


@torch.library.register_fake("sparsefx::fanin_linear", lib=_LIB)
def _(x, values, indices, bias=None):
    check_fanin("sparsefx.fanin_linear", x, "x", values, indices, _features(x), bias,
                structure=False)
    return x.new_empty(*_leading(x), values.shape[0])


@torch.library.register_fake("sparsefx::fanin_linear_grad_input", lib=_LIB)
def _(grad_out, values, indices, in_features):
    _check_fanin_grad_input("sparsefx.fanin_linear_grad_input", grad_out, values, indices,
                            in_features, structure=False)
    return grad_out.new_empty(*_leading(grad_out), in_features)


@torch.library.register_fake("sparsefx::fanin_linear_grad_values", lib=_LIB)
def _(grad_out, x, indices):
    _check_fanin_values_grad("sparsefx.fanin_linear_grad_values", grad_out, x, indices,
                             structure=False)
    return x.new_empty(indices.shape)


# ------------------------------------------------------------ autograd without native code
# Only where the native library failed to build: its C++ autograd functions do the same.


def _diag_setup_context(ctx, inputs, output):
    x, values, offsets, _, _ = inputs
    ctx.save_for_backward(x, values, offsets)


def _diag_backward(ctx, grad_out):
    x, values, offsets = ctx.saved_tensors
    # a call that left bias at its default may report one flag fewer
    need_x, need_values, _, _, need_bias = (*ctx.needs_input_grad, False)[:5]
    ops = torch.ops.sparsefx
    grad_x = (ops.diag_linear_grad_input(grad_out, values, offsets, x.shape[-1]) if need_x
              else None)
    grad_values = (ops.diag_linear_grad_values(grad_out, x, values, offsets) if need_values
                   else None)
    grad_bias = _bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, None, grad_bias


def _fanin_setup_context(ctx, inputs, output):
    x, values, indices, _ = inputs
    ctx.save_for_backward(x, values, indices)


def _fanin_backward(ctx, grad_out):
    x, values, indices = ctx.saved_tensors
    need_x, need_values, _, need_bias = (*ctx.needs_input_grad, False)[:4]
    ops = torch.ops.sparsefx
    grad_x = (ops.fanin_linear_grad_input(grad_out, values, indices, x.shape[-1]) if need_x
              else None)
    grad_values = ops.fanin_linear_grad_values(grad_out, x, indices) if need_values else None
    grad_bias = _bias_grad(grad_out) if need_bias else None
    return grad_x, grad_values, None, grad_bias


# ----------------------------------------------------------------------- CPU kernels

_NATIVE = cpu.load_native() is not None
_BASE_CPU = "native" if _NATIVE else "torch"  # what _LIB registers for CPU tensors
_cpu_override: torch.library.Library | None = None  # another choice, registered over it
_cpu_choice = _BASE_CPU

if not _NATIVE:
    _register(_LIB, "torch", "CPU")
    torch.library.register_autograd("sparsefx::diag_linear", _diag_backward,
                                    setup_context=_diag_setup_context, lib=_LIB)
    torch.library.register_autograd("sparsefx::fanin_linear", _fanin_backward,
                                    setup_context=_fanin_setup_context, lib=_LIB)


def cpu_kernels() -> str:
    """Which kernels the ops run for CPU tensors now: ``"native"``, ``"torch"`` or
    ``"triton"``."""
    return _cpu_choice


def _select_cpu_kernels(name: str) -> None:
    global _cpu_override, _cpu_choice
    if name not in CPU_KERNELS:
        raise ValueError(f"CPU kernels {name!r}: expected one of {CPU_KERNELS}")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton CPU kernels run Triton on CPU tensors, which needs "
                         "TRITON_INTERPRET=1 set before triton is imported")
    if name == "native" and not _NATIVE:
        raise ValueError("the native CPU kernels failed to build (see the warning logged at "
                         "import): expected 'torch' or 'triton'")
    if name == _cpu_choice:
        return
    if _cpu_override is not None:
        _cpu_override._destroy()  # back to _LIB's CPU kernels
        _cpu_override = None
    if name != _BASE_CPU:
        _cpu_override = torch.library.Library("sparsefx", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            _register(_cpu_override, name, "CPU")
    _cpu_choice = name


@contextlib.contextmanager
def use_cpu_kernels(name: str) -> Iterator[None]:
    """Run the ops' CPU tensors on ``name``'s kernels inside the block: ``"native"`` (C++),
    ``"torch"`` (the PyTorch fallback) or ``"triton"`` (the Triton kernels under
    ``TRITON_INTERPRET=1``; tests only)."""
    previous = cpu_kernels()
    _select_cpu_kernels(name)
    try:
        yield
    finally:
        _select_cpu_kernels(previous)


_initial = os.environ.get("SPARSEFX_CPU_KERNELS", "native")
_select_cpu_kernels(_BASE_CPU if _initial == "native" else _initial)


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
