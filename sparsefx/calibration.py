"""Calibrated one-shot sparsification: ``sparsefx.transform(model, pattern, sparsity,
init="wanda" | "sparsegpt", calibration=batches)``.

While calibration runs, every chosen site is a ``Calibrating`` module: the dense linear it
was (the same weight and bias), which records what its inputs tell. Then each becomes its
pattern's layer, built from those records:

``wanda``      Score ``|W_ij| * ||X_j||_2`` (``X``: the layer's calibration inputs, one row
               per token) and keep the structure whose units (diagonals, cosets, row entries,
               N:M groups' entries, elements) hold the largest summed score. One pass over
               the calibration, every layer recording its input column norms (``in`` numbers
               each), on the dense model.
``sparsegpt``  Layer by layer in the order the forward reaches them, each on the inputs the
               already-sparsified layers before it give: the Hessian ``H = X^T X / n``,
               damped by ``DAMPING`` times its mean diagonal; the structure of largest summed
               saliency ``W_ij^2 / [H^-1]_jj`` (the error of removing one weight, OBS); then
               each output row's kept values by least squares, ``(H_SS) w_S = H_S: w``
               (``S`` its kept inputs, ``w`` its dense row): the kept values that best
               reproduce the dense row's outputs on the calibration inputs, drawn towards
               the dense values by the damping. One layer's Hessian at a time; the pass for a
               layer stops once that layer has seen its input.

``calibration`` is an iterable of model inputs (a tensor, a tuple of positional arguments,
or a dict of keyword arguments as Hugging Face models take), read once per pass (so a
list, not a generator, for ``sparsegpt``: it is materialised first), or a callable
``calibration(model)`` that runs the model over its data (a whole pass each call). The
model runs in ``eval()`` under ``torch.no_grad()``; nothing holds its activations.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsefx.kernels.patterns import owl_densities

__all__ = ["INITS", "DAMPING", "OWL_THRESHOLD", "OWL_SPREAD", "Calibrating", "Calibration",
           "calibrate", "wanda_scores", "sparsegpt_saliency", "damped_hessian",
           "least_squares_rows", "outlier_ratio", "spread_by_outliers"]

INITS = ("wanda", "sparsegpt")
DAMPING = 0.01  # SparseGPT's: a hundredth of the mean diagonal of H
# distribution="owl" (OWL, Yin et al. 2024): a weight is an outlier when its Wanda score is
# over OWL_THRESHOLD times its layer's mean; densities spread by +-OWL_SPREAD
OWL_THRESHOLD, OWL_SPREAD = 5.0, 0.08


class _Stop(Exception):
    """Raised by the layer being calibrated once it has its input: the rest of the forward
    is not needed."""


class Calibrating(nn.Module):
    """A chosen site during calibration: ``F.linear`` with the site's own ``weight`` and
    ``bias``, recording its inputs' column norms (``record="norms"``) or Hessian
    (``"hessian"``). ``build(weight, bias, scores)`` makes the sparse layer afterwards."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 build: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], nn.Module]):
        super().__init__()
        self.name, self.build = name, build
        self.weight, self.bias = weight, bias  # the dense model's tensors: no copy
        self.record: str | None = None
        self.stop = False          # raise _Stop after recording (a pass for this layer only)
        self.rows = 0              # input rows (tokens) seen
        self.statistic: torch.Tensor | None = None
        self.calls = 0             # forward calls seen
        self.order = -1            # when the forward first reached it (while clocked)
        self._clock: list[int] | None = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.order < 0 and self._clock is not None:
            self.order = self._clock[0]
            self._clock[0] += 1
        if self.record is not None:
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            if self.record == "norms":
                update = rows.square().sum(0).double()
            else:  # float32 products, summed over batches in float64
                update = (rows.T @ rows).double()
            self.statistic = update if self.statistic is None else self.statistic + update
            self.rows += rows.shape[0]
            if self.stop:
                raise _Stop
        return F.linear(x, self.weight, self.bias if bias is None else bias)

    def release(self) -> None:
        """Let go of the dense weight (its sparse layer holds what it needs): a model's
        dense weights are freed one layer at a time as their layers are built."""
        self.weight = self.bias = self.statistic = None

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"{self.name}: calibrating, weight {shape}"


