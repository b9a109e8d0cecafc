"""sparsefx.transform on real architectures: the right layers rewritten, outputs equal to the
dense model with the same mask baked in, compile, densify, state_dict, report, errors."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sparsefx
from helpers import masked_reference
from models import Conv1D, SmallCNN, TinyGPT, TransformerBlock, mlp
from sparsefx.layers import SPARSE_LAYERS

PATTERNS = ["diag", "fanin", "nm", "unstructured"]
GPT_SPARSE = {f"blocks.{i}.{name}" for i in range(2)
              for name in ("c_attn.weight", "c_proj.weight", "w_fc", "w_out")}
CASES = {
    # model factory, input factory, the layers that must become sparse
    "mlp": (mlp, lambda: torch.randn(5, 16), {"0", "2", "4"}),
    "linear": (lambda: nn.Linear(16, 12), lambda: torch.randn(5, 16), {""}),  # the model itself
    "cnn": (SmallCNN, lambda: torch.randn(2, 1, 8, 8), {"head.1", "head.3"}),
    "transformer": (TransformerBlock, lambda: torch.randn(2, 6, 32),
                    {"fc1", "fc2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}),
    "gpt": (TinyGPT, lambda: torch.randint(0, 50, (2, 12)), GPT_SPARSE),
}


def _build(case, seed=0):
    torch.manual_seed(seed)
    make_model, make_input, expected = CASES[case]
    return make_model().eval(), make_input(), expected


def _sparse_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}


def _masked_reference(original, sparse, stored_in_out=()):
    return masked_reference(original, sparse, lambda name, owner: isinstance(owner, Conv1D)
                            or name in stored_in_out)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", CASES)
def test_transform_rewrites_exactly_the_eligible_layers(case, pattern):
    model, x, expected = _build(case)
    before = copy.deepcopy(model.state_dict())
    sparse = sparsefx.transform(model, pattern=pattern, sparsity=0.75)
    assert _sparse_names(sparse) == expected
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key
    assert not _sparse_names(model)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), _masked_reference(model, sparse)(x))
        torch.testing.assert_close(sparsefx.densify(sparse)(x), sparse(x))
    assert not _sparse_names(sparsefx.densify(sparse))
    for name in expected:
        assert f"pattern={sparse.get_submodule(name).pattern_label}" in str(sparse)


def test_report_and_densify_see_through_torch_compile():
    sparse = sparsefx.transform(mlp(), "diag", 0.5)
    compiled = torch.compile(sparse)
    assert [r.name for r in sparsefx.report(compiled)] == ["0", "2", "4"]
    x = torch.randn(2, 16)
    torch.testing.assert_close(sparsefx.densify(compiled)(x), sparse(x))


def test_report_says_what_stayed_dense_and_why():
    model, _, _ = _build("gpt")
    rows = {row.name: row for row in sparsefx.report(sparsefx.transform(model, "diag", 0.9))}
    assert rows["lm_head"].pattern == "dense" and "tied" in rows["lm_head"].note
    assert rows["blocks.0.c_attn.weight"].pattern == "diag"
    assert rows["blocks.0.w_fc"].feeds == ("blocks.0.w_out",)
    row = rows["blocks.0.w_fc"]
    assert (row.out_features, row.in_features) == (128, 32)
    assert row.params == row.flops // 2 == 13 * 32 and row.dense_flops == 2 * 128 * 32
    block, _, _ = _build("transformer")
    rows = {r.name: r for r in sparsefx.report(sparsefx.transform(block, "fanin", 0.9))}
    assert rows["attn.out_proj"].pattern == "fanin"  # nn.MultiheadAttention is swapped
    text = str(sparsefx.report(sparsefx.transform(block, "fanin", 0.9)))
    assert "attn.out_proj" in text and "total" in text


@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_flop_counter_counts_the_sparse_layers(case):
    model, x, _ = _build(case)
    sparse = sparsefx.transform(model, "diag", 0.9)
    with FlopCounterMode(display=False) as sparse_count, torch.no_grad():
        sparse(x)
    with FlopCounterMode(display=False) as dense_count, torch.no_grad():
        model(x)
    rows = x.shape[0] if case == "mlp" else x.numel()
    saved = sum(r.dense_flops - r.flops for r in sparsefx.report(sparse)) * rows
    assert dense_count.get_total_flops() - sparse_count.get_total_flops() == saved


@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_traced_part_runs_forward_and_backward(pattern):
    torch._dynamo.reset()
    model, x, _ = _build("gpt")
    sparse = sparsefx.transform(model, pattern, 0.75)
    block = sparse.blocks[0]
    assert isinstance(block, torch.fx.GraphModule)  # the traced part that was rewritten
    h = torch.randn(2, 12, 32)
    compiled = torch.compile(block, fullgraph=True)
    compiled(h).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    block(h).square().sum().backward()
    for name, p in block.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trips_into_a_fresh_transform(case, pattern):
    model, x, _ = _build(case)
    trained = sparsefx.transform(model, pattern, 0.75)
    fresh = sparsefx.transform(_build(case, seed=1)[0], pattern, 0.75, init="random", seed=3)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x))


def test_options_select_and_shape_the_layers():
    model, _, _ = _build("mlp")
    kept = sparsefx.transform(model, "diag", 0.75, keep_first_dense=True, keep_last_dense=True)
    assert _sparse_names(kept) == {"2"}
    only = sparsefx.transform(model, "diag", 0.75, include=r"[02]", exclude="0")
    assert _sparse_names(only) == {"2"}
    mixed = sparsefx.transform(model, "diag", 0.75, overrides={
        "0": "dense", "4": {"pattern": "nm", "nm": (1, 4)}, r"[2]": 0.5})
    assert _sparse_names(mixed) == {"2", "4"}
    assert mixed.get_submodule("2").sparsity == pytest.approx(0.5, abs=0.04)
    assert mixed.get_submodule("4").pattern == "nm"
    assert mixed.get_submodule("4").pattern_label == "nm 1:4"
    erk = {r.name: r for r in sparsefx.report(
        sparsefx.transform(model, "fanin", 0.8, distribution="erk"))}
    # within per-row rounding of the 20 % budget; the small output layer gets the most
    assert sum(r.params for r in erk.values()) == pytest.approx(
        0.2 * sum(r.dense_params for r in erk.values()), rel=0.1)
    assert erk["4"].sparsity < erk["0"].sparsity < erk["2"].sparsity
    # a dict without "sparsity" sets the pattern or its options and leaves the layer its
    # share of the distribution
    for distribution in ("uniform", "erk"):
        plain = {r.name: r for r in sparsefx.report(
            sparsefx.transform(model, "diag", 0.8, distribution=distribution))}
        shaped = sparsefx.transform(model, "diag", 0.8, distribution=distribution,
                                    overrides={"2": {"pattern": "blockdiag", "groups": 4}})
        assert shaped.get_submodule("2").groups == 4
        got = {r.name: r.sparsity for r in sparsefx.report(shaped)}
        assert got["0"] == plain["0"].sparsity and got["4"] == plain["4"].sparsity
        assert got["2"] == pytest.approx(plain["2"].sparsity, abs=0.13)  # 1 coset of 4
    cnn, _, _ = _build("cnn")
    typed = sparsefx.transform(cnn, "diag", 0.5, exclude_types=(nn.Linear,))
    assert typed is cnn  # nothing left to sparsify: unchanged, with a warning


def test_errors_name_the_problem_and_leave_the_model_alone():
    model, _, _ = _build("mlp")
    before = copy.deepcopy(model.state_dict())
    cases = [
        (dict(pattern="blocky"), r"pattern='blocky': expected one of"),
        (dict(sparsity=1.0), r"sparsity=1.0: expected a fraction in \(0, 1\)"),
        (dict(sparsity=0.0), r"sparsity=0.0"),
        (dict(pattern="nm", nm=(4, 4)), r"layer .*: N:M = 4:4: expected 0 < N < M"),
        (dict(pattern="nm", nm=(2, 5)), r"layer 0: in_features = 16: expected a multiple of M"),
        (dict(overrides={"fc9": "dense"}), r"overrides\['fc9'\] names no layer"),
        (dict(include="nothing"), r"include='nothing' selects no layer"),
        (dict(distribution="normal"), r"distribution='normal'"),
    ]
    for options, message in cases:
        options = {"pattern": "diag", "sparsity": 0.5} | options
        with pytest.raises(ValueError, match=message):
            sparsefx.transform(model, **options)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv_only = nn.Sequential(nn.Conv2d(1, 2, 3))
        assert sparsefx.transform(conv_only, "diag", 0.5) is conv_only
    assert any("no nn.Linear" in str(w.message) for w in caught)


def test_leaf_modules_and_concrete_args_reach_the_tracer():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x, scale=None):
            if scale is not None:  # resolved by concrete_args
                x = x * scale
            return torch.matmul(x, self.w)

    gate = Gate()
    found = sparsefx.transform(gate, "fanin", 0.5, concrete_args={"scale": None})
    assert _sparse_names(found) == {"w"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(found(x), _masked_reference(gate, found, {"w"})(x))
    wrapper = nn.Sequential(Gate())
    left = sparsefx.transform(wrapper, "fanin", 0.5, leaf_modules=(Gate,))
    assert left is wrapper  # a leaf is not traced into, so its matmul is not seen


class _QKV(nn.Module):
    """Three projections of one input, then an MLP: shared inputs and a feeds-into chain."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        mixed = self.q(x) * self.k(x) + self.v(x)
        return self.down(torch.relu(self.up(mixed) * 2.0))


