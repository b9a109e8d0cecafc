"""CPU kernels for the diagonal and fan-in ops.

Two implementations of the same four functions:

* ``native`` -- the C++ kernels of ``csrc/sparse_linear_cpu.cpp``, built with the system
  compiler the first time a CPU op runs (about a minute, then cached by
  ``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``). The fastest by measurement
  (``benchmarks/bench_ops_cpu.py``): they read only the stored values and structure.
* ``torch`` -- the same arithmetic in chunked PyTorch gathers, used where no compiler is
  available or when ``SPARSEFX_CPU_KERNELS=torch`` asks for it.

Both compute in float32 (float64 stays float64); fp16/bf16 inputs are upcast and the result
cast back by the caller. Activations come in as 2-D ``[rows, features]``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

__all__ = ["backend_name", "load_native", "diag_apply", "diag_values_grad",
           "fanin_forward", "fanin_input_grad", "fanin_values_grad"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "sparse_linear_cpu.cpp"
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
def load_native():
    """Build (once, cached on disk) and import the C++ kernels; ``None`` if that fails."""
    from torch.utils import cpp_extension

    # The name carries the source, the flags and the CPU, so a changed kernel or a cache
    # shared with another machine never loads a stale or foreign build.
    digest = hashlib.sha1(_SOURCE.read_bytes())
    digest.update(" ".join(_NATIVE_FLAGS + [_cpu_signature(), platform.machine(),
                                            torch.__version__]).encode())
    name = f"sparsefx_cpu_{digest.hexdigest()[:12]}"
    try:
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_NATIVE_FLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: fall back, loudly
        logger.warning("sparsefx: building the native CPU kernels failed (%s); using the slower "
                       "PyTorch fallback. Set SPARSEFX_CPU_KERNELS=torch to silence this.", error)
        return None


def backend_name() -> str:
    """Which kernels the ops use for CPU tensors now: ``"native"``, ``"torch"``, or
    ``"triton"`` (the Triton kernels under the interpreter, for tests only)."""
    choice = os.environ.get("SPARSEFX_CPU_KERNELS", "native")
    if choice not in ("native", "torch", "triton"):
        raise ValueError(f"SPARSEFX_CPU_KERNELS={choice!r}: expected 'native', 'torch' or "
                         "'triton'")
    if choice == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("SPARSEFX_CPU_KERNELS=triton runs Triton on CPU tensors, which needs "
                         "TRITON_INTERPRET=1 set before triton is imported")
    if choice == "native" and load_native() is None:
        return "torch"
    return choice


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
    if backend_name() == "native":
        load_native().diag_apply_(x.contiguous(), values.contiguous(),
                                  offsets.to(torch.int64).contiguous(), y, mod, gather)
        return y
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
    if backend_name() == "native":
        return load_native().diag_values_grad(a.contiguous(), b.contiguous(),
                                              offsets.to(torch.int64).contiguous(), mod)
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
    if backend_name() == "native":
        return load_native().fanin_forward(x.t().contiguous(), values.contiguous(),
                                           _native_indices(indices)).t().contiguous()
    out, fan_in = values.shape
    step = max(1, _GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bok,ok->bo", x[:, indices[o0:o0 + step].to(torch.int64)],
                           values[o0:o0 + step]) for o0 in range(0, out, step)]
    return torch.cat(chunks, dim=1) if chunks else x.new_zeros(x.shape[0], 0)


def fanin_input_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``dx[:, c] = sum over (o, j) with indices[o, j] == c of values[o, j] * grad_out[:, o]``."""
    if backend_name() == "native":
        grad_xt = load_native().fanin_input_grad(grad_out.t().contiguous(), values.contiguous(),
                                                 _native_indices(indices), in_features)
        return grad_xt.t().contiguous()
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
    if backend_name() == "native":
        return load_native().fanin_values_grad(grad_out.t().contiguous(), x.t().contiguous(),
                                               _native_indices(indices))
    out, fan_in = indices.shape
    step = max(1, _GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bo,bok->ok", grad_out[:, o0:o0 + step],
                           x[:, indices[o0:o0 + step].to(torch.int64)])
              for o0 in range(0, out, step)]
    return torch.cat(chunks) if chunks else x.new_zeros(0, fan_in)


def _native_indices(indices: torch.Tensor) -> torch.Tensor:
    # the C++ kernels read int16, int32 and int64 directly; other ids are converted per call
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        indices = indices.to(torch.int32)
    return indices.contiguous()