class Calibration:
    """The user's ``calibration`` as passes over a model (see the module docstring)."""

    def __init__(self, calibration, where: str = "sparsefx.transform"):
        self.where = where
        if calibration is None:
            raise ValueError(f"{where}: init needs calibration=: expected an iterable of model "
                             "inputs (tensors, tuples, or dicts of keyword arguments) or a "
                             "callable that runs the model")
        if callable(calibration) and not isinstance(calibration, nn.Module):
            self.run_model, self.batches = calibration, None
            return
        if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration,
                                                                            Iterable):
            raise TypeError(f"{where}: calibration is a {type(calibration).__name__}: "
                            "expected an iterable of model inputs (a list of tensors, "
                            "tuples or dicts) or a callable that runs the model")
        self.run_model, self.batches = None, list(calibration)
        if not self.batches:
            raise ValueError(f"{where}: calibration is empty: expected at least one batch of "
                             "model inputs")

    @property
    def stops_early(self) -> bool:
        """Whether a pass can stop at the layer it is for (not inside a user's callable)."""
        return self.batches is not None

    def passes(self, count: int, progress: bool | None) -> Iterable[int]:
        shown = sys.stderr.isatty() if progress is None else progress
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            return range(count)
        return tqdm(range(count), desc="sparsefx calibration", disable=not shown or count < 2)

    @torch.no_grad()
    def run(self, model: nn.Module) -> None:
        """One pass over the calibration."""
        if self.run_model is not None:
            try:
                self.run_model(model)
            except _Stop:
                raise RuntimeError(f"{self.where}: the calibration callable ended early")
            return
        for number, batch in enumerate(self.batches):
            try:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
            except _Stop:
                continue
            except Exception as error:
                raise ValueError(f"{self.where}: calibration batch {number}: the model "
                                 f"raised {type(error).__name__}: {error}. Expected inputs "
                                 "the model takes (a tensor, a tuple of arguments, or a "
                                 "dict of keyword arguments)") from error


