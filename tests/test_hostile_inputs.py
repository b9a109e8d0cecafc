"""Hostile inputs across transform, the layers and ops, DST and checkpoint loading: each is a
clear error (which layer, which argument, the value, what was expected) that leaves the dense
model, the sparse model, the optimizer and the DST state exactly as they were. A few inputs
are not errors; what happens to them is checked in ``test_what_happens``. A hypothesis fuzz
of the public API checks that no input crashes the process or breaks a structure
invariant."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given, settings, strategies as st

import sparsefx
from sparsefx.layers import SPARSE_LAYERS


def _dense(*dims: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _world(pattern: str = "diag", **options) -> SimpleNamespace:
    """A dense 16-32-8 MLP, its sparse copy trained for 2 steps (so the optimizer has state),
    and a DST manager on it (updates every 3 steps: the next step, 3, is an update)."""
    dense = _dense(16, 32, 8)
    model = sparsefx.transform(dense, pattern, 0.75, init="random", seed=1, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = sparsefx.DST(model, optimizer, method="rigl", total_steps=30, delta_t=3)
    for step in range(2):
        _train_step(model, optimizer, step)
        dst.step()
    return SimpleNamespace(dense=dense, model=model, optimizer=optimizer, dst=dst,
                           pattern=pattern, options=options)


def _train_step(model, optimizer, step: int, x: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=generator) if x is None else x
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), torch.randint(0, 8, (8,), generator=generator)).backward()
    optimizer.step()


def _snapshot(world) -> dict:
    return {"dense": copy.deepcopy(world.dense.state_dict()),
            "model": copy.deepcopy(world.model.state_dict()),
            "optimizer": copy.deepcopy(world.optimizer.state_dict()),
            "dst": copy.deepcopy(world.dst.state_dict()),
            "modules": [type(m) for m in world.model.modules()]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k])
                                                                     for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@dataclass
class Case:
    name: str
    act: Callable[[SimpleNamespace], Any]
    error: type
    message: str                 # a regex the message must match
    pattern: str = "diag"        # the world's pattern
    options: dict | None = None
    prepare: Callable[[SimpleNamespace], Any] | None = None  # the user's doing, before act


def _tamper(world, key: str, change: Callable[[torch.Tensor], None]) -> dict:
    state = copy.deepcopy(world.model.state_dict())
    change(state[key])
    return state


def _other_model_state(pattern: str, sparsity: float = 0.75, **options) -> dict:
    return sparsefx.transform(_dense(16, 32, 8), pattern, sparsity, init="random", seed=1,
                              **options).state_dict()


def _with_nan_weight(world, pattern="diag"):
    dense = copy.deepcopy(world.dense)
    with torch.no_grad():
        dense[0].weight[3, 5] = float("nan")
    return sparsefx.transform(dense, pattern, 0.75)


def _replace_layer(world):
    world.model[2] = nn.Linear(32, 8)


def _replace_values(world):
    world.model[0].values = nn.Parameter(world.model[0].values.detach().clone())
    _train_step(world.model, world.optimizer, 5)


def _rebuilt_optimizer(world):
    rebuilt = torch.optim.AdamW(world.model.parameters(), lr=1e-2)
    _train_step(world.model, rebuilt, 5)


def _no_backward(world):
    world.optimizer.zero_grad(set_to_none=True)


def _ckpt(tmp, **objects):
    return sparsefx.save_checkpoint(tmp / "latest.pt", **objects)


CASES = [
    # ----------------------------------------------------------------- transform
    Case("transform: model is a tensor",
         lambda w: sparsefx.transform(torch.randn(3, 3), "diag", 0.9), TypeError,
         r"sparsefx.transform: model is a Tensor: expected a torch.nn.Module"),
    Case("transform: unknown pattern", lambda w: sparsefx.transform(w.dense, "diagonal", 0.9),
         ValueError, r"pattern='diagonal': expected one of \('diag', 'blockdiag'"),
    Case("transform: sparsity 1", lambda w: sparsefx.transform(w.dense, "diag", 1.0),
         ValueError, r"sparsity=1.0: expected a fraction in \(0, 1\)"),
    Case("transform: sparsity 0", lambda w: sparsefx.transform(w.dense, "fanin", 0.0),
         ValueError, r"sparsity=0.0: expected a fraction in \(0, 1\)"),
    Case("transform: sparsity NaN", lambda w: sparsefx.transform(w.dense, "diag", float("nan")),
         ValueError, r"sparsity=nan: expected a fraction"),
    Case("transform: sparsity a string", lambda w: sparsefx.transform(w.dense, "diag", "0.9"),
         ValueError, r"sparsity='0.9': expected a fraction"),
    Case("transform: unknown init",
         lambda w: sparsefx.transform(w.dense, "diag", 0.9, init="zeros"), ValueError,
         r"sparsefx.transform: init='zeros': expected one of \('magnitude', 'random', 'wanda', 'sparsegpt'\)"),
    Case("transform: N:M with N > M", lambda w: sparsefx.transform(w.dense, "nm", nm=(3, 2)),
         ValueError, r"layer 0: N:M = 3:2: expected 0 < N < M"),
    Case("transform: N:M whose M does not divide the width",
         lambda w: sparsefx.transform(w.dense, "nm", nm=(2, 5)), ValueError,
         r"layer 0: in_features = 16: expected a multiple of M = 5"),
    Case("transform: override of a layer that does not exist",
         lambda w: sparsefx.transform(w.dense, "diag", 0.9, overrides={"9": {"sparsity": 0.5}}),
         ValueError, r"overrides\['9'\] names no layer: the candidate layers are \['0', '2'\]"),
    Case("transform: misspelt override key",
         lambda w: sparsefx.transform(w.dense, "diag", 0.9, overrides={"0": {"sparsty": 0.5}}),
         ValueError, r"overrides\['0'\] has keys \['sparsty'\]: expected pattern, sparsity"),
    Case("transform: blockdiag groups that do not divide the layer",
         lambda w: sparsefx.transform(w.dense, "blockdiag", 0.75, overrides={"0": {"groups": 5}}),
         ValueError, r"layer 0: .*groups.*5"),
    Case("transform: NaN weight under magnitude init", _with_nan_weight, ValueError,
         r"layer 0: weight holds 1 NaN or infinite entries: init='magnitude' cannot rank"),
    Case("transform: infinite weight under magnitude init (fan-in)",
         lambda w: _with_nan_weight(w, "fanin"), ValueError, r"layer 0: weight holds 1 NaN"),
    # -------------------------------------------------------------- layers and ops
    Case("layer: input of the wrong width", lambda w: w.model(torch.randn(4, 15)), ValueError,
         r"layer 0: x has shape \(4, 15\): expected a last dimension of in_features = 16"),
    Case("layer: input not a tensor", lambda w: w.model([1.0] * 16), TypeError,
         r"layer 0: x is a list: expected a torch.Tensor"),
    Case("layer: 0-d input", lambda w: w.model(torch.tensor(1.0)), ValueError,
         r"layer 0: x has shape \(\): expected a last dimension of in_features = 16"),
    Case("op: integer input", lambda w: w.model(torch.ones(4, 16, dtype=torch.int64)),
         TypeError, r"x.dtype is torch.int64: expected torch.float32, the dtype of values"),
    Case("op: float64 input to float32 values",
         lambda w: w.model(torch.ones(4, 16, dtype=torch.float64)), TypeError,
         r"x.dtype is torch.float64: expected torch.float32"),
    Case("op: input on another device",
         lambda w: w.model(torch.ones(4, 16, device="meta")), ValueError,
         r"x is on meta: expected cpu, the device of values"),
    Case("layer: K > P diagonals",
         lambda w: sparsefx.DiagLinear(torch.randn(40, 16), torch.arange(40), 32, 16),
         ValueError, r"offsets has K = 40 diagonals: expected 1 <= K <= P = .* = 32"),
    Case("layer: duplicated diagonals",
         lambda w: sparsefx.DiagLinear(torch.randn(2, 16), torch.tensor([3, 3]), 32, 16),
         ValueError, r"offsets repeats offset 3"),
    Case("layer: fan-in ids out of range",
         lambda w: sparsefx.FanInLinear(torch.randn(8, 2), torch.tensor([[0, 16]] * 8), 16),
         ValueError, r"indices.*16"),
    Case("layer: mask of another shape",
         lambda w: sparsefx.MaskedLinear(torch.randn(8, 16), torch.ones(8, 15)), ValueError,
         r"mask has shape \(8, 15\): expected \(8, 16\)"),
    Case("op: structure 1x1 layer called with a 2-wide input",
         lambda w: sparsefx.transform(_dense(1, 1), "diag", 0.5)(torch.randn(3, 2)),
         ValueError, r"layer 0: x has shape \(3, 2\): expected a last dimension of "
                     r"in_features = 1"),
    # --------------------------------------------------------------------------- DST
    Case("DST: model is a string", lambda w: sparsefx.DST("model", w.optimizer, total_steps=9),
         TypeError, r"sparsefx.DST: model is a str: expected the torch.nn.Module"),
    Case("DST: optimizer is a string", lambda w: sparsefx.DST(w.model, "adam", total_steps=9),
         TypeError, r"sparsefx.DST: optimizer is a str: expected a torch.optim.Optimizer"),
    Case("DST: a dense model", lambda w: sparsefx.DST(w.dense, w.optimizer, total_steps=9),
         ValueError, r"the model has no sparse layer .*make it sparse with sparsefx.transform"),
    Case("DST: an optimizer of another model",
         lambda w: sparsefx.DST(w.model, torch.optim.SGD(w.dense.parameters(), lr=0.1),
                                total_steps=9), ValueError,
         r"the optimizer does not train the weights of 0, 2"),
    Case("DST: unknown method",
         lambda w: sparsefx.DST(w.model, w.optimizer, method="magic", total_steps=9),
         ValueError, r"method='magic': expected one of \('static', 'set'"),
    Case("DST: SRigL on diag layers",
         lambda w: sparsefx.DST(w.model, w.optimizer, method="srigl", total_steps=9),
         ValueError, r"method='srigl' works on fanin layers; these are not: 0 \(diag\)"),
    Case("DST: total_steps 0", lambda w: sparsefx.DST(w.model, w.optimizer, total_steps=0),
         ValueError, r"total_steps=0: expected an int >= 1"),
    Case("DST: delta_t 0",
         lambda w: sparsefx.DST(w.model, w.optimizer, total_steps=9, delta_t=0), ValueError,
         r"delta_t=0: expected an int > 0"),
    Case("DST: alpha above 1",
         lambda w: sparsefx.DST(w.model, w.optimizer, total_steps=9, alpha=2), ValueError,
         r"alpha=2: expected 0 < alpha <= 1"),
    Case("DST: options beside a method object",
         lambda w: sparsefx.DST(w.model, w.optimizer, sparsefx.RigL(), total_steps=9, seed=1),
         ValueError, r"seed given with a method object"),
    Case("DST: step before any backward", lambda w: w.dst.step(), RuntimeError,
         r"step 3 \(a structure update\): no backward reached a sparse layer since the last "
         r"dst.step\(\)", prepare=_no_backward),
    Case("DST: an optimizer rebuilt after DST", lambda w: w.dst.step(), RuntimeError,
         r"the optimizer DST was given has not stepped since the last dst.step\(\).*"
         r"dst.optimizer = optimizer", prepare=_rebuilt_optimizer),
    Case("DST: a layer replaced after DST", lambda w: w.dst.step(), RuntimeError,
         r"layer 2 is no longer in the model: the model was changed after DST",
         prepare=_replace_layer),
    Case("DST: values replaced by a new Parameter after DST", lambda w: w.dst.step(),
         RuntimeError, r"layer 0 has new trained weights \(a new Parameter\)",
         prepare=_replace_values),
    # --------------------------------------------------------------- checkpoints
    Case("checkpoint: another pattern",
         lambda w: w.model.load_state_dict(_other_model_state("fanin")), ValueError,
         r"layer 0: the checkpoint holds a fanin or N:M layer here .*this model has a diag"),
    Case("checkpoint: another sparsity",
         lambda w: w.model.load_state_dict(_other_model_state("diag", 0.9)), ValueError,
         r"layer 0: values has shape \(\d+, 16\) in the checkpoint and \(\d+, 16\) here; the "
         r"checkpoint's layer is .* sparse, this one .*: made at another sparsity\?"),
    Case("checkpoint: a dense model's",
         lambda w: w.model.load_state_dict(w.dense.state_dict()), ValueError,
         r"layer 0: the checkpoint holds a dense layer here"),
    Case("checkpoint: duplicated diagonals",
         lambda w: w.model.load_state_dict(_tamper(w, "2.offsets", lambda t: t.__setitem__(
             1, t[0]))), ValueError,
         r"layer 2: the checkpoint's offsets are not a valid diag structure: .*repeats"),
    Case("checkpoint: a diagonal out of range",
         lambda w: w.model.load_state_dict(_tamper(w, "0.offsets", lambda t: t.__setitem__(
             0, 999))), ValueError,
         r"layer 0: the checkpoint's offsets are not a valid diag structure: .*999"),
    Case("checkpoint: fan-in ids out of range",
         lambda w: w.model.load_state_dict(_tamper(w, "2.indices", lambda t: t.__setitem__(
             (0, 0), -3))), ValueError,
         r"layer 2: the checkpoint's indices are not a valid fanin structure", "fanin"),
    Case("checkpoint: fan-in ids repeated in a row",
         lambda w: w.model.load_state_dict(_tamper(w, "0.indices", lambda t: t[1].fill_(2))),
         ValueError, r"layer 0: the checkpoint's indices are not a valid fanin structure",
         "fanin"),
    Case("checkpoint: a float structure",
         lambda w: w.model.load_state_dict({**w.model.state_dict(),
                                            "0.offsets": w.model[0].offsets.float()}),
         ValueError, r"layer 0: offsets in the checkpoint is torch.float32: expected an "
                     r"integer"),
    Case("checkpoint: a layer's entries missing",
         lambda w: w.model.load_state_dict({k: v for k, v in w.model.state_dict().items()
                                            if not k.startswith("2.")}), ValueError,
         r"layer 2: the checkpoint has no entries for it"),
    Case("checkpoint: DST state of other settings",
         lambda w: w.dst.load_state_dict(sparsefx.DST(
             w.model, w.optimizer, total_steps=99, delta_t=3).state_dict()), ValueError,
         r"the checkpoint was made with other settings \(saved, current\): \{'total_steps'"),
    Case("checkpoint: DST state that is not one", lambda w: w.dst.load_state_dict({"a": 1}),
         ValueError, r"got dict\['a'\]: expected what DST.state_dict\(\) returns"),
    Case("checkpoint: DST state past the end",
         lambda w: w.dst.load_state_dict({**w.dst.state_dict(), "step": 99}), ValueError,
         r"step=99: expected an int in \[0, 30\]"),
]


def _checkpoint_cases(tmp_path):
    """Cases that need a file; built per test (they write into tmp_path)."""
    def not_ours(w):
        torch.save({"model": w.model.state_dict()}, tmp_path / "other.pt")
        sparsefx.load_checkpoint(tmp_path / "other.pt", model=w.model)

    def missing_object(w):
        _ckpt(tmp_path, model=w.model, optimizer=w.optimizer)
        sparsefx.load_checkpoint(tmp_path / "latest.pt", model=w.model, dst=w.dst)

    def wrong_model_with_the_rest(w):
        other = sparsefx.transform(_dense(16, 32, 8), "diag", 0.9, init="random", seed=1)
        optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
        _ckpt(tmp_path, model=other, optimizer=optimizer,
              dst=sparsefx.DST(other, optimizer, total_steps=30, delta_t=3))
        sparsefx.load_checkpoint(tmp_path / "latest.pt", model=w.model, optimizer=w.optimizer,
                                 dst=w.dst)

    return [
        Case("load_checkpoint: a file save_checkpoint did not write", not_ours, ValueError,
             r"other.pt is not a checkpoint written by sparsefx.save_checkpoint"),
        Case("load_checkpoint: an object the file does not hold", missing_object, ValueError,
             r"holds no \['dst'\]: it holds \['model', 'optimizer'\]"),
        Case("load_checkpoint: another sparsity, with optimizer and DST", wrong_model_with_the_rest,
             ValueError, r"layer 0: values has shape .* made at another sparsity\?"),
    ]


def _run(case: Case):
    world = _world(case.pattern, **(case.options or {}))
    if case.prepare is not None:
        case.prepare(world)
    before = _snapshot(world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.error, match=case.message):
            case.act(world)
    after = _snapshot(world)
    for part in ("dense", "model", "modules", "optimizer", "dst"):
        assert _same(before[part], after[part]), f"{case.name}: the {part} changed"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input(case):
    _run(case)


def test_hostile_checkpoint_files(tmp_path):
    for case in _checkpoint_cases(tmp_path):
        _run(case)


def test_what_happens():
    """Inputs that are not errors, and what they do."""
    world = _world()
    # NaN inputs propagate to the outputs, as through a dense layer
    assert torch.isnan(world.model(torch.full((2, 16), float("nan")))).all()
    # ... and a NaN gradient at an update skips it, with a warning, moving nothing
    structure = world.model[0].offsets.clone()
    x = torch.randn(8, 16)
    x[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="step 3: non-finite gradients .* skipped"):
        _train_step(world.model, world.optimizer, 3, x)
        world.dst.step()
    assert torch.equal(structure, world.model[0].offsets)
    # zero rows give zero rows
    assert world.model(torch.randn(0, 16)).shape == (0, 8)
    # a 1x1 layer cannot be sparse: it is made a diag layer keeping its one weight, shown in
    # the report
    tiny = sparsefx.transform(_dense(1, 1), "diag", 0.9)
    assert [row.sparsity for row in sparsefx.report(tiny)][0] == 0.0
    # an empty layer stays dense, with the reason in the report
    empty = sparsefx.transform(nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4)), "diag", 0.5)
    rows = {row.name: row for row in sparsefx.report(empty)}
    assert rows["0"].pattern == "dense" and "empty weight" in rows["0"].note
    assert rows["1"].pattern == "diag"


# ------------------------------------------------------------------------------ fuzz


def _invariants(model: nn.Module) -> None:
    """Every sparse layer holds a valid structure, and computes ``x @ W.T + b`` for the dense
    ``W`` its values and structure describe."""
    x = torch.randn(3, next(m for m in model.modules() if isinstance(m, nn.Module)
                            and hasattr(m, "in_features")).in_features)
    for module in model.modules():
        if isinstance(module, SPARSE_LAYERS):
            module.check_structure(module.structure)
            inputs = torch.randn(3, module.in_features, dtype=module.param.dtype)
            expected = F.linear(inputs, module.dense_weight(), module.bias)
            torch.testing.assert_close(module(inputs), expected, rtol=1e-4, atol=1e-4,
                                       equal_nan=True)  # a NaN step trains NaN weights
    assert x.shape[0] == 3


_VALID_PATTERNS = st.sampled_from(["diag", "blockdiag", "fanin", "nm", "unstructured"])
PATTERN_NAMES = st.one_of(_VALID_PATTERNS, _VALID_PATTERNS,
                          st.sampled_from(["dense", "Diag", "", None, 3]))
ANY_SPARSITY = st.one_of(st.floats(0.05, 0.95), st.floats(allow_nan=True, allow_infinity=True),
                         st.integers(-1, 2), st.none(), st.text(max_size=3))
ANY_PATTERN = st.one_of(_VALID_PATTERNS, st.sampled_from(["dense", "Diag", "", None, 3]))
DIMS = st.lists(st.integers(0, 40), min_size=2, max_size=4)


def _transformed(dims, pattern, sparsity, nm, init, seed):
    """``transform`` of a fresh MLP of ``dims``: the sparse model, or None where it raised
    TypeError/ValueError (leaving the dense model as it was) or made nothing sparse."""
    torch.manual_seed(seed)
    dense = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
    before = copy.deepcopy(dense.state_dict())
    try:
        model = sparsefx.transform(dense, pattern, sparsity, nm=nm, init=init, seed=seed)
    except (TypeError, ValueError) as error:
        event(f"transform refused: {str(error)[:40]}")
        model = None
    assert _same(before, dense.state_dict())  # the input model is never modified
    if model is None or not any(isinstance(m, SPARSE_LAYERS) for m in model.modules()):
        return None
    _invariants(model)
    return model


@settings(max_examples=200, deadline=None)
@given(dims=DIMS, pattern=ANY_PATTERN, sparsity=ANY_SPARSITY,
       nm=st.tuples(st.integers(-1, 5), st.integers(-1, 6)),
       init=st.sampled_from(["magnitude", "random", "bad", None]),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_transform(dims, pattern, sparsity, nm, init, seed):
    """Whatever is passed, transform raises TypeError or ValueError, or gives a model whose
    every structure is valid and every layer computes its dense reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _transformed(dims, pattern, sparsity, nm, init, seed)


