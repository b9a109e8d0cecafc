"""Calibrated one-shot init (``transform(init="wanda" | "sparsegpt", calibration=...)``):
the structure chosen maximises the stated score over every structure of the pattern
(brute force on small layers), the reconstruction is the damped least-squares solution on
the inputs each layer sees (the sparsified layers before it included), and bad calibrations
are refused with the user's model untouched."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx import calibration
from sparsefx.layers import BlockDiagLinear, DiagLinear, FanInLinear, MaskedLinear

# ----------------------------------------------------------------- every structure, by hand


def _diag_mask(offsets, out_features, in_features):
    """Wrap-around diagonals: ``d`` holds ``(t + d mod out, t)`` when out >= in, else
    ``(t, t + d mod in)``."""
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for d in offsets:
        for t in range(min(out_features, in_features)):
            if out_features >= in_features:
                mask[(t + d) % out_features, t] = True
            else:
                mask[t, (t + d) % in_features] = True
    return mask


def _every_structure(pattern, out_features, in_features, **structure):
    """Every mask the pattern allows at the layer's kept count."""
    if pattern in ("diag", "blockdiag"):
        layer = sparsefx.registry.build_layer(pattern, torch.ones(out_features, in_features),
                                              None, **structure)
        kept, candidates = layer.offsets.numel(), max(out_features, in_features)
        if pattern == "diag":
            for offsets in itertools.combinations(range(candidates), kept):
                yield _diag_mask(offsets, out_features, in_features)
        else:
            g = layer.groups
            for cosets in itertools.combinations(range(g), kept * g // candidates):
                yield _diag_mask([r + step for r in cosets for step in range(0, candidates, g)],
                                 out_features, in_features)
    elif pattern == "fanin":
        k = sparsefx.kernels.patterns.fanin_num_kept(in_features, structure["sparsity"])
        rows = list(itertools.combinations(range(in_features), k))
        for choice in itertools.product(rows, repeat=out_features):
            mask = torch.zeros(out_features, in_features, dtype=torch.bool)
            for row, columns in enumerate(choice):
                mask[row, list(columns)] = True
            yield mask
    elif pattern == "nm":
        n, m = structure["nm"]
        groups = list(itertools.combinations(range(m), n))
        cells = out_features * (in_features // m)
        for choice in itertools.product(groups, repeat=cells):
            mask = torch.zeros(out_features, in_features, dtype=torch.bool)
            for cell, within in enumerate(choice):
                row, group = divmod(cell, in_features // m)
                mask[row, [group * m + w for w in within]] = True
            yield mask
    else:
        total = out_features * in_features
        k = sparsefx.kernels.patterns.unstructured_num_kept(total, structure["sparsity"])
        for kept in itertools.combinations(range(total), k):
            mask = torch.zeros(total, dtype=torch.bool)
            mask[list(kept)] = True
            yield mask.view(out_features, in_features)


SMALL = [("diag", (6, 4), dict(sparsity=0.5)), ("diag", (4, 7), dict(sparsity=0.6)),
         ("blockdiag", (8, 8), dict(sparsity=0.5, groups=4)),
         ("fanin", (2, 5), dict(sparsity=0.6)), ("nm", (2, 8), dict(nm=(2, 4))),
         ("unstructured", (3, 4), dict(sparsity=0.5))]
LAYERS = {"diag": DiagLinear, "blockdiag": BlockDiagLinear, "fanin": FanInLinear,
          "nm": FanInLinear, "unstructured": MaskedLinear}


@pytest.mark.parametrize("pattern,shape,structure", SMALL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_scores_keeps_the_structure_of_largest_summed_score(pattern, shape, structure,
                                                                 seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    scores = torch.rand(shape, generator=generator, dtype=torch.float64)
    layer = LAYERS[pattern].from_scores(weight, None, scores, **structure)
    best = max(float(scores[mask].sum())
               for mask in _every_structure(pattern, *shape, **structure))
    assert float(scores[layer.kept_mask()].sum()) == pytest.approx(best, rel=1e-6)
    # the values are the weight's, on the structure
    assert torch.equal(layer.dense_weight(), weight * layer.kept_mask())


# ------------------------------------------------------------------------- through transform


def _mlp(seed=0, widths=(12, 16, 8)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.GELU(),
                         nn.Linear(widths[1], widths[2]))


def _batches(count=3, rows=20, features=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=generator)  # correlated inputs
    return [torch.randn(rows, features, generator=generator) @ mix for _ in range(count)]


def _inputs_of(model, batches, name):
    """Every input row ``model.<name>`` sees over ``batches``."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("pattern,structure", [("diag", dict(sparsity=0.5)),
                                               ("fanin", dict(sparsity=0.5)),
                                               ("nm", dict(nm=(2, 4))),
                                               ("unstructured", dict(sparsity=0.5))])
def test_wanda_scores_each_layer_by_its_dense_inputs(pattern, structure):
    model, batches = _mlp(), _batches()
    nm = structure.get("nm", (2, 4))
    sparse = sparsefx.transform(model, pattern, structure.get("sparsity", 0.9), nm=nm,
                                init="wanda", calibration=batches)
    for name in ("0", "2"):
        dense = model.get_submodule(name).weight.detach().double()
        inputs = _inputs_of(model, batches, name)  # the dense model's: Wanda is one pass
        expected = calibration.wanda_scores(dense, inputs.square().sum(0))
        layer = sparse.get_submodule(name)
        reference = LAYERS[pattern].from_scores(dense, None, expected, **structure)
        assert torch.equal(layer.kept_mask(), reference.kept_mask()), name
        assert torch.equal(layer.dense_weight(), (dense * layer.kept_mask()).float())


def _damped_least_squares(inputs, dense_row, kept):
    """``min ||X_S w_S - X w||^2 + lambda ||w_S - w_S_dense||^2`` by ``torch.linalg.lstsq``
    on the stacked system (``lambda``: the damping of ``H = X^T X / n``)."""
    rows = inputs.shape[0]
    hessian = inputs.T @ inputs / rows
    shift = calibration.DAMPING * float(hessian.diagonal().mean())
    columns = kept.nonzero()[:, 0]
    design = torch.cat([inputs[:, columns] / rows ** 0.5,
                        shift ** 0.5 * torch.eye(columns.numel(), dtype=torch.float64)])
    target = torch.cat([inputs @ dense_row / rows ** 0.5, shift ** 0.5 * dense_row[columns]])
    solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    return torch.zeros_like(dense_row).index_put_((columns,), solution)


@pytest.mark.parametrize("pattern,structure", [("diag", dict(sparsity=0.5)),
                                               ("blockdiag", dict(sparsity=0.5, groups=4)),
                                               ("fanin", dict(sparsity=0.5)),
                                               ("nm", dict(nm=(2, 4))),
                                               ("unstructured", dict(sparsity=0.5))])
def test_sparsegpt_solves_each_row_by_least_squares_on_the_sparsified_inputs(pattern,
                                                                             structure):
    model, batches = _mlp(), _batches()
    sparse = sparsefx.transform(model, pattern, structure.get("sparsity", 0.9),
                                nm=structure.get("nm", (2, 4)), init="sparsegpt",
                                calibration=batches,
                                overrides={".*": {"groups": 4}} if "groups" in structure
                                else None)
    for name in ("0", "2"):
        layer = sparse.get_submodule(name)
        dense = model.get_submodule(name).weight.detach().double()
        # layer 2 sees what the sparse layer 0 (then GELU) gives: sequential
        inputs = _inputs_of(sparse, batches, name)
        hessian = calibration.damped_hessian(inputs.T @ inputs, inputs.shape[0])
        saliency = calibration.sparsegpt_saliency(dense, hessian)
        reference = LAYERS[pattern].from_scores(dense, None, saliency, **structure)
        kept = layer.kept_mask()
        assert torch.equal(kept, reference.kept_mask()), name
        expected = torch.stack([_damped_least_squares(inputs, dense[row], kept[row])
                                for row in range(dense.shape[0])])
        torch.testing.assert_close(layer.dense_weight().double(), expected, rtol=1e-4,
                                   atol=1e-5)


def test_sparsegpt_saliency_structure_beats_every_other_on_a_small_layer():
    torch.manual_seed(3)
    model = nn.Linear(4, 6)
    batches = _batches(features=4)
    sparse = sparsefx.transform(model, "diag", 0.5, init="sparsegpt", calibration=batches)
    inputs = torch.cat(batches).double()
    hessian = calibration.damped_hessian(inputs.T @ inputs, inputs.shape[0])
    saliency = calibration.sparsegpt_saliency(model.weight.detach(), hessian)
    best = max(float(saliency[mask].sum()) for mask in _every_structure("diag", 6, 4,
                                                                         sparsity=0.5))
    assert float(saliency[sparse.kept_mask()].sum()) == pytest.approx(best, rel=1e-9)
    assert isinstance(sparse, DiagLinear)  # the model was one layer: a new root


def test_least_squares_rows_pads_rows_of_different_counts():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    kept = torch.rand(5, 7, generator=generator) < 0.5
    kept[0] = False
    kept[1] = True
    kept[2, 0] = True  # column 0 kept where padding also points
    hessian = calibration.damped_hessian(inputs.T @ inputs, 50)
    solved = calibration.least_squares_rows(weight, hessian, kept, budget_bytes=8 * 49 * 2)
    for row in range(5):
        torch.testing.assert_close(solved[row],
                                   _damped_least_squares(inputs, weight[row], kept[row]))


def test_a_callable_calibration_gives_what_the_list_gives():
    model, batches = _mlp(), _batches()

    def run(m):
        for batch in batches:
            m(batch)

    for init in calibration.INITS:
        listed = sparsefx.transform(model, "fanin", 0.5, init=init, calibration=batches)
        called = sparsefx.transform(model, "fanin", 0.5, init=init, calibration=run)
        for a, b in zip(listed.state_dict().values(), called.state_dict().values(),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inputs_as_tuples_and_dicts():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x, scale=1.0):
            return self.b(F.relu(self.a(x)) * scale)

    model = TwoInputs()
    x = [torch.randn(5, 8) for _ in range(2)]
    by_tuple = sparsefx.transform(model, "diag", 0.5, init="sparsegpt",
                                  calibration=[(t, 2.0) for t in x])
    by_dict = sparsefx.transform(model, "diag", 0.5, init="sparsegpt",
                                 calibration=[{"x": t, "scale": 2.0} for t in x])
    assert torch.equal(by_tuple.a.offsets, by_dict.a.offsets)
    torch.testing.assert_close(by_tuple.b.values, by_dict.b.values, rtol=0, atol=0)


def test_a_hugging_face_model_calibrates_on_dicts_and_every_site_is_sparse():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                     n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    for init in calibration.INITS:
        sparse = sparsefx.transform(model, "diag", 0.5, init=init, calibration=batches)
        report = sparsefx.report(sparse)
        assert all(row.pattern == "diag" for row in report if "lm_head" not in row.name)
        assert not any(isinstance(m, calibration.Calibrating) for m in sparse.modules())
        with torch.no_grad():
            assert torch.isfinite(sparse(ids).logits).all()


# ------------------------------------------------------------------------------ bad input


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


@pytest.mark.parametrize("given,error,match", [
    (None, ValueError, "init needs calibration="),
    ([], ValueError, "calibration is empty"),
    (torch.randn(4, 12), TypeError, "calibration is a Tensor"),
    ([torch.randn(4, 5)], ValueError, "calibration batch 0: the model raised"),
    (lambda model: None, ValueError, "reached no layer"),
])
@pytest.mark.parametrize("init", calibration.INITS)
def test_bad_calibrations_are_refused_and_the_model_is_untouched(given, error, match, init):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        sparsefx.transform(model, "diag", 0.5, init=init, calibration=given)
    assert _unchanged(model, before)
    assert all(not isinstance(m, calibration.Calibrating) for m in model.modules())


def test_a_layer_the_calibration_never_reaches_is_named():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, other=False):
            return self.unused(x) if other else self.used(x)

    with pytest.raises(ValueError, match=r"never reached layers \['unused'\]"):
        sparsefx.transform(Branch(), "diag", 0.5, init="wanda",
                           calibration=[torch.randn(3, 8)])


def test_calibration_without_a_calibrated_init_is_refused():
    with pytest.raises(ValueError, match="calibration= given with init='magnitude'"):
        sparsefx.transform(_mlp(), "diag", 0.5, calibration=_batches())
    with pytest.raises(ValueError, match="init='bogus'"):
        sparsefx.transform(_mlp(), "diag", 0.5, init="bogus")


def test_training_mode_is_restored_after_calibrating_in_eval():
    model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 8)).train()
    calls = []
    model[1].register_forward_pre_hook(lambda module, args: calls.append(module.training))
    sparse = sparsefx.transform(model, "fanin", 0.5, init="wanda", calibration=_batches())
    assert calls and not any(calls)  # dropout off while calibrating
    assert all(module.training for module in sparse.modules())


# ------------------------------------------------------------------------------------ OWL


@pytest.mark.parametrize("ratios", [[0.1, 0.1, 0.1], [0.0, 0.02, 0.5], [0.3, 0.01, 0.2, 0.9]])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_owl_densities_hold_the_budget_and_rise_with_outliers(ratios, sparsity):
    sizes = [100 * (i + 1) for i in range(len(ratios))]
    densities = sparsefx.kernels.patterns.owl_densities(sizes, ratios, sparsity, 0.08)
    kept = sum(n * d for n, d in zip(sizes, densities))
    assert kept == pytest.approx((1 - sparsity) * sum(sizes), rel=1e-9)
    assert all(0 <= d <= 1 for d in densities)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [densities[i] for i in order] == sorted(densities)
    if len(set(ratios)) == 1:
        assert densities == pytest.approx([1 - sparsity] * len(ratios))
    elif min(densities) > 0 and max(densities) < 1:
        assert max(densities) - min(densities) == pytest.approx(0.16)


def test_owl_gives_the_layer_with_outlier_inputs_more_weights():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 16, generator=generator) for _ in range(2)]
    for batch in batches:
        batch[:, 3] *= 40.0  # one feature in the first layer's inputs: outliers there
    sparse = sparsefx.transform(model, "fanin", 0.75, init="wanda", calibration=batches,
                                distribution="owl")
    layers = [sparse.get_submodule(name) for name in ("0", "2", "4")]
    assert layers[0].sparsity < layers[1].sparsity and layers[0].sparsity < layers[2].sparsity
    stored = sum(layer.stored for layer in layers)
    assert abs(stored - 0.25 * 3 * 256) <= 3  # the global budget, give or take rounding


def test_owl_needs_a_calibrated_init_and_a_sparsity_to_spread():
    with pytest.raises(ValueError, match="distribution='owl' with init='magnitude'"):
        sparsefx.transform(_mlp(), "diag", 0.5, distribution="owl")
    with pytest.raises(ValueError, match="distribution='owl' with pattern='nm'"):
        sparsefx.transform(_mlp(), "nm", init="wanda", calibration=_batches(),
                           distribution="owl")


def test_the_row_solves_hold_after_set_num_threads():
    """MKL's batched LU fails (a DLASWP parameter error, wrong results) once
    ``torch.set_num_threads`` has run; the row solves use Cholesky instead."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        from sparsefx import calibration as c
        g = torch.Generator().manual_seed(0)
        X = torch.randn(2000, 512, generator=g, dtype=torch.float64)
        W = torch.randn(64, 512, generator=g, dtype=torch.float64)
        H = c.damped_hessian(X.T @ X, 2000)
        kept = torch.rand(64, 512, generator=g) < 0.5
        r = c.least_squares_rows(W, H, kept)
        worst = max(float((H[S][:, S] @ r[i, S] - (H @ W[i])[S]).abs().max())
                    for i in range(64) for S in [kept[i].nonzero()[:, 0]])
        print(worst)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ERROR" not in run.stdout + run.stderr
    assert float(run.stdout.split()[-1]) < 1e-9
