"""Bring your own pretrained model: one-shot sparsification by magnitude, Wanda and SparseGPT
(with and without input permutations for the diagonal patterns), then a short recovery.

    python examples/pretrained.py                 # the table, JSON, Markdown and a plot
    python examples/pretrained.py --quick         # every code path, in seconds
    python examples/pretrained.py --hf            # also GPT-2 / Llama from configs, and a
                                                  # GPT-2-small-shaped calibration timed

Trains the byte-level LM of ``charlm.py`` (width 128, 2 blocks, context 128) for 1000 steps
on the standard library's source (or loads the one an earlier run saved, ``--model``), then
makes it sparse in every pattern at 50, 70 and 90 % (N:M at 2:4 and 4:8) with
``sparsefx.transform(init=..., calibration=..., permute=...)`` and reports each one-shot
validation loss; the best calibrated variant and magnitude then get ``--recovery-steps`` of
fine-tuning with the structure fixed, distilled from the dense model (the logits' KL) and
for diag 50 % and 2:4 also without. Writes ``results/pretrained.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import math
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsefx
from sparsefx.calibration import wanda_scores
from charlm import charlm, lm_loss, random_batches, stdlib_text, validation_loss
from study import machine

RESULTS = Path(__file__).parent / "results"
MODEL = dict(dim=128, depth=2, context=128)
CELLS = [(p, s, None) for p in ("diag", "blockdiag", "fanin", "unstructured")
         for s in (0.5, 0.7, 0.9)] + [("nm", None, (2, 4)), ("nm", None, (4, 8))]
PERMUTABLE = ("diag", "blockdiag")
INITS = ("magnitude", "wanda", "sparsegpt")


def label(pattern, sparsity, nm) -> str:
    return f"{pattern} {nm[0]}:{nm[1]}" if nm else f"{pattern} {sparsity:.0%}"


def train_dense(args, train_text):
    if args.model.exists():
        model = charlm(0, **args.model_config)
        model.load_state_dict(torch.load(args.model, weights_only=True))
        print(f"dense model loaded from {args.model}")
        return model
    model = charlm(0, **args.model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                   total_steps=args.steps)
    started = time.perf_counter()
    for inputs, targets in random_batches(train_text, args.steps, 16,
                                          args.model_config["context"], seed=0):
        loss = lm_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"dense model trained: {args.steps} steps in {time.perf_counter() - started:.0f} s")
    args.model.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.model)
    return model


def recover(student, teacher, train_text, steps: int, distill: bool, context: int):
    """``steps`` of AdamW (cosine from 1e-3) with the structure fixed: the next-byte loss,
    plus the KL from the dense teacher's logits when ``distill``."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    student.train()
    for inputs, targets in random_batches(train_text, steps, 16, context, seed=7):
        logits = student(inputs)
        loss = lm_loss(logits, targets)
        if distill:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = 0.5 * loss + 0.5 * F.kl_div(F.log_softmax(logits, -1).flatten(0, 1),
                                               F.log_softmax(teacher_logits, -1).flatten(0, 1),
                                               log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return student


def kept_importance(importance: dict[str, torch.Tensor], sparse) -> float:
    """The fraction of the Wanda importance (``wanda_importance``) the sparse layers keep,
    over all of them."""
    kept = total = 0.0
    for name, module in sparse.named_modules():
        if isinstance(module, sparsefx.SparseLinear) and name in importance:
            kept += float(importance[name][module.kept_mask()].sum())
            total += float(importance[name].sum())
    return kept / total


def wanda_importance(dense, calibration) -> dict[str, torch.Tensor]:
    """Every linear layer's ``|W| * ||X_j||`` (the dense model's inputs), by name."""
    norms, hooks = {}, []
    for name, module in dense.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(module, args, name=name):
                rows = args[0].reshape(-1, args[0].shape[-1]).double()
                norms[name] = norms.get(name, 0) + rows.square().sum(0)
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in calibration:
            dense(batch)
    for handle in hooks:
        handle.remove()
    return {name: wanda_scores(dense.get_submodule(name).weight, norm)
            for name, norm in norms.items()}


def diagonal_bound(importance: dict[str, torch.Tensor], names, density: float) -> float:
    """The most of the importance any structure keeps in which every row keeps
    ``density`` of its inputs and every input is kept by ``density`` of the rows: a
    transportation problem (an LP with an integral optimum). Every diagonal structure at that
    density, under any permutation of inputs and outputs, is such a structure, so none keeps
    more."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix
    kept = total = 0.0
    for name in names:
        scores = importance[name].numpy()
        out, inn = scores.shape
        cells = np.arange(out * inn)
        rows, cols = cells // inn, cells % inn
        constraints = coo_matrix((np.ones(2 * out * inn), (np.concatenate([rows, out + cols]),
                                                           np.tile(cells, 2))),
                                 shape=(out + inn, out * inn))
        sums = np.concatenate([np.full(out, round(density * inn)),
                               np.full(inn, round(density * out))])
        result = linprog(-scores.ravel(), A_eq=constraints, b_eq=sums, bounds=(0, 1),
                         method="highs")
        kept, total = kept - result.fun, total + scores.sum()
    return kept / total


def lm_table(args) -> dict:
    train_text, validation_text, source = stdlib_text(args.text_bytes)
    context = args.model_config["context"]
    dense = train_dense(args, train_text).eval()
    calibration = [next(random_batches(train_text, 1, args.calibration_batch, context,
                                       seed=1000 + i))[0]
                   for i in range(args.calibration_batches)]
    dense_loss = validation_loss(dense, validation_text, context)
    print(f"dense: validation loss {dense_loss:.3f} nats/byte")
    importance = wanda_importance(dense, calibration)
    rows = []
    for pattern, sparsity, nm in args.cells:
        variants = [(init, False) for init in INITS]
        if pattern in PERMUTABLE:
            variants += [(init, True) for init in INITS]
        for init, permute in variants:
            started = time.perf_counter()
            sparse = sparsefx.transform(
                dense, pattern, sparsity if sparsity is not None else 0.5,
                nm=nm or (2, 4), init=init, permute=permute, keep_last_dense=True,
                calibration=None if init == "magnitude" else calibration, progress=False)
            seconds = time.perf_counter() - started
            row = dict(cell=label(pattern, sparsity, nm), pattern=pattern, sparsity=sparsity,
                       nm=list(nm) if nm else None, init=init, permute=permute,
                       one_shot=validation_loss(sparse, validation_text, context),
                       kept_importance=kept_importance(importance, sparse),
                       transform_seconds=seconds)
            rows.append(row)
            row["_model"] = sparse
            print(f"{row['cell']:>16} {init:>9}{' +perm' if permute else '      '}: "
                  f"{row['one_shot']:.3f}  (keeps {row['kept_importance']:.1%} of the "
                  f"calibrated importance; {seconds:.1f} s)")
    # recovery: magnitude and the best calibrated variant of each cell
    for cell in dict.fromkeys(row["cell"] for row in rows):
        mine = [row for row in rows if row["cell"] == cell]
        best = min((row for row in mine if row["init"] != "magnitude"),
                   key=lambda row: row["one_shot"])
        plain = next(row for row in mine if row["init"] == "magnitude" and not row["permute"])
        for row in (plain, best):
            row["recovered"] = validation_loss(recover(
                row["_model"], dense, train_text, args.recovery_steps, True, context),
                validation_text, context)
            print(f"{cell:>16} {row['init']:>9}{' +perm' if row['permute'] else '      '}: "
                  f"recovered {row['recovered']:.3f}")
        if cell in ("diag 50%", "nm 2:4"):
            best_model = sparsefx.transform(
                dense, best["pattern"], best["sparsity"] or 0.5,
                nm=tuple(best["nm"] or (2, 4)), init=best["init"], permute=best["permute"],
                keep_last_dense=True, calibration=calibration, progress=False)
            best["recovered_plain"] = validation_loss(recover(
                best_model, dense, train_text, args.recovery_steps, False, context),
                validation_text, context)
    bound = None
    for row in rows:
        sparse = row.pop("_model")
        if row["cell"] == "diag 50%" and row["init"] == "wanda" and row["permute"]:
            names = [name for name, module in sparse.named_modules()
                     if isinstance(module, sparsefx.SparseLinear)]
            bound = diagonal_bound(importance, names, 0.5)
    return dict(dense_loss=dense_loss, rows=rows, diag50_bound=bound, text=source,
                steps=args.steps,
                recovery_steps=args.recovery_steps, model=args.model_config,
                calibration=f"{args.calibration_batches} x {args.calibration_batch} windows "
                            f"of {context} bytes")


def targets(table: dict) -> list[str]:
    dense, rows = table["dense_loss"], table["rows"]
    lines = []

    def cell(name):
        return [row for row in rows if row["cell"] == name]

    for name in ("nm 2:4", "diag 50%"):
        mine = cell(name)
        if not mine:
            continue
        magnitude = next(r for r in mine if r["init"] == "magnitude" and not r["permute"])
        best = min((r for r in mine if r["init"] != "magnitude"), key=lambda r: r["one_shot"])
        gap = magnitude["one_shot"] - dense
        closed = (magnitude["one_shot"] - best["one_shot"]) / gap if gap > 0 else 1.0
        lines.append(f"{name}: the best calibrated init ({best['init']}"
                     f"{' +perm' if best['permute'] else ''}) closes {closed:.0%} of the "
                     f"magnitude-dense gap one-shot ({magnitude['one_shot']:.3f} -> "
                     f"{best['one_shot']:.3f}, dense {dense:.3f}): target 60 %, "
                     f"{'MET' if closed >= 0.6 else 'MISSED'}")
        recovered = min(r.get("recovered", math.inf) for r in mine)
        lines.append(f"{name}: after recovery {recovered:.3f}, {recovered / dense - 1:+.1%} of "
                     f"dense: target within 5 %, "
                     f"{'MET' if recovered <= 1.05 * dense else 'MISSED'}")
    mine = cell("diag 50%")
    if mine:
        magnitude = next(r for r in mine if r["init"] == "magnitude" and not r["permute"])
        permuted = max((r for r in mine if r["permute"] and r["init"] != "magnitude"),
                       key=lambda r: r["kept_importance"])
        fastest = min((r for r in mine if r["permute"]), key=lambda r: r["one_shot"])
        halfway = (magnitude["one_shot"] - fastest["one_shot"]) / max(
            magnitude["one_shot"] - dense, 1e-12)
        lines.append(f"diag 50% with permutation ({permuted['init']}): keeps "
                     f"{permuted['kept_importance']:.1%} of the calibrated importance "
                     f"(magnitude without: {magnitude['kept_importance']:.1%}): target 80 %, "
                     f"{'MET' if permuted['kept_importance'] >= 0.8 else 'MISSED'}"
                     + ("" if table.get("diag50_bound") is None else
                        " (no structure of 50 % diagonal degrees, whatever the input and "
                        "output permutations, keeps more than "
                        f"{table['diag50_bound']:.1%}: `diagonal_bound`)")
                     + f"; the best permuted one-shot ({fastest['init']} +perm) "
                     f"{fastest['one_shot']:.3f}, {halfway:.0%} of the way from magnitude to "
                     f"dense: target 50 %, {'MET' if halfway >= 0.5 else 'MISSED'}")
    return lines


def markdown(table: dict, hf: dict | None) -> str:
    inits = [(init, False) for init in INITS] + [(init, True) for init in INITS]
    header = ("| cell | " + " | ".join(f"{i}{' +perm' if p else ''}" for i, p in inits)
              + " | recovered: magnitude | recovered: best |")
    lines = [f"Dense validation loss {table['dense_loss']:.3f} nats/byte (byte-level LM "
             f"{table['model']}, {table['steps']} steps on {table['text']}); calibration "
             f"{table['calibration']}; recovery {table['recovery_steps']} steps, distilled. "
             "One-shot validation loss (nats/byte), lower is better; `-`: not applicable.",
             "", header, "|" + "---|" * (len(inits) + 3)]
    for cell in dict.fromkeys(row["cell"] for row in table["rows"]):
        mine = {(r["init"], r["permute"]): r for r in table["rows"] if r["cell"] == cell}
        values = [f"{mine[k]['one_shot']:.3f}" if k in mine else "-" for k in inits]
        recovered = [r for r in mine.values() if "recovered" in r]
        plain = next(r["recovered"] for r in recovered if r["init"] == "magnitude")
        best = [r for r in recovered if r["init"] != "magnitude"][0]
        extra = (f" ({best['recovered_plain']:.3f} without distillation)"
                 if "recovered_plain" in best else "")
        lines.append(f"| {cell} | " + " | ".join(values) + f" | {plain:.3f} | "
                     f"{best['recovered']:.3f} ({best['init']}"
                     f"{' +perm' if best['permute'] else ''}){extra} |")
    lines += ["", "Calibrated importance kept (Wanda's `|W| * ||X||`, every sparse layer):", "",
              "| cell | " + " | ".join(f"{i}{' +perm' if p else ''}" for i, p in inits) + " |",
              "|" + "---|" * (len(inits) + 1)]
    for cell in dict.fromkeys(row["cell"] for row in table["rows"]):
        mine = {(r["init"], r["permute"]): r for r in table["rows"] if r["cell"] == cell}
        lines.append(f"| {cell} | " + " | ".join(
            f"{mine[k]['kept_importance']:.1%}" if k in mine else "-" for k in inits) + " |")
    lines += ["", "Targets:", ""] + [f"- {line}" for line in targets(table)]
    if hf:
        lines += ["", "Hugging Face models from configs:", ""] + [f"- {line}" for line in hf["lines"]]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    patterns = ["diag", "blockdiag", "fanin", "unstructured"]
    figure, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 3.4),
                                sharey=True)
    for axis, pattern in zip(axes, patterns):
        rows = [r for r in table["rows"] if r["pattern"] == pattern]
        for init, permute in [(i, p) for p in (False, True) for i in INITS]:
            points = sorted((r["sparsity"], r["one_shot"]) for r in rows
                            if r["init"] == init and r["permute"] == permute)
            if points:
                axis.plot(*zip(*points), marker="o", linestyle="--" if permute else "-",
                          color=f"C{INITS.index(init)}",
                          label=f"{init}{' +perm' if permute else ''}")
        axis.axhline(table["dense_loss"], color="black", linewidth=0.8, label="dense")
        axis.set_title(pattern)
        axis.set_xlabel("sparsity")
    axes[0].set_ylabel("one-shot validation loss (nats/byte)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


class PeakRSS:
    """The largest resident set size while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def hugging_face(args) -> dict:
    """GPT-2 and Llama from small configs: calibrate, transform, generate, tokens equal to
    the densified model's; then a GPT-2-small-shaped model's calibration timed and its peak
    memory measured."""
    import transformers
    lines = []
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids[i:i + 2]} for i in range(0, 4, 2)]
    configs = {
        "GPT-2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                                         n_positions=64, bos_token_id=0, eos_token_id=0),
        "Llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=512,
                                          max_position_embeddings=64, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0)}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        for init, pattern in (("wanda", "nm"), ("sparsegpt", "diag")):
            sparse = sparsefx.transform(model, pattern, 0.5, init=init, permute=True,
                                        calibration=calibration, progress=False)
            dense = sparsefx.densify(sparse)
            prompt = ids[:1, :8]
            options = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                got = sparse.generate(prompt, **options)
                expected = dense.generate(prompt, **options)
            same = torch.equal(got, expected)
            lines.append(f"{name} {pattern} {init} (+perm where diagonal): generate() gives "
                         f"{got.shape[1] - prompt.shape[1]} tokens, "
                         f"{'equal to' if same else 'DIFFERENT from'} the densified model's")
            if not same:
                raise SystemExit(lines[-1])
    if args.gpt2_small:
        torch.manual_seed(0)
        config = transformers.GPT2Config()
        model = transformers.GPT2LMHeadModel(config).eval()
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        tokens = torch.randint(0, config.vocab_size, (8, 128),
                               generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": tokens[i:i + 2]} for i in range(0, 8, 2)]
        widest = 4 * config.n_embd
        for init in ("wanda", "sparsegpt"):
            before = _rss()
            with PeakRSS() as peak:
                started = time.perf_counter()
                sparse = sparsefx.transform(model, "diag", 0.5, init=init,
                                            calibration=batches, progress=False)
                seconds = time.perf_counter() - started
            lines.append(
                f"GPT-2 small (124 M, random weights) diag 50 % {init}, calibration 8 x 128 "
                f"tokens: {seconds:.0f} s; peak resident memory {(peak.peak - before) / 2**20:.0f}"
                f" MiB over the {dense_bytes / 2**20:.0f} MiB dense model already held (its "
                f"working copy is {dense_bytes / 2**20:.0f} MiB; the largest Hessian, "
                f"{widest} x {widest} float64, {widest * widest * 8 / 2**20:.0f} MiB)")
            print(lines[-1])
            del sparse
    for line in lines:
        print(line)
    return dict(lines=lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny: every path, in seconds")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--model", type=Path, default=None,
                        help="the dense model's state dict (trained and saved if missing)")
    parser.add_argument("--hf", action="store_true", help="GPT-2 and Llama from configs")
    parser.add_argument("--gpt2-small", action="store_true",
                        help="with --hf: time a GPT-2-small-shaped calibration")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {RESULTS} (--quick: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.model_config = dict(MODEL)
    args.text_bytes, args.cells = 2_000_000, CELLS
    args.calibration_batches, args.calibration_batch = 16, 16
    if args.quick:
        args.model_config = dict(dim=32, depth=1, context=16)
        args.steps, args.recovery_steps, args.text_bytes = 30, 5, 100_000
        args.cells = [("diag", 0.5, None), ("fanin", 0.7, None), ("nm", None, (2, 4))]
        args.calibration_batches, args.calibration_batch = 2, 4
    quick = "_quick" if args.quick else ""
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="sparsefx-pretrained-")) if args.quick \
            else RESULTS
    args.model = args.model or Path(os.environ.get("TMPDIR", "/tmp")) / \
        f"sparsefx_pretrained_lm{quick}.pt"
    table = lm_table(args)
    hf = hugging_face(args) if args.hf else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained.json").write_text(json.dumps(
        dict(machine=machine(), command="python examples/pretrained.py"
             + (" --quick" if args.quick else "") + (" --hf" if args.hf else "")
             + (" --gpt2-small" if args.gpt2_small else ""), lm=table, hf=hf), indent=1))
    text = markdown(table, hf)
    (args.out / "pretrained.md").write_text(text)
    plot(table, args.out / "pretrained.png")
    print(text)


if __name__ == "__main__":
    main()