def test_layer_graph_finds_feeds_and_shared_inputs():
    from sparsefx.passes.analyse import shared_inputs

    graph = sparsefx.layer_graph(sparsefx.transform(_QKV(), "fanin", 0.5))
    assert sorted(graph.edges) == [("up", "down")]  # q*k+v mixes features: no edge from them
    assert shared_inputs(graph) == [["k", "q", "v"]]
    gpt = sparsefx.layer_graph(sparsefx.transform(_build("gpt")[0], "diag", 0.5))
    # w_fc -> (+ bias) -> gelu -> w_out; the attention path reshapes, so it has no edge
    assert sorted(gpt.edges) == [("blocks.0.w_fc", "blocks.0.w_out"),
                                 ("blocks.1.w_fc", "blocks.1.w_out")]
    cnn = sparsefx.layer_graph(sparsefx.transform(_build("cnn")[0], "diag", 0.5))
    assert list(cnn.edges) == [("head.1", "head.3")]


def test_functional_site_bias_goes_into_the_op():
    """A Conv1D site's ``addmm(bias, x, W)`` becomes one sparse-layer call that adds the bias
    (still its own parameter, FQN unchanged), not the layer followed by a separate ``add``."""
    model, x, _ = _build("gpt")
    sparse = sparsefx.transform(model, pattern="diag", sparsity=0.75)
    block = sparse.get_submodule("blocks.0")  # a traced part: a GraphModule
    calls = {n.target: n for n in block.graph.nodes if n.op == "call_module"}
    call = calls["c_attn.weight"]
    assert call.kwargs["bias"].op == "get_attr"
    assert call.kwargs["bias"].target == "c_attn.bias"
    assert not [user for user in call.users if user.op == "call_function"
                and "add" in str(user.target)]
    assert "blocks.0.c_attn.bias" in dict(sparse.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), _masked_reference(model, sparse)(x))