def wanda_scores(weight: torch.Tensor, square_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` from the inputs' summed squares per column."""
    return weight.detach().double().abs() * square_norms.clamp(min=0).sqrt()[None, :]


def damped_hessian(sum_of_outer: torch.Tensor, rows: int,
                   damping: float = DAMPING) -> torch.Tensor:
    """``X^T X / n + damping * mean(diag) * I`` (``I`` alone where no input was nonzero)."""
    hessian = sum_of_outer / max(rows, 1)
    mean = float(hessian.diagonal().mean())
    shift = damping * mean if mean > 0 else 1.0
    return hessian + shift * torch.eye(hessian.shape[0], dtype=hessian.dtype,
                                       device=hessian.device)


def sparsegpt_saliency(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``W_ij^2 / [H^-1]_jj`` for a damped (positive definite) ``hessian``."""
    inverse_diagonal = torch.cholesky_inverse(torch.linalg.cholesky(hessian)).diagonal()
    return weight.detach().double().square() / inverse_diagonal[None, :]


@torch.no_grad()
def least_squares_rows(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor,
                       budget_bytes: int = 1 << 26) -> torch.Tensor:
    """``[out, in]`` float64: each row ``i`` solves ``(H_SS) w_S = H_S: w_i`` on its kept
    inputs ``S = kept[i]`` (zeros elsewhere): the kept values whose outputs on the
    calibration inputs come closest to the dense row's. Rows a block at a time, padded to
    the block's largest count (a padded slot solves ``1 * w = 0``), within
    ``budget_bytes`` of systems."""
    weight = weight.detach().double()
    out_features, in_features = weight.shape
    products = weight @ hessian            # row i: H w_i (H symmetric)
    counts = kept.sum(1)
    result = torch.zeros_like(weight)
    most = max(int(counts.max()), 1) if out_features else 1
    block = max(1, budget_bytes // (8 * most * most))
    order = torch.arange(in_features, device=kept.device)
    for start in range(0, out_features, block):
        rows = slice(start, min(start + block, out_features))
        width = max(int(counts[rows].max()), 1)
        # each row's kept column ids first, ascending; then padding
        keys = torch.where(kept[rows], order, in_features + order)
        ids = keys.sort(dim=1).values[:, :width]
        valid = ids < in_features
        ids = torch.where(valid, ids, 0)
        systems = hessian[ids[:, :, None], ids[:, None, :]]
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(width, dtype=systems.dtype, device=systems.device)
        systems = torch.where(pair, systems, eye)
        right = torch.where(valid, products[rows].gather(1, ids), 0.0)
        # principal blocks of a damped Hessian (and identity padding): positive definite.
        # Cholesky, not LU: MKL's batched LU (getrs) fails after torch.set_num_threads
        factor = torch.linalg.cholesky(systems)
        solved = torch.cholesky_solve(right[..., None], factor)[..., 0]
        # padding adds zeros (at column 0, which a row may also keep)
        result[rows].scatter_add_(1, ids, torch.where(valid, solved, 0.0))
    return result


def _swap(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    if not name:
        return layer
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, init: str, calibration: Calibration,
              progress: bool | None = None) -> nn.Module:
    """``model`` (holding ``Calibrating`` sites) with each site replaced by its sparse layer,
    built as ``init`` says from the calibration; returns the model (a new object only if the
    model was one site)."""
    sites = [(name, module) for name, module in model.named_modules()
             if isinstance(module, Calibrating)]
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        clock = [0]
        for _, site in sites:
            site._clock = clock
        if init == "wanda":
            if any(site.statistic is None for _, site in sites):  # not measured for OWL
                for _, site in sites:
                    site.record = "norms"
                calibration.run(model)
                _check_reached(sites, calibration.where)
            for name, site in sites:
                layer = site.build(site.weight, site.bias,
                                   wanda_scores(site.weight, site.statistic))
                model = _swap(model, name, layer)
                site.release()
            return model
        for _, site in sites:  # what an OWL pass measured is not a Hessian
            site.record, site.statistic, site.rows = None, None, 0
        calibration.run(model)  # the order the forward reaches the layers in
        _check_reached(sites, calibration.where)
        sites.sort(key=lambda item: item[1].order)
        for number in calibration.passes(len(sites), progress):
            name, site = sites[number]
            site.record, site.stop = "hessian", calibration.stops_early
            calibration.run(model)
            hessian = damped_hessian(site.statistic, site.rows)
            site.statistic = None
            layer = site.build(site.weight, site.bias,
                               sparsegpt_saliency(site.weight, hessian))
            solved = least_squares_rows(site.weight, hessian, layer.kept_mask())
            del hessian
            layer.param.copy_(layer.values_from_dense(solved.to(site.weight.dtype)))
            del solved
            model = _swap(model, name, layer)
            site.release()
        return model
    finally:
        for module, mode in training.items():
            module.train(mode)
        for _, site in sites:
            site._clock = None


def outlier_ratio(scores: torch.Tensor, threshold: float = OWL_THRESHOLD) -> float:
    """The fraction of ``scores`` over ``threshold`` times their mean (OWL's outliers)."""
    return float((scores > threshold * scores.mean()).double().mean())


@torch.no_grad()
def spread_by_outliers(model: nn.Module, calibration: Calibration, decisions: list,
                       sparsity: float) -> dict[str, float]:
    """OWL: one pass recording every ``Calibrating`` site's input norms (kept for Wanda),
    then each of ``decisions`` (``passes.allocate.Decision``s of those sites) gets the
    sparsity ``patterns.owl_densities`` gives it from its Wanda outlier ratio; returns the
    ratios by layer."""
    sites = {name: module for name, module in model.named_modules()
             if isinstance(module, Calibrating)}
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for site in sites.values():
            site.record = "norms"
        calibration.run(model)
    finally:
        for module, mode in training.items():
            module.train(mode)
        for site in sites.values():
            site.record = None
    _check_reached(list(sites.items()), calibration.where)
    ratios = {decision.site.name: outlier_ratio(wanda_scores(
        sites[decision.site.name].weight, sites[decision.site.name].statistic))
        for decision in decisions}
    densities = owl_densities([d.site.out_features * d.site.in_features for d in decisions],
                              [ratios[d.site.name] for d in decisions], sparsity, OWL_SPREAD)
    for decision, density in zip(decisions, densities, strict=True):
        decision.sparsity = 1.0 - density
    return ratios


def _check_reached(sites, where: str) -> None:
    missed = [name or "(the model)" for name, site in sites if site.calls == 0]
    if len(missed) == len(sites):
        raise ValueError(f"{where}: the calibration reached no layer to be made sparse "
                         f"({', '.join(missed[:8])}{', ...' if len(missed) > 8 else ''}): "
                         "expected inputs whose forward goes through them")
    if missed:
        raise ValueError(f"{where}: the calibration never reached layers {missed[:8]}"
                         f"{' ...' if len(missed) > 8 else ''}: their inputs are unknown "
                         "(exclude them, or calibrate on inputs that use them)")
