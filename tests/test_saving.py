"""One-file save and load: ``sparsefx.save`` writes a safetensors file holding the sparse
weights, the structure and each layer's options; ``sparsefx.load`` rebuilds the sparse model
on the dense architecture it is given (on meta too) and checks that the file fits it."""
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import sparsefx
from sparsefx.layers import SPARSE_LAYERS

PATTERNS = [("diag", {}), ("blockdiag", {}), ("fanin", {}), ("nm", {"nm": (2, 4)}),
            ("unstructured", {})]


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


def _assert_same_model(a: nn.Module, b: nn.Module, *inputs):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert [str(r) for r in sparsefx.report(a)] == [str(r) for r in sparsefx.report(b)]
    with torch.no_grad():
        out_a, out_b = a(*inputs), b(*inputs)
    out_a, out_b = (getattr(o, "logits", o) for o in (out_a, out_b))
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("pattern,options", PATTERNS, ids=[p for p, _ in PATTERNS])
@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu", "meta"])
def test_save_then_load_on_the_dense_architecture(tmp_path, pattern, options, on_meta):
    torch.manual_seed(0)
    sparse = sparsefx.transform(_mlp(), pattern, 0.75, keep_last_dense=True, **options)
    with torch.no_grad():
        for parameter in sparse.parameters():  # trained, as far as the file can tell
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "model.safetensors"
    sparsefx.save(sparse, path)
    if on_meta:
        with torch.device("meta"):
            dense = _mlp()
    else:
        dense = _mlp()
    loaded = sparsefx.load(path, dense)
    _assert_same_model(loaded, sparse, torch.randn(4, 64))
    assert all(not isinstance(m, SPARSE_LAYERS) for m in dense.modules())  # untouched


def test_gpt2_file_size_ties_and_meta(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=200,
                                     n_positions=64)
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(config).eval()
    sparse = sparsefx.transform(dense, "fanin", 0.9)
    path = tmp_path / "gpt2.safetensors"
    sparsefx.save(sparse, path)

    with torch.device("meta"):
        architecture = transformers.GPT2LMHeadModel(config).eval()
    loaded = sparsefx.load(path, architecture)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again
    _assert_same_model(loaded, sparse, torch.randint(0, 200, (2, 16)))

    # the size: the sparse layers at (1 - sparsity) of their dense weights plus int16 ids,
    # the dense rest as it is, the tied embedding once
    layers = [m for m in sparse.modules() if isinstance(m, SPARSE_LAYERS)]
    sparse_bytes = sum(m.values.numel() * 4 + m.indices.numel() * m.indices.element_size()
                       for m in layers)
    linear_dense = sum(m.out_features * m.in_features * 4 for m in layers)
    assert sparse_bytes < 0.16 * linear_dense  # 10 % values + 5 % int16 ids
    sites = {name for name, m in sparse.named_modules() if isinstance(m, SPARSE_LAYERS)}
    rest = sum(t.numel() * t.element_size() for name, t in dense.state_dict().items()
               if name not in sites and name != "lm_head.weight")  # lm_head: the embedding
    size = os.path.getsize(path)
    assert sparse_bytes + rest <= size < sparse_bytes + rest + 64 * 1024  # + the header


def test_attention_models_round_trip(tmp_path):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    torch.manual_seed(0)
    sparse = sparsefx.transform(nn.TransformerEncoder(layer, 2), "diag", 0.75).eval()
    sparsefx.save(sparse, tmp_path / "encoder.safetensors")
    loaded = sparsefx.load(tmp_path / "encoder.safetensors",
                           nn.TransformerEncoder(layer, 2)).eval()
    _assert_same_model(loaded, sparse, torch.randn(2, 5, 32))


def test_a_file_that_does_not_fit_is_refused(tmp_path):
    sparse = sparsefx.transform(_mlp(), "diag", 0.75)
    path = tmp_path / "model.safetensors"
    sparsefx.save(sparse, path)
    wider = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(),
                          nn.Linear(128, 10))
    with pytest.raises(ValueError, match=r"layer 0 is \(128, 64\) in .* and \(256, 64\) in "
                                         r"this model"):
        sparsefx.load(path, wider)
    with pytest.raises(ValueError, match=r"layer 2 of .* is not a linear layer of this model"):
        sparsefx.load(path, nn.Sequential(nn.Linear(64, 128)))
    # a tampered structure: the layer's own check names it
    with safe_open(path, framework="pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}
        metadata = file.metadata()
    tensors["2.offsets"][1] = tensors["2.offsets"][0]
    save_file(tensors, tmp_path / "tampered.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"layer 2 in .*tampered.safetensors: offsets repeats"):
        sparsefx.load(tmp_path / "tampered.safetensors", _mlp())
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"was not written by sparsefx.save"):
        sparsefx.load(tmp_path / "other.safetensors", _mlp())
    with pytest.raises(ValueError, match=r"the model has no sparse layer"):
        sparsefx.save(_mlp(), tmp_path / "dense.safetensors")