@pytest.mark.parametrize("pattern", ["diag", "fanin", "blockdiag"])
def test_autocast_between_dense_and_sparse_layers(pattern):
    """Under bf16 autocast a dense layer hands the sparse one bf16 activations while its values
    are fp32: the op computes in bf16, as F.linear would, and the gradients reach the fp32
    values."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    model = sparsefx.transform(dense, pattern, 0.75, keep_first_dense=True,
                               keep_last_dense=True)
    x = torch.randn(6, 32)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.05)
    y.float().square().sum().backward()
    assert model[2].values.grad.dtype == torch.float32
    assert model[2].values.grad.abs().sum() > 0


def test_what_transform_records_is_one_info_object_that_densify_drops():
    """The candidates' order and those left dense, with why, are one ``ModelInfo`` on the
    result; a model pickled by sparsefx 0.1 (two loose attributes) reads the same."""
    from sparsefx.model_info import ModelInfo, detach, info_of
    model = sparsefx.transform(mlp(), "diag", 0.9, keep_last_dense=True)
    info = info_of(model)
    assert isinstance(info, ModelInfo) and info_of(torch.compile(model)) is info
    sparse = [name for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)]
    assert set(info.order) == set(sparse) | set(info.dense) and len(info.dense) == 1
    (last, (_, _, reason)), = info.dense.items()
    assert info.order[-1] == last and "last" in reason
    old = copy.deepcopy(model)
    detach(old)
    old._sparsefx_order, old._sparsefx_dense = list(info.order), dict(info.dense)
    assert info_of(old) == info
    assert str(sparsefx.report(old)) == str(sparsefx.report(model))
    assert info_of(sparsefx.densify(model)) is None and info_of(mlp()) is None
