"""The diagonal ops' PyTorch kernels: the arithmetic of the C++ ones (``kernels.h``) in
chunked PyTorch gathers, for where no compiler is available or ``SPARSEFX_CPU_KERNELS=torch``
asks for them. They compute in float32 (float64 stays float64); the caller upcasts fp16/bf16
and casts the result back. Activations come in as 2-D ``[rows, features]``.
"""
from __future__ import annotations

import torch

from .._library import GATHER_CHUNK

__all__ = ["diag_apply", "diag_values_grad"]

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
    step = max(1, GATHER_CHUNK // max(1, x.shape[0] * y.shape[1]))
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
    step = max(1, GATHER_CHUNK // max(1, a.shape[0] * length))
    chunks = [(a[:, None, :] * b[:, (positions[None, :] + offsets[k0:k0 + step, None]) % mod]
               ).sum(0) for k0 in range(0, offsets.numel(), step)]
    return torch.cat(chunks) if chunks else a.new_zeros(0, length)
