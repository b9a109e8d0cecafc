"""The ``torch.ops.sparsefx`` library that every pattern's ops join, and what they share.

A pattern's kernel package (``diag/``, ``fanin/``, ``blockdiag/``) holds its op schemas,
argument checks, fakes and FLOP formulas (``op.py``), its CPU kernels and autograd in C++
(``<pattern>_ops.cpp``, ``kernels.h``, ``checks.h``), its PyTorch fallback kernels
(``torch_kernels.py``) and its Triton kernels (``triton_kernels.py``). It hands them to
``define_ops``, which defines the schemas once for every backend and registers them by
device: CUDA tensors run the Python op functions with the pattern's Triton kernels; CPU
tensors run the C++ library built from every package's ``*.cpp`` (``native.py``), or, where
it cannot be built or ``use_cpu_kernels`` asks for it, the Python op functions with the
PyTorch kernels (or the Triton ones under ``TRITON_INTERPRET=1``, for tests): the choice is
``cpu_choice.py``'s.
Nothing is looked up by a name string: each op's Python function is bound to its own
pattern's kernels when it is registered.

fp16/bf16 are computed with fp32 accumulation on both devices.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["LIB", "PatternOps", "define_ops", "defined", "register", "GATHER_CHUNK"]

LIB = torch.library.Library("sparsefx", "FRAGMENT")

# The PyTorch fallback kernels chunk their gathers to at most this many elements.
GATHER_CHUNK = 1 << 22


# ---------------------------------------------------------------------- shared helpers


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_supported_device(op: str, name: str, x: Tensor) -> None:
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on {x.device}: expected cpu or cuda")


def leading(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


def features(x: Tensor) -> int:
    # a 0-d tensor has no feature dim; 0 lets the checks report it properly
    return x.shape[-1] if x.dim() else 0


def add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def bias_grad(grad_out: Tensor) -> Tensor:
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    return rows.sum(0, dtype=compute_dtype(grad_out.dtype)).to(grad_out.dtype)


# --------------------------------------------------------------------- kernel tables


class CudaKernels:
    """A pattern's CUDA kernels (its Triton kernels, imported on first use: Triton is only
    needed where they run), called on contiguous operands."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, kernel: str):  # first use of ``kernel`` only: then it is cached
        function = getattr(importlib.import_module(self._module), kernel)

        def run(*operands, **params):
            return function(*(t.contiguous() for t in operands), **params)
        setattr(self, kernel, run)
        return run


class TorchKernels:
    """A pattern's PyTorch kernels (its ``torch_kernels`` module): float operands upcast to
    fp32 (fp64 stays), the result in the first operand's dtype."""

    def __init__(self, module: ModuleType):
        self._module = module

    def __getattr__(self, kernel: str):  # first use of ``kernel`` only: then it is cached
        function = getattr(self._module, kernel)

        def run(*operands, **params):
            lead = operands[0]
            compute = compute_dtype(lead.dtype)
            if lead.dtype == compute:
                return function(*operands, **params)
            operands = [t.to(compute) if t.is_floating_point() else t for t in operands]
            return function(*operands, **params).to(lead.dtype)
        setattr(self, kernel, run)  # later calls find it without __getattr__
        return run


@dataclass
class PatternOps:
    """One pattern's ops, as its ``op.py`` declares them.

    ``schemas``: op name -> schema. ``functions``: op name -> its Python function, taking the
    pattern's kernels first (the op's CUDA path, and its CPU path without the native library).
    ``cuda``: the module path of the kernels CUDA tensors run (its Triton kernels), imported
    on first use; ``torch_kernels``: its PyTorch kernels. ``flops``: op name -> the position
    of the operand whose shape is the stored weights (2 FLOPs per stored weight per
    activation row of the first operand). ``fakes``: op name -> its fake (meta)
    implementation. ``autograd``: op name -> ``(backward, setup_context)``, used only where
    the native library (which has the C++ autograd) is missing."""

    schemas: dict[str, str]
    functions: dict[str, Callable]
    cuda: str
    torch_kernels: ModuleType
    flops: dict[str, int]
    fakes: dict[str, Callable]
    autograd: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)

    def __post_init__(self):
        # each backend's kernels: "triton" the CUDA ones, "torch" the PyTorch ones
        self.kernels = {"triton": CudaKernels(self.cuda),
                        "torch": TorchKernels(self.torch_kernels)}


_DEFINED: list[PatternOps] = []


def define_ops(ops: PatternOps) -> None:
    """Define ``ops``' schemas, register their fakes, CUDA kernels and FLOP formulas; their
    CPU kernels come with ``load_cpu_kernels``."""
    for schema in ops.schemas.values():
        LIB.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    for name, fake in ops.fakes.items():
        torch.library.register_fake(f"sparsefx::{name}", fake, lib=LIB)
    register(LIB, [ops], "triton", "CUDA")
    for name in ops.autograd:  # the forward ops: the gradient ops run on what they saved
        for device_type in ("cuda", "cpu"):
            _register_autocast(name, device_type)
    for name, stored_position in ops.flops.items():
        _register_flops(getattr(torch.ops.sparsefx, name), stored_position)
    _DEFINED.append(ops)


def register(lib: torch.library.Library, defined: list[PatternOps], backend: str,
              device: str) -> None:
    """Register every op's Python function with its pattern's ``backend`` kernels."""
    for ops in defined:
        kernels = ops.kernels[backend]
        for name, function in ops.functions.items():
            lib.impl(name, functools.partial(function, kernels), device)


def _register_autocast(name: str, device_type: str) -> None:
    """Under ``torch.autocast(device_type)`` the op computes in the autocast dtype, as
    ``F.linear`` does: its floating operands on that device are cast first (a dense layer
    before a sparse one hands it bf16 activations while its values are fp32)."""
    op = getattr(torch.ops.sparsefx, name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                and a.device.type == device_type else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)
    LIB.impl(name, kernel, key, with_keyset=True)


def _register_flops(op, stored_position: int) -> None:
    @register_flop_formula(op)
    def flops(*shapes, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(shapes[0][:-1]) * math.prod(shapes[stored_position])


def defined() -> list[PatternOps]:
    """Every pattern's ops defined so far, in the order they joined."""
    return list(_DEFINED)
