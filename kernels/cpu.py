"""CPU kernels for the diagonal and fan-in ops, and the loader of the native ones.

* native -- ``csrc/``: the ops' CPU kernels, argument checks and autograd in C++, registered
  with the dispatcher when the library loads (``load_native``). Built with the system
  compiler on first import (about a minute, logged), then cached by
  ``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``. The fastest by measurement
  (``benchmarks/bench.py``): they read only the stored values and structure, and a call
  runs no Python.
* torch -- the functions below: the same arithmetic in chunked PyTorch gathers, which
  ``ops.py`` registers where no compiler is available or when
  ``SPARSEFX_CPU_KERNELS=torch`` asks for it.

The functions below compute in float32 (float64 stays float64); the caller upcasts
fp16/bf16 and casts the result back. Activations come in as 2-D ``[rows, features]``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

__all__ = ["load_native", "diag_apply", "diag_values_grad", "fanin_forward",
           "fanin_input_grad", "fanin_values_grad"]

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent / "csrc"
_NATIVE_FLAGS = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in
                                       ("x86_64", "AMD64") else [])
# Gathers in the torch implementation are chunked to at most this many elements.
_GATHER_CHUNK = 1 << 22


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU model and its instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({line for line in lines if line.startswith(wanted)}))


@functools.cache
def load_native() -> str | None:
    """Build (once per machine, cached on disk) and load the C++ ops library; its path, or
    ``None`` if that fails (then ``ops.py`` registers the PyTorch kernels instead)."""
    from torch.utils import cpp_extension

    # The name carries the sources, the flags and the CPU, so a changed kernel or a cache
    # shared with another machine never loads a stale or foreign build.
    digest = hashlib.sha1()
    for source in sorted(_SOURCES.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join(_NATIVE_FLAGS + [_cpu_signature(), platform.machine(),
                                            torch.__version__]).encode())
    name = f"sparsefx_ops_{digest.hexdigest()[:12]}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = (build_dir / f"{name}.so").exists()
    if not built:
        logger.warning("sparsefx: building the native CPU kernels in %s (first use with this "
                       "source and CPU; about a minute)", build_dir)
    started = time.perf_counter()
    try:
        path = cpp_extension.load(name=name, sources=[str(_SOURCES / "ops.cpp")],
                                  extra_cflags=_NATIVE_FLAGS, extra_ldflags=["-fopenmp"],
                                  is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: fall back, loudly
        logger.warning("sparsefx: building the native CPU kernels failed (%s); using the slower "
                       "PyTorch fallback. Set SPARSEFX_CPU_KERNELS=torch to silence this.", error)
        return None
    if not built:
        logger.warning("sparsefx: native CPU kernels built in %.0f s",
                       time.perf_counter() - started)
    return path


# ------------------------------------------------------------------------- diag kernels


def diag_apply(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mod: int,
               gather: bool) -> torch.Tensor:
    """Apply the diagonals to the rows of ``x``.

    gather:  ``y[:, p] = sum_k values[k, p] * x[:, (p + offsets[k]) % mod]`` for ``p < L``;
    scatter: ``y[:, p] = sum_k values[k, s] * x[:, s]`` with ``s = (p - offsets[k]) % mod``,
    terms with ``s >= L`` dropped, for ``p < mod``.
    """
    length = values.shape[1]
    y = x.new_zeros(x.shape[0], length if gather else mod)
    positions = torch.arange(y.shape[1], device=x.device)
    offsets = offsets.to(torch.int64)
    step = max(1, _GATHER_CHUNK // max(1, x.shape[0] * y.shape[1]))
    for k0 in range(0, offsets.numel(), step):
        chunk = offsets[k0:k0 + step, None]
        if gather:
            source = (positions[None, :] + chunk) % mod
            weights = values[k0:k0 + step]
        else:
            source = (positions[None, :] - chunk) % mod
            on_diagonal = source < length
            source = torch.where(on_diagonal, source, 0)
            weights = values[k0:k0 + step].gather(1, source) * on_diagonal
        y += (x[:, source] * weights).sum(1)
    return y


def diag_values_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                     mod: int) -> torch.Tensor:
    """``grad[k, t] = sum_rows a[:, t] * b[:, (t + offsets[k]) % mod]``; ``a`` is ``[rows, L]``."""
    length = a.shape[1]
    positions = torch.arange(length, device=a.device)
    offsets = offsets.to(torch.int64)
    step = max(1, _GATHER_CHUNK // max(1, a.shape[0] * length))
    chunks = [(a[:, None, :] * b[:, (positions[None, :] + offsets[k0:k0 + step, None]) % mod]
               ).sum(0) for k0 in range(0, offsets.numel(), step)]
    return torch.cat(chunks) if chunks else a.new_zeros(0, length)


# ------------------------------------------------------------------------ fanin kernels


def fanin_forward(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``y[:, o] = sum_j values[o, j] * x[:, indices[o, j]]``."""
    out, fan_in = values.shape
    step = max(1, _GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bok,ok->bo", x[:, indices[o0:o0 + step].to(torch.int64)],
                           values[o0:o0 + step]) for o0 in range(0, out, step)]
    return torch.cat(chunks, dim=1) if chunks else x.new_zeros(x.shape[0], 0)


def fanin_input_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``dx[:, c] = sum over (o, j) with indices[o, j] == c of values[o, j] * grad_out[:, o]``."""
    out, fan_in = values.shape
    rows = grad_out.shape[0]
    grad_x = grad_out.new_zeros(rows, in_features)
    step = max(1, _GATHER_CHUNK // max(1, rows * fan_in))
    for o0 in range(0, out, step):
        contributions = grad_out[:, o0:o0 + step, None] * values[None, o0:o0 + step]
        columns = indices[o0:o0 + step].to(torch.int64).reshape(1, -1).expand(rows, -1)
        grad_x.scatter_add_(1, columns, contributions.reshape(rows, columns.shape[1]))
    return grad_x


def fanin_values_grad(grad_out: torch.Tensor, x: torch.Tensor,
                      indices: torch.Tensor) -> torch.Tensor:
    """``grad[o, j] = sum_rows grad_out[:, o] * x[:, indices[o, j]]``."""
    out, fan_in = indices.shape
    step = max(1, _GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bo,bok->ok", grad_out[:, o0:o0 + step],
                           x[:, indices[o0:o0 + step].to(torch.int64)])
              for o0 in range(0, out, step)]
    return torch.cat(chunks) if chunks else x.new_zeros(0, fan_in)

