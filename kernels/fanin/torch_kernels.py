"""The fan-in ops' PyTorch kernels: the arithmetic of the C++ ones (``kernels.h``) in
chunked PyTorch gathers, for where no compiler is available or ``SPARSEFX_CPU_KERNELS=torch``
asks for them. They compute in float32 (float64 stays float64); the caller upcasts fp16/bf16
and casts the result back. Activations come in as 2-D ``[rows, features]``.
"""
from __future__ import annotations

import torch

from .._library import GATHER_CHUNK

__all__ = ["fanin_forward", "fanin_input_grad", "fanin_values_grad"]

def fanin_forward(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``y[:, o] = sum_j values[o, j] * x[:, indices[o, j]]``."""
    out, fan_in = values.shape
    step = max(1, GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bok,ok->bo", x[:, indices[o0:o0 + step].to(torch.int64)],
                           values[o0:o0 + step]) for o0 in range(0, out, step)]
    return torch.cat(chunks, dim=1) if chunks else x.new_zeros(x.shape[0], 0)


def fanin_input_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``dx[:, c] = sum over (o, j) with indices[o, j] == c of values[o, j] * grad_out[:, o]``."""
    out, fan_in = values.shape
    rows = grad_out.shape[0]
    grad_x = grad_out.new_zeros(rows, in_features)
    step = max(1, GATHER_CHUNK // max(1, rows * fan_in))
    for o0 in range(0, out, step):
        contributions = grad_out[:, o0:o0 + step, None] * values[None, o0:o0 + step]
        columns = indices[o0:o0 + step].to(torch.int64).reshape(1, -1).expand(rows, -1)
        grad_x.scatter_add_(1, columns, contributions.reshape(rows, columns.shape[1]))
    return grad_x


def fanin_values_grad(grad_out: torch.Tensor, x: torch.Tensor,
                      indices: torch.Tensor) -> torch.Tensor:
    """``grad[o, j] = sum_rows grad_out[:, o] * x[:, indices[o, j]]``."""
    out, fan_in = indices.shape
    step = max(1, GATHER_CHUNK // max(1, x.shape[0] * fan_in))
    chunks = [torch.einsum("bo,bok->ok", grad_out[:, o0:o0 + step],
                           x[:, indices[o0:o0 + step].to(torch.int64)])
              for o0 in range(0, out, step)]
    return torch.cat(chunks) if chunks else x.new_zeros(0, fan_in)
