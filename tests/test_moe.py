"""Mixture-of-experts models (HF Mixtral and Qwen2-MoE, built from configs): every expert's
weights, stored as 3D parameters, become sparse one expert at a time through
``sparsefx.experts.Experts``; routers stay dense by default with the reason in the report;
outputs equal the masked reference (``sparsefx.densify`` gives the original expert modules
back); DST moves each expert's structure."""
import warnings

import pytest
import torch

import sparsefx
from sparsefx.experts import Experts, is_expert_bank
from sparsefx.passes.sites import ROUTER

transformers = pytest.importorskip("transformers")

EXPERTS, LAYERS = 4, 2


def mixtral():
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_experts=EXPERTS, num_experts_per_tok=2,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, decoder_sparse_step=1)
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(config).eval()


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_reached_and_routers_stay_dense(family):
    model = FAMILIES[family]()
    banks = [name for name, m in model.named_modules() if is_expert_bank(m)]
    assert len(banks) == LAYERS
    sparse = sparsefx.transform(model, "fanin", 0.75)
    rows = {row.name: row for row in sparsefx.report(sparse)}
    for bank in banks:
        for expert in range(EXPERTS):
            for projection in ("gate_up", "down"):
                assert rows[f"{bank}.{projection}.{expert}"].pattern == "fanin"
        router = rows[f"{bank.rpartition('.')[0]}.gate.weight"]
        assert router.pattern == "dense" and router.note == ROUTER
    expert_weights = sum(m.gate_up_proj.numel() + m.down_proj.numel()
                         for m in model.modules() if is_expert_bank(m))
    sparse_weights = sum(r.out_features * r.in_features for r in rows.values()
                         if ".experts." in r.name and r.pattern != "dense")
    assert sparse_weights == expert_weights  # all of them
    tokens = torch.randint(0, 100, (2, 12))
    reference = sparsefx.densify(sparse)
    assert not any(isinstance(m, Experts) for m in reference.modules())
    assert sum(is_expert_bank(m) for m in reference.modules()) == LAYERS
    for mode in (False, True):
        sparse.train(mode)
        reference.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(sparse(tokens).logits, reference(tokens).logits,
                                       rtol=1e-5, atol=1e-5)


def test_a_router_named_in_overrides_becomes_sparse():
    sparse = sparsefx.transform(mixtral(), "fanin", 0.75,
                                overrides={r".*\.mlp\.gate\.weight": 0.5})
    rows = {row.name: row for row in sparsefx.report(sparse)}
    assert rows["model.layers.0.mlp.gate.weight"].pattern == "fanin"


def test_experts_compute_what_the_original_bank_computes_and_map_its_keys():
    bank = mixtral().model.layers[0].mlp.experts
    experts = Experts(bank)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 32, generator=generator)
    index = torch.randint(0, EXPERTS, (9, 2), generator=generator)
    weights = torch.rand(9, 2, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, index, weights), bank(hidden, index, weights))
    back = experts.to_torch()
    assert type(back) is type(bank)
    assert torch.equal(back.gate_up_proj, bank.gate_up_proj)
    assert torch.equal(back.down_proj, bank.down_proj)
    fresh = Experts(bank)
    fresh.load_state_dict({k: torch.zeros_like(v) for k, v in bank.state_dict().items()})
    assert all(float(p.abs().sum()) == 0 for p in fresh.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_dst_moves_each_experts_structure(family):
    sparse = sparsefx.transform(FAMILIES[family](), "fanin", 0.75, init="random").train()
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    dst = sparsefx.DST(sparse, optimizer, method="rigl", total_steps=12, delta_t=2, alpha=0.5)
    before = {n: b.clone() for n, b in sparse.named_buffers() if ".experts." in n}
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an expert no token picked is left alone
        for _ in range(6):
            tokens = torch.randint(0, 100, (4, 16), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            sparse(tokens, labels=tokens).loss.backward()
            optimizer.step()
            dst.step()
    after = dict(sparse.named_buffers())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) >= EXPERTS, moved  # experts move on their own, several of them
