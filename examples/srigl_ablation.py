"""Why SRigL ablates no neuron on the study's LM: the row that keeps the least after each
layer-wide drop, against the salience threshold ``max(1, floor(gamma_sal * k0))``.

    python examples/srigl_ablation.py                      # 90, 95 and 98 %, seed 0
    python examples/srigl_ablation.py --sparsities 0.9 --quick

SRigL ablates a row only when fewer of its entries than the threshold are salient (kept
after the drop, or among the layer's best gradients). A row can get there only if the
layer-wide drop takes nearly all of it; this records, at every update of the study's LM
(its ``lm`` task: the same model, text, steps and schedule), each sparse layer's fewest
kept entries in a row, its fewest salient ones when SRigL counted them, and the rows
ablated. Writes ``results/srigl_ablation.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import sparsefx
from sparsefx import regrow
from charlm import charlm, lm_loss, perplexity, random_batches, stdlib_text, validation_loss
from common import fit
from study import FULL, QUICK, RESULTS, machine


def trace(task, sparsity: float, seed: int, gamma_sal: float) -> dict:
    """Train the LM with SRigL, recording each layer's fewest kept and salient entries in a
    row at every update."""
    train_text, validation_text, _ = stdlib_text(task.text_bytes)
    model = sparsefx.transform(charlm(seed, **task.model), "fanin", sparsity, init="random",
                               seed=seed, keep_last_dense=True)
    method = sparsefx.SRigL(gamma_sal=gamma_sal)
    layers: dict[str, dict] = {}
    current: list[str] = []
    update_layer, layerwise_drop, salience = (method.update_layer, regrow.layerwise_drop,
                                              regrow.salience)

    def update(ctx, layer, fraction):
        current[:] = [layer.name]
        return update_layer(ctx, layer, fraction)

    def drop(magnitude, row_active, num_dropped):
        kept = layerwise_drop(magnitude, row_active, num_dropped)
        record = layers.setdefault(current[0], dict(fan_in=kept.shape[1], updates=[]))
        record["updates"].append(dict(dropped=num_dropped,
                                      fewest_kept=int(kept.sum(dim=1)[row_active].min()),
                                      fewest_salient=None))
        return kept

    def salient(*args, **kwargs):
        counts = salience(*args, **kwargs)
        layers[current[0]]["updates"][-1]["fewest_salient"] = int(counts.min())
        return counts

    method.update_layer = update
    regrow.layerwise_drop, regrow.salience = drop, salient
    try:
        dst = fit(model, random_batches(train_text, task.steps, task.batch_size,
                                        task.model["context"], seed),
                  task.steps, task.lr, "srigl", seed, method=method, delta_t=task.delta_t,
                  progress=False, loss_fn=lm_loss)
    finally:
        regrow.layerwise_drop, regrow.salience = layerwise_drop, salience
    for layer in dst.layers:
        if layer.name in layers:
            record = layers[layer.name]
            record.update(may_ablate=method.may_ablate(layer),
                          threshold=max(1, math.floor(gamma_sal * record["fan_in"])),
                          rows=layer.module.out_features,
                          rows_ablated=int((~method.row_active[layer.name]).sum()))
    loss = validation_loss(model, validation_text, task.model["context"])
    return dict(sparsity=sparsity, seed=seed, gamma_sal=gamma_sal, steps=task.steps,
                perplexity=perplexity(loss), layers=layers)


def markdown(runs: list[dict]) -> str:
    lines = ["| sparsity | gamma_sal | layer | k0 | threshold | fewest kept in a row (min over "
             "updates) | fewest salient | rows ablated at the end | perplexity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for name, layer in run["layers"].items():
            if not layer.get("may_ablate"):
                continue
            kept = min(u["fewest_kept"] for u in layer["updates"])
            salient = [u["fewest_salient"] for u in layer["updates"]
                       if u["fewest_salient"] is not None]
            lines.append(f"| {run['sparsity']:.2f} | {run['gamma_sal']} | {name} | "
                         f"{layer['fan_in']} | {layer['threshold']} | {kept} | "
                         f"{min(salient) if salient else 'not counted'} | "
                         f"{layer['rows_ablated']} of {layer['rows']} | "
                         f"{run['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--gamma-sal", nargs="+", type=float, default=[0.3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the study's tiny LM")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    task = (QUICK if args.quick else FULL)["lm"]
    runs = []
    for sparsity in args.sparsities:
        for gamma_sal in args.gamma_sal:
            runs.append(trace(task, sparsity, args.seed, gamma_sal))
            print(f"sparsity {sparsity:.2f} gamma_sal {gamma_sal}: perplexity "
                  f"{runs[-1]['perplexity']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(command="python examples/srigl_ablation.py " + " ".join(
        f"--sparsities {' '.join(map(str, args.sparsities))} --gamma-sal "
        f"{' '.join(map(str, args.gamma_sal))} --seed {args.seed}".split())
        + (" --quick" if args.quick else ""), machine=machine(), runs=runs)
    (args.out / "srigl_ablation.json").write_text(json.dumps(result, indent=1))
    table = markdown(runs)
    (args.out / "srigl_ablation.md").write_text(
        f"# SRigL's ablation on the study's LM\n\n`{result['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
