"""DST under mixed precision: bf16 and fp16 autocast, a GradScaler (an overflowed step skips
the structure update, the next update proceeds; the scale changes no decision), and
fp16/bf16 parameters."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx

CASES = [("diag", "dynadiag"), ("blockdiag", "rigl"), ("fanin", "srigl"), ("nm", "rigl"),
         ("unstructured", "set")]
IDS = [f"{p}-{m}" for p, m in CASES]
STEPS, DELTA_T = 12, 3


def _model(pattern: str) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 6))
    options = {"nm": dict(nm=(2, 4)),
               "blockdiag": dict(overrides={"2": {"groups": 8}})}.get(pattern, {})
    return sparsefx.transform(dense, pattern=pattern, sparsity=0.75, init="random", seed=1,
                              **options)


def _batch(step: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(32, 16, generator=generator).to(dtype),
            torch.randint(0, 6, (32,), generator=generator))


def _structure(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def _train(model, method, *, autocast=None, scaler=None, blow_up_at=None, alpha=0.5,
           eps=1e-8):
    """``STEPS`` steps; ``blow_up_at``: a step whose loss is made to overflow. Returns the
    DST manager and the structure after every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, eps=eps)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=STEPS + 4,
                       delta_t=DELTA_T, alpha=alpha, seed=2, grad_scaler=scaler)
    structures = []
    dtype = next(model.parameters()).dtype
    for step in range(STEPS):
        x, target = _batch(step, dtype)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x).float(), target)
        if step + 1 == blow_up_at:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        dst.step()
        structures.append(_structure(model))
    return dst, structures


@pytest.mark.parametrize("pattern,method", CASES, ids=IDS)
def test_a_grad_scaler_changes_no_decision_and_no_weight(pattern, method):
    """fp32 with a GradScaler against fp32 without: the scale is a power of two, applied to
    the loss and taken off every gradient DST and the optimizer use, so the runs are
    bit-identical -- the growth scores rank the same, DynaDiag's importances step on
    unscaled gradients."""
    plain, scaled = _model(pattern), _model(pattern)
    _, expected = _train(plain, method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
    _, got = _train(scaled, method, scaler=scaler)
    assert scaler.get_scale() > 2.0**12  # the scale grew along the way
    assert any(not torch.equal(a[k], b[k]) for a, b in zip(expected, expected[1:]) for k in a)
    for step, (a, b) in enumerate(zip(expected, got)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step + 1}: {name}"
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("pattern,method", CASES, ids=IDS)
def test_an_overflowed_step_skips_the_update_and_the_next_one_proceeds(pattern, method):
    model = _model(pattern)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    update = DELTA_T  # the first update; the next moves enough to move a blockdiag coset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dst, structures = _train(model, method, scaler=scaler, blow_up_at=update, alpha=0.9)
    assert any(f"step {update}: non-finite gradients" in str(w.message) for w in caught)
    before, at, after = structures[update - 2], structures[update - 1], structures[-1]
    assert all(torch.equal(before[k], at[k]) for k in before), "the overflowed step moved"
    assert any(not torch.equal(at[k], after[k]) for k in at), "no later update moved"
    assert dst._skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,method", CASES, ids=IDS)
def test_autocast_training_moves_the_structure(pattern, method, dtype):
    model = _model(pattern)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) if dtype == torch.float16
              else None)
    start = _structure(model)
    dst, structures = _train(model, method, autocast=dtype, scaler=scaler)
    assert any(not torch.equal(start[k], structures[-1][k]) for k in start)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
               for p in model.parameters())
    assert dst._skipped_updates == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,method", CASES, ids=IDS)
def test_low_precision_parameters_train_and_move(pattern, method, dtype):
    model = _model(pattern).to(dtype)
    start = _structure(model)
    # AdamW's default eps (1e-8) is 0 in fp16, and 0 / 0 makes a dense fp16 model NaN after
    # one step as well: fp16 parameters need an eps fp16 holds
    dst, structures = _train(model, method, eps=1e-4 if dtype == torch.float16 else 1e-8)
    assert any(not torch.equal(start[k], structures[-1][k]) for k in start)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
