"""sparsefx.transform on HuggingFace GPT-2 and BERT built from small configs (nothing is
downloaded). Neither traces whole with torch.fx; skipped where transformers is absent."""
import io

import pytest
import torch

import sparsefx
from helpers import masked_reference
from sparsefx.layers import SPARSE_LAYERS

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                     n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval()


GPT2_SITES = {f"transformer.h.{i}.{name}.weight" for i in range(2)
              for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
BERT_SITES = {f"encoder.layer.{i}.{name}" for i in range(2)
              for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense", "intermediate.dense", "output.dense")
              } | {"pooler.dense"}


def _masked_reference(original, sparse):
    from transformers.pytorch_utils import Conv1D  # GPT-2's, weight stored as (in, out)

    return masked_reference(original, sparse, lambda name, owner: isinstance(owner, Conv1D))


def _output(model, tokens):
    result = model(tokens)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("pattern", ["diag", "fanin", "nm", "unstructured"])
@pytest.mark.parametrize("build,sites", [(gpt2, GPT2_SITES), (bert, BERT_SITES)])
def test_hf_models(build, sites, pattern):
    model = build()
    sparse = sparsefx.transform(model, pattern, 0.75)
    names = {n for n, m in sparse.named_modules() if isinstance(m, SPARSE_LAYERS)}
    assert names == sites
    rows = {row.name: row for row in sparsefx.report(sparse)}
    if build is gpt2:
        assert rows["lm_head"].pattern == "dense" and "tied" in rows["lm_head"].note
    tokens = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        expected = _output(_masked_reference(model, sparse), tokens)
        torch.testing.assert_close(_output(sparse, tokens), expected)
        torch.testing.assert_close(_output(sparsefx.densify(sparse), tokens), expected)
    fresh = sparsefx.transform(build(), pattern, 0.75, init="random", seed=1)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh, tokens), _output(sparse, tokens))


def test_gpt2_traced_part_compiles():
    torch._dynamo.reset()
    sparse = sparsefx.transform(gpt2(), "diag", 0.75)
    part = sparse.transformer.h[0].attn.c_attn  # GPT-2's Conv1D, traced and rewritten
    assert isinstance(part, torch.fx.GraphModule)
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.compile(part, fullgraph=True)(x).sum().backward()
    expected = torch.autograd.grad(part(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
