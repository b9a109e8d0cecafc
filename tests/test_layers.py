"""The sparse layer modules: built from dense weights, equal to the dense layer with the
same structure baked in, and back to dense, through state_dict and torch.compile."""
import io

import pytest
import torch
import torch.nn.functional as F

from sparsefx import DiagLinear, FanInLinear, MaskedLinear
from sparsefx.kernels import patterns

SHAPES = [(24, 24), (40, 16), (12, 32)]  # square, tall, wide
KINDS = {
    "diag": lambda w, b, **kw: DiagLinear.from_dense(w, b, sparsity=0.75, **kw),
    "fanin": lambda w, b, **kw: FanInLinear.from_dense(w, b, sparsity=0.75, **kw),
    "nm": lambda w, b, **kw: FanInLinear.from_dense(w, b, nm=(1, 4), **kw),
    "unstructured": lambda w, b, **kw: MaskedLinear.from_dense(w, b, sparsity=0.75, **kw),
}


def _dense(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator),
            torch.randn(out_features, generator=generator))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("init", ["magnitude", "random"])
def test_layer_equals_dense_with_its_structure(kind, out_features, in_features, init):
    weight, bias = _dense(out_features, in_features)
    layer = KINDS[kind](weight, bias, init=init, generator=torch.Generator().manual_seed(1))
    kept = layer.dense_weight() != 0
    # stored values are copied from the dense weight, nothing else survives
    assert torch.equal(layer.dense_weight(), torch.where(kept, weight, 0.0))
    assert layer.sparsity == pytest.approx(0.75, abs=0.05)
    x = torch.randn(3, 5, in_features)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), bias))
    torch.testing.assert_close(layer.to_dense()(x), layer(x))
    assert f"pattern={layer.pattern_label}" in repr(layer) and "sparsity=75" in repr(layer)


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_magnitude_init_keeps_the_largest_structure(out_features, in_features):
    weight, _ = _dense(out_features, in_features)
    diag = DiagLinear.from_dense(weight, sparsity=0.75)
    norms = patterns.diag_norms(weight)
    dropped = torch.ones_like(norms, dtype=torch.bool)
    dropped[diag.offsets] = False
    assert norms[diag.offsets].min() >= norms[dropped].max()
    fanin = FanInLinear.from_dense(weight, sparsity=0.75)
    kept = fanin.dense_weight() != 0
    assert (weight.abs()[kept].reshape(out_features, -1).min(1).values
            >= torch.where(kept, 0.0, weight.abs()).max(1).values).all()
    masked = MaskedLinear.from_dense(weight, sparsity=0.75)
    assert weight.abs()[masked.mask].min() >= weight.abs()[~masked.mask].max()


def test_nm_layer_keeps_n_of_every_m():
    weight, bias = _dense(8, 16)
    layer = FanInLinear.from_dense(weight, bias, nm=(2, 4))
    patterns.check_nm_indices(layer.indices, 16, 2, 4)
    assert layer.pattern == "nm" and layer.pattern_label == "nm 2:4" and layer.sparsity == 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_random_layers_are_seeded(kind):
    cls = {"diag": DiagLinear, "fanin": FanInLinear, "nm": FanInLinear,
           "unstructured": MaskedLinear}[kind]
    structure = {"nm": (1, 4)} if kind == "nm" else {"sparsity": 0.8}
    build = lambda seed: cls.random(32, 20, generator=torch.Generator().manual_seed(seed),
                                    **structure)
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(a.dense_weight() != 0, b.dense_weight() != 0)
    assert not torch.equal(a.dense_weight() != 0, c.dense_weight() != 0)
    bound = 1 / 32 ** 0.5  # nn.Linear's init for 32 inputs
    assert a.dense_weight().abs().max() <= bound and a.bias.abs().max() <= bound


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_into_a_fresh_layer(kind):
    weight, bias = _dense(24, 32)
    trained = KINDS[kind](weight, bias)
    fresh = KINDS[kind](*_dense(24, 32, seed=5), init="random",
                        generator=torch.Generator().manual_seed(9))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 32)
    torch.testing.assert_close(fresh(x), trained(x))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_values_and_bias_only(kind):
    weight, bias = _dense(16, 16)
    layer = KINDS[kind](weight, bias)
    layer(torch.randn(3, 16)).sum().backward()
    names = {name for name, p in layer.named_parameters() if p.grad is not None}
    assert names == {"values" if kind != "unstructured" else "weight", "bias"}
    assert all(not buffer.requires_grad for buffer in layer.buffers())


def test_compiled_stack_of_sparse_layers():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        DiagLinear.random(16, 48, sparsity=0.75), torch.nn.ReLU(),
        FanInLinear.random(48, 32, nm=(2, 4)), torch.nn.ReLU(),
        MaskedLinear.random(32, 10, sparsity=0.5))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(7, 16)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for compiled_grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(compiled_grad, p.grad)


def test_layer_errors():
    weight, bias = _dense(8, 10)
    with pytest.raises(ValueError, match=r"init='best': expected one of"):
        DiagLinear.from_dense(weight, sparsity=0.5, init="best")
    with pytest.raises(ValueError, match=r"expected exactly one of them"):
        FanInLinear.from_dense(weight, sparsity=0.5, nm=(2, 4))
    with pytest.raises(ValueError, match=r"in_features = 10: expected a multiple of M = 4"):
        FanInLinear.from_dense(weight, nm=(2, 4))
    with pytest.raises(ValueError, match=r"mask has shape \(8, 9\)"):
        MaskedLinear(weight, torch.ones(8, 9), bias)
    with pytest.raises(ValueError, match=r"offsets repeats offset 3"):
        DiagLinear(torch.randn(2, 8), torch.tensor([3, 3]), 8, 10)
