"""The blockdiag section: blocked diagonals against diagonals at the same sparsity (and
dense ``nn.Linear``), layer by layer, forward and a training step (forward + both
gradients), interleaved, eager. The blocked layer runs its batched GEMMs where its kernel
takes them (from 128 rows, blocks of at least 64 outputs) and the diagonal kernel below."""
from __future__ import annotations

import torch

from common import (Candidate, fmt, interleaved, machine_line, markdown_table, median_ratio,
                    median_time)
from sparsefx.layers import BlockDiagLinear, DiagLinear

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]
BATCHES = [1, 256]
SPARSITY = 0.9


def _step(layer, x, grad_out, weights):
    def run():
        return torch.autograd.grad(layer(x), (x, *weights), grad_out)
    return run


def run(args, progress) -> list[dict]:
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for out_features, in_features in shapes:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
        layers = {"dense": torch.nn.Linear(in_features, out_features, bias=False),
                  "diag": DiagLinear.from_dense(weight, sparsity=SPARSITY),
                  "blockdiag": BlockDiagLinear.from_dense(weight, sparsity=SPARSITY)}
        layers["dense"].weight.data.copy_(weight)
        blocked = layers["blockdiag"]
        for batch in BATCHES:
            for step in ("forward", "train"):
                x = torch.randn(batch, in_features, generator=generator)
                grad_out = torch.randn(batch, out_features, generator=generator)
                if step == "forward":
                    fns = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
                    context = torch.no_grad()
                else:
                    x.requires_grad_()
                    fns = {name: _step(layer, x, grad_out, list(layer.parameters()))
                           for name, layer in layers.items()}
                    context = torch.enable_grad()
                with context:
                    candidates = interleaved([Candidate(name, fn) for name, fn in fns.items()],
                                             args.rounds, args.min_run_time)
                by_name = {c.name: c for c in candidates}
                row = dict(shape=[out_features, in_features], batch=batch, step=step,
                           groups=blocked.groups, cosets=blocked.num_cosets,
                           stored=dict(diag=layers["diag"].values.numel(),
                                       blockdiag=blocked.values.numel()),
                           ms={name: 1e3 * median_time(c) for name, c in by_name.items()},
                           blockdiag_over_diag=median_ratio(by_name["diag"],
                                                            by_name["blockdiag"]),
                           blockdiag_over_dense=median_ratio(by_name["dense"],
                                                             by_name["blockdiag"]),
                           diag_over_dense=median_ratio(by_name["dense"], by_name["diag"]))
                rows.append(row)
                progress(f"{out_features}x{in_features} b{batch} {step}: blockdiag "
                         f"{row['blockdiag_over_diag']:.2f}x diag, "
                         f"{row['blockdiag_over_dense']:.2f}x dense")
    return rows


def markdown(payload: dict, info: dict) -> str:
    lines = ["# blockdiag vs diag (CPU)", "", f"Command: `{payload['command']}`  ",
             f"Machine: {machine_line(info)}  ", f"Method: {payload['method']}", "",
             f"Each layer at {SPARSITY:.0%} sparsity from the same dense weight; blockdiag "
             "with the g its pattern chooses (c cosets of g), so it stores c/g of the weights "
             "where diag stores K/P. Speed-ups are medians over rounds of time ratios "
             "(> 1: blockdiag faster).", ""]
    table = []
    for row in payload["rows"]:
        out_features, in_features = row["shape"]
        table.append([f"{out_features}x{in_features}", str(row["batch"]), row["step"],
                      f"{row['cosets']}/{row['groups']}",
                      fmt(row["ms"]["diag"], ".3f"), fmt(row["ms"]["blockdiag"], ".3f"),
                      fmt(row["ms"]["dense"], ".3f"), fmt(row["blockdiag_over_diag"], ".2f"),
                      fmt(row["blockdiag_over_dense"], ".2f"), fmt(row["diag_over_dense"], ".2f")])
    lines += markdown_table(["layer (out x in)", "batch", "step", "c/g", "diag ms",
                             "blockdiag ms", "dense ms", "blockdiag vs diag",
                             "blockdiag vs dense", "diag vs dense"], table, "lrlrrrrrrr")
    return "\n".join(lines) + "\n"
