"""What an update costs in memory, measured: the peak resident memory of a process during a
step that ends in a structure update, against the peak of the plain steps before it, on a
model whose layers are 4096 wide, for every pattern and method.

The bound checked: one dense layer's float32 gradient (64 MiB here: what the growth tap
forms for one layer at a time, or a block of it) plus the growth probes, which hold what an
update can grow from the step's backward until ``dst.step()`` (all layers' at once: the drop
is decided on the weights after the optimizer's step). Each probe's size is checked too:
about the sparse layer's for fan-in and unstructured layers, 1/12 of the dense layer's for
2:4 (packed within-group ranks), ``P`` numbers for diagonals.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WIDTH, LAYERS = 4096, 4
DENSE_LAYER = WIDTH * WIDTH * 4  # bytes of one dense float32 gradient
SLACK = 24 << 20  # the allocator's rounding, Python's own objects, the steps' temporaries

CASES = [("diag", "rigl"), ("diag", "set"), ("diag", "dynadiag"), ("blockdiag", "rigl"),
         ("fanin", "rigl"), ("fanin", "set"), ("fanin", "srigl"), ("nm", "rigl"),
         ("nm", "set"), ("unstructured", "rigl"), ("unstructured", "set")]

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn as nn
    import sparsefx

    pattern, method, width, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with torch.device("meta"):  # no dense weights are ever materialised
        dense = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    options = {"nm": (2, 4)} if pattern == "nm" else {}
    model = sparsefx.transform(dense, pattern, 0.9, init="random", **options).to_empty(
        device="cpu")
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=width ** -0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dst = sparsefx.DST(model, optimizer, method, total_steps=100, delta_t=4)
    x = torch.randn(8, width)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        return dst.step()

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    for _ in range(3):  # steps 1-3: plain; the peak of a training step without an update
        step()
    plain = peak()
    step()  # step 4: armed backward, then the update
    probes = [layer.probe.numel() * 4 if layer.probe is not None else 0 for layer in dst.layers]
    print(json.dumps({"plain": plain, "update": peak(), "probes": probes,
                      "stored": [layer.module.param.numel() for layer in dst.layers]}))
""")


def _measure(pattern: str, method: str) -> dict:
    # every allocation above 128 KiB its own mapping, returned when freed: the peak resident
    # memory is then the peak of what was live, not of what glibc's heap kept after a free
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, pattern, method, str(WIDTH),
                           str(LAYERS)], capture_output=True, text=True, timeout=600,
                          env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pattern,method", CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_an_update_holds_at_most_one_dense_layer_beyond_the_probes(pattern, method):
    measured = _measure(pattern, method)
    extra = measured["update"] - measured["plain"]
    print(f"{pattern}/{method}: {extra / 2**20:.0f} MiB above the plain steps, probes "
          f"{sum(measured['probes']) / 2**20:.0f} MiB")
    probes = sum(measured["probes"])
    assert extra <= DENSE_LAYER + probes + SLACK, (
        f"{pattern}/{method}: an update step peaked {extra / 2**20:.0f} MiB above the plain "
        f"steps; expected one dense layer ({DENSE_LAYER / 2**20:.0f} MiB) and the probes "
        f"({probes / 2**20:.0f} MiB)")
    dense_numbers = WIDTH * WIDTH
    for probe, stored in zip(measured["probes"], measured["stored"], strict=True):
        numbers = probe // 4
        if pattern in ("diag", "blockdiag"):
            assert numbers <= WIDTH + 2
        elif pattern == "nm":
            assert numbers <= dense_numbers // 12 + 2 * WIDTH
        elif pattern == "fanin" and method != "srigl":
            assert numbers <= 1.7 * stored  # |G| at the k active, (score, column) at 0.3 k
        elif pattern == "fanin":  # a row may refill all of its 2k largest fan-in (pairs),
            assert numbers <= 5.9 * stored + 2  # and 0.3 of the layer's best (triples)
        elif pattern == "unstructured":
            assert numbers <= 0.35 * dense_numbers  # 10 % active, 3 numbers at 3 %
