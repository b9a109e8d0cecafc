"""nn.MultiheadAttention reached: ``sparsefx.transform`` swaps it for
``sparsefx.attention.MultiheadAttention`` (projections as modules, the same computation), so
its q, k, v and output projections become sparse. Checked against nn.MultiheadAttention on
every option, then on nn.TransformerEncoder, nn.Transformer and a torchvision-style ViT in
train() and eval(): every linear weight reached, outputs equal to the masked reference
(``sparsefx.densify``, which gives back nn.MultiheadAttention), DST moving the attention
projections' structure."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from sparsefx.attention import MultiheadAttention
from sparsefx.layers import SPARSE_LAYERS

E, HEADS, L, S, N = 16, 4, 5, 7, 3

OPTIONS = [dict(batch_first=b, bias=bias, add_bias_kv=kv, add_zero_attn=zero, kdim=kd, vdim=vd)
           for b, bias, kv, zero, (kd, vd) in itertools.product(
               (False, True), (True, False), (False, True), (False, True),
               ((None, None), (12, 10)))]


def _inputs(options, generator, batched=True):
    shape = (lambda length: (N, length) if options["batch_first"] else (length, N)) \
        if batched else (lambda length: (length,))
    q = torch.randn(*shape(L), E, generator=generator)
    k = torch.randn(*shape(S), options["kdim"] or E, generator=generator)
    v = torch.randn(*shape(S), options["vdim"] or E, generator=generator)
    return q, k, v


MASKS = {
    "none": lambda g: {},
    "bool attn_mask": lambda g: {"attn_mask": torch.rand(L, S, generator=g) < 0.3},
    "float attn_mask": lambda g: {"attn_mask": torch.randn(L, S, generator=g)},
    "per-head attn_mask": lambda g: {"attn_mask": torch.rand(N * HEADS, L, S, generator=g) < 0.3},
    "key_padding_mask": lambda g: {"key_padding_mask": torch.tensor(
        [[False] * S, [False] * (S - 2) + [True] * 2, [True] + [False] * (S - 1)])},
    "both, causal hint": lambda g: {"attn_mask": torch.triu(torch.ones(L, S, dtype=torch.bool), 1),
                                    "key_padding_mask": torch.zeros(N, S, dtype=torch.bool),
                                    "is_causal": True},
}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()))
def test_the_swap_computes_what_nn_multiheadattention_computes(options):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, **options)
    if reference.bias_k is not None:
        nn.init.normal_(reference.bias_k)
        nn.init.normal_(reference.bias_v)
    ours = MultiheadAttention.from_torch(reference)
    for (mask_name, mask), need_weights, average in itertools.product(
            MASKS.items(), (True, False), (True, False)):
        extra = mask(generator)
        if options["add_bias_kv"] or options["add_zero_attn"]:
            extra.pop("is_causal", None)
        q, k, v = _inputs(options, generator)
        where = f"{mask_name}, need_weights={need_weights}, average={average}"
        expected = reference(q, k, v, need_weights=need_weights,
                             average_attn_weights=average, **extra)
        got = ours(q, k, v, need_weights=need_weights, average_attn_weights=average, **extra)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=where)
        if need_weights:
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5,
                                       equal_nan=True, msg=where)
        else:
            assert got[1] is None and expected[1] is None
    q, k, v = _inputs(options, generator, batched=False)  # one unbatched sequence
    torch.testing.assert_close(ours(q, k, v)[0], reference(q, k, v)[0], rtol=1e-5, atol=1e-5)
    # and back: the same state dict, the same outputs
    back = ours.to_torch()
    assert back.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    fresh = MultiheadAttention(E, HEADS, **options)
    fresh.load_state_dict(reference.state_dict())  # an nn.MultiheadAttention's keys
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_gradients_match_nn_multiheadattention():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, batch_first=True)
    ours = MultiheadAttention.from_torch(reference)
    x = torch.randn(N, L, E)
    reference(x, x, x)[0].square().sum().backward()
    ours(x, x, x)[0].square().sum().backward()
    grads = dict(ours.named_parameters())
    for name, part in zip("qkv", reference.in_proj_weight.grad.chunk(3)):
        torch.testing.assert_close(grads[f"{name}_proj.weight"].grad, part)
    torch.testing.assert_close(grads["out_proj.weight"].grad, reference.out_proj.weight.grad)


# ----------------------------------------------------------------------- real models


class ViT(nn.Module):
    """torchvision's ViT in miniature: conv patches, a class token, pre-norm blocks of
    nn.MultiheadAttention and an MLP, a linear head."""

    def __init__(self, dim=32, depth=2, heads=4, patch=4, image=16, classes=10):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln1=nn.LayerNorm(dim), ln2=nn.LayerNorm(dim),
                               attention=nn.MultiheadAttention(dim, heads, batch_first=True),
                               mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                 nn.Linear(2 * dim, dim))))
            for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            y = block["ln1"](x)
            x = x + block["attention"](y, y, y, need_weights=False)[0]
            x = x + block["mlp"](block["ln2"](x))
        return self.head(x[:, 0])


def _encoder(batch_first):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)


MODELS = {
    "TransformerEncoder batch_first": (lambda: _encoder(True),
                                       lambda: (torch.randn(3, 6, 32),),
                                       {"src_key_padding_mask": torch.tensor(
                                           [[False] * 6, [False] * 4 + [True] * 2,
                                            [False] * 5 + [True]])}),
    "TransformerEncoder seq-first": (lambda: _encoder(False),
                                     lambda: (torch.randn(6, 3, 32),),
                                     {"mask": nn.Transformer.generate_square_subsequent_mask(6)}),
    "Transformer": (lambda: nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True),
                    lambda: (torch.randn(3, 6, 32), torch.randn(3, 5, 32)),
                    {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(5)}),
    "ViT": (ViT, lambda: (torch.randn(3, 3, 16, 16),), {}),
}


def _linear_weights(model) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            total += sum(p.numel() for name, p in module.named_parameters(recurse=False)
                         if name.endswith("weight"))
    return total


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pattern", ["diag", "fanin"])
def test_models_with_multiheadattention(name, pattern):
    build, inputs, kwargs = MODELS[name]
    torch.manual_seed(0)
    dense = build()
    sparse = sparsefx.transform(dense, pattern, 0.75)
    rows = sparsefx.report(sparse)
    reached = sum(row.out_features * row.in_features for row in rows if row.pattern != "dense")
    assert reached == _linear_weights(dense), str(rows)  # every linear weight: 100 %
    projections = [row.name for row in rows if row.name.rsplit(".", 1)[-1] in
                   ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert projections and all(row.pattern == pattern for row in rows
                               if row.name in projections)
    reference = sparsefx.densify(sparse)  # nn.MultiheadAttention again, masked weights
    assert not any(isinstance(m, MultiheadAttention) for m in reference.modules())
    torch.manual_seed(1)
    args = inputs()
    for mode in ("train", "eval"):  # eval: the fused paths of nn.Transformer* step aside
        sparse.train(mode == "train")
        reference.train(mode == "train")
        with torch.no_grad():
            got, expected = sparse(*args, **kwargs), reference(*args, **kwargs)
        padding = kwargs.get("src_key_padding_mask")
        if padding is not None:  # nn.TransformerEncoder's nested path zeroes padded places
            got, expected = got[~padding], expected[~padding]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=mode)

    # DST trains them: the attention projections' structures move
    sparse.train()
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    dst = sparsefx.DST(sparse, optimizer, method="rigl", total_steps=10, delta_t=2,
                       alpha=0.5)
    before = {n: b.clone() for n, b in sparse.named_buffers() if "_proj." in n}
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        sparse(*args, **kwargs).square().mean().backward()
        optimizer.step()
        dst.step()
    assert any(not torch.equal(b, dict(sparse.named_buffers())[n]) for n, b in before.items())


def test_report_of_a_transformer_encoder_shows_every_projection_sparse():
    rows = sparsefx.report(sparsefx.transform(_encoder(True), "diag", 0.9))
    names = {row.name: row.pattern for row in rows}
    for layer in range(2):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert names[f"layers.{layer}.self_attn.{projection}"] == "diag"
        assert names[f"layers.{layer}.linear1"] == names[f"layers.{layer}.linear2"] == "diag"


def test_a_mha_subclass_is_left_alone_with_its_reason():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.Sequential()
    model.attention = Custom(E, HEADS)
    model.mlp = nn.Linear(E, E)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner.mlp(self.inner.attention(x, x, x)[0])

    rows = {row.name: row for row in sparsefx.report(sparsefx.transform(Wrapper(), "diag",
                                                                         0.5))}
    assert rows["inner.attention.out_proj"].pattern == "dense"
    assert "MultiheadAttention" in rows["inner.attention.out_proj"].note
    assert rows["inner.mlp"].pattern == "diag"


def test_sparse_layers_report_a_dense_weight():
    """Code that reads ``.weight`` of a layer it holds (tying checks, dtype and device reads)
    gets the dense weight the layer computes with."""
    layer = sparsefx.transform(nn.Sequential(nn.Linear(8, 8)), "diag", 0.5)[0]
    assert isinstance(layer, SPARSE_LAYERS)
    torch.testing.assert_close(layer.weight, layer.dense_weight())
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
