"""The large-model recipe: build the dense model on the meta device, ``transform`` it there
(``init="random"``: the structure is drawn on the CPU from ``seed``, so it is the structure a
CPU-built model gets from the same seed), ``to_empty(device=...)``, then ``load_state_dict``
of a sparse checkpoint: exactly the model that was saved."""
import pytest
import torch
import torch.nn as nn

import sparsefx
from sparsefx.layers import SPARSE_LAYERS

PATTERNS = [("diag", {}), ("blockdiag", {}), ("fanin", {}), ("nm", {"nm": (2, 4)}),
            ("unstructured", {})]


def _dense():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


@pytest.mark.parametrize("pattern,options", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_meta_transform_to_empty_and_load_gives_the_saved_model(pattern, options):
    torch.manual_seed(0)
    saved = sparsefx.transform(_dense(), pattern, 0.75, init="random", seed=7, **options)
    with torch.no_grad():  # trained, as far as the checkpoint can tell
        for parameter in saved.parameters():
            parameter.add_(torch.randn_like(parameter))
    checkpoint = saved.state_dict()

    with torch.device("meta"):
        dense = _dense()
    sparse = sparsefx.transform(dense, pattern, 0.75, init="random", seed=7, **options)
    assert all(t.is_meta for t in sparse.state_dict().values())
    assert [str(row) for row in sparsefx.report(sparse)] == \
        [str(row) for row in sparsefx.report(saved)]  # on meta, from the drawn structure
    sparse.to_empty(device="cpu")
    # leaving meta, each layer takes back the structure drawn for it: the CPU model's
    for name, buffer in sparse.named_buffers():
        assert torch.equal(buffer, checkpoint[name]), name
    sparse.load_state_dict(checkpoint)
    for name, tensor in sparse.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name
    x = torch.randn(5, 64)
    assert torch.equal(sparse(x), saved(x))


def test_meta_transform_with_magnitude_init_is_refused_naming_the_layer():
    with torch.device("meta"):
        dense = _dense()
    with pytest.raises(ValueError, match=r"layer 0: .*meta device.*init='magnitude'.*"
                                         r"init='random'"):
        sparsefx.transform(dense, "diag", 0.75)
    assert all(isinstance(m, nn.Linear) for m in (dense[0], dense[2], dense[4]))  # untouched


def test_meta_hf_gpt2_from_its_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100,
                                     n_positions=32)
    torch.manual_seed(0)
    saved = sparsefx.transform(transformers.GPT2LMHeadModel(config).eval(), "fanin", 0.9,
                               init="random", seed=3)
    checkpoint = saved.state_dict()

    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config).eval()
    sparse = sparsefx.transform(model, "fanin", 0.9, init="random", seed=3)
    layers = [name for name, m in sparse.named_modules() if isinstance(m, SPARSE_LAYERS)]
    assert len(layers) == 8
    sparse.to_empty(device="cpu")
    # to_empty gives every module new parameters, untying GPT-2's lm_head from the token
    # embedding: tie them again, as for any HF model materialised from meta
    sparse.tie_weights()
    sparse.load_state_dict(checkpoint)
    assert sparse.lm_head.weight is sparse.transformer.wte.weight
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(sparse(tokens).logits, saved(tokens).logits)