@settings(max_examples=400, deadline=None)
@given(dims=DIMS, pattern=_VALID_PATTERNS, sparsity=st.floats(0.05, 0.95),
       init=st.sampled_from(["magnitude", "random"]), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["static", "set", "rigl", "srigl", "dynadiag", "x"]),
       delta_t=st.integers(1, 3),
       steps=st.lists(st.sampled_from(["train", "train", "no backward", "nan", "big"]),
                      max_size=8))
def test_fuzz_dst(dims, pattern, sparsity, init, seed, method, delta_t, steps):
    """DST on any sparse MLP, driven by any sequence of training steps, steps without a
    backward, NaN inputs and huge inputs: DST raises ValueError (settings) or RuntimeError
    (a misused step, naming DST.step()), never anything else, and after every step every
    structure is valid and every layer computes its dense reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _transformed(dims, pattern, sparsity, (2, 4), init, seed)
        if model is None:
            return
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        try:
            dst = sparsefx.DST(model, optimizer, method=method, total_steps=len(steps) + 1,
                               delta_t=delta_t, seed=seed)
        except ValueError:
            event("DST refused")
            return
        event("trained with DST")
        for action in steps:
            x = torch.randn(4, dims[0])
            if action == "nan" and x.numel():
                x[0, 0] = float("nan")
            if action == "big":
                x *= 1e30
            if action != "no backward":
                optimizer.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                optimizer.step()
            try:
                dst.step()
            except RuntimeError as error:
                assert "sparsefx.DST.step()" in str(error)
            _invariants(model)
