"""``sparsefx::growth_tap``: the dense-gradient growth scores of one layer, as a gradient.

RigL-style growth ranks the *inactive* weights of a layer by the magnitude of the dense
gradient ``G = grad_out.T @ x`` -- a matrix the sparse backward never forms. At update steps
a sparse layer passes its output through this op::

    y = torch.ops.sparsefx.growth_tap(y, x, probe, granularity)

Forward returns a copy of ``y``. Backward passes ``grad_out`` through to ``y`` unchanged and
returns, as the gradient of ``probe`` (a float32 leaf tensor owned by the DST manager), the
layer's scores reduced to what growth needs:

* ``granularity="diag"``:    ``probe [P]``, the L2 norm of ``G`` along each candidate diagonal;
* ``granularity="element"``: ``probe [out, in]``, ``|G|``.

``G`` is formed inside the backward of this one layer and freed once reduced, so the dense
gradient of the whole model never exists at once. Scores reach the manager through
``probe.grad``: the only route out of a ``torch.compile``d backward that needs neither hooks
nor a graph break.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import patterns

__all__ = ["growth_tap", "GRANULARITIES"]

GRANULARITIES = ("diag", "element")


def _check(y: Tensor, x: Tensor, probe: Tensor, granularity: str) -> None:
    op = "sparsefx.growth_tap"
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity={granularity!r}: expected one of {GRANULARITIES}")
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: y has shape {tuple(y.shape)} and x {tuple(x.shape)}: expected "
                         "the same leading dims")
    if probe.dtype != torch.float32:
        raise TypeError(f"{op}: probe has dtype {probe.dtype}: expected torch.float32")
    out_features, in_features = y.shape[-1], x.shape[-1]
    if granularity == "diag":
        expected = (patterns.diag_geometry(out_features, in_features)[0],)
    else:
        expected = (out_features, in_features)
    if tuple(probe.shape) != expected:
        raise ValueError(f"{op}: probe has shape {tuple(probe.shape)}: expected {expected} for "
                         f"granularity {granularity!r} of a ({out_features}, {in_features}) "
                         "layer")


@torch.library.custom_op("sparsefx::growth_tap", mutates_args=())
def growth_tap(y: Tensor, x: Tensor, probe: Tensor, granularity: str) -> Tensor:
    """``y`` (copied); its backward leaves the growth scores in ``probe``'s gradient."""
    _check(y, x, probe, granularity)
    return y.clone()


@growth_tap.register_fake
def _(y, x, probe, granularity):
    _check(y, x, probe, granularity)
    return torch.empty_like(y)


def growth_scores(grad_out: Tensor, x: Tensor, granularity: str) -> Tensor:
    """The float32 scores ``growth_tap`` hands back: see the module docstring."""
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x_rows = x.reshape(-1, x.shape[-1]).float()
    dense_grad = grad_rows.T @ x_rows
    if granularity == "diag":
        return patterns.diag_norms(dense_grad)
    return dense_grad.abs_()


def _setup_context(ctx, inputs, output):
    _, x, _, granularity = inputs
    ctx.save_for_backward(x)
    ctx.granularity = granularity


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    scores = growth_scores(grad_out, x, ctx.granularity) if ctx.needs_input_grad[2] else None
    return grad_out, None, scores, None


growth_tap.register_autograd(_backward, setup_context=_setup_context)
