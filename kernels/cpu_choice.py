"""Which kernels the ops run for CPU tensors: the native library where it built (the
default), the PyTorch fallback, or the Triton kernels under the interpreter (tests), chosen
by ``SPARSEFX_CPU_KERNELS`` at import and by ``use_cpu_kernels`` after."""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from ._library import LIB, defined, register
from .native import load_native

__all__ = ["CPU_KERNELS", "load_cpu_kernels", "cpu_kernels", "use_cpu_kernels"]

CPU_KERNELS = ("native", "torch", "triton")

_native = False
_native_skipped: str | None = None  # SPARSEFX_CPU_KERNELS at import, where not built
_base_cpu = "torch"  # what LIB registers for CPU tensors
_cpu_override: torch.library.Library | None = None  # another choice, registered over it
_cpu_choice = "torch"


def load_cpu_kernels() -> None:
    """Once every pattern's ops are defined: load the native library (its CPU kernels and
    autograd), or register the PyTorch kernels and the Python autograd in its place; then
    apply ``SPARSEFX_CPU_KERNELS``."""
    global _native, _base_cpu, _cpu_choice, _native_skipped
    initial = os.environ.get("SPARSEFX_CPU_KERNELS", "native")
    # Kernels other than the native ones asked for at import: nothing is built (a GPU run or
    # a machine without a compiler pays no build), and "native" is refused later.
    _native_skipped = initial if initial in ("torch", "triton") else None
    _native = _native_skipped is None and load_native() is not None
    _base_cpu = _cpu_choice = "native" if _native else "torch"
    if not _native:
        register(LIB, defined(), "torch", "CPU")
        for ops in defined():
            for name, (backward, setup_context) in ops.autograd.items():
                torch.library.register_autograd(f"sparsefx::{name}", backward,
                                                setup_context=setup_context, lib=LIB)
    _select_cpu_kernels(_base_cpu if initial == "native" else initial)


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
    if name == "triton":
        from .triton_runtime import interpreter_problem
        if (problem := interpreter_problem()) is not None:
            raise ValueError(f"the triton CPU kernels cannot run here: {problem}")
    if name == "native" and _native_skipped is not None:
        raise ValueError(f"the native CPU kernels were not built: SPARSEFX_CPU_KERNELS="
                         f"{_native_skipped!r} was set when sparsefx "
                         "was imported (unset it to build them): expected 'torch' or 'triton'")
    if name == "native" and not _native:
        raise ValueError("the native CPU kernels failed to build (see the warning logged at "
                         "import): expected 'torch' or 'triton'")
    if name == _cpu_choice:
        return
    if _cpu_override is not None:
        _cpu_override._destroy()  # back to LIB's CPU kernels
        _cpu_override = None
    if name != _base_cpu:
        _cpu_override = torch.library.Library("sparsefx", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            register(_cpu_override, defined(), name, "CPU")
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
