"""Real architectures on the CPU: HF GPT-2 small and ViT-B/16, each dense, sparse
(sparsefx) and ideal-sparse (``ideal_sparse.py``), timed side by side.

Models are built from their configs (``GPT2LMHeadModel(GPT2Config())``,
``ViTForImageClassification(ViTConfig(num_labels=1000))``) with random weights; nothing is
downloaded. Workloads, each timed eager and under ``torch.compile``:

* GPT-2 decode: one token at batch 1 on a KV cache of ``past`` tokens; the cache is cropped
  back after every call so each call sees the same length. The transformer body
  (``model.transformer``) and the whole model (its lm_head is tied to the embedding, so it
  stays dense) are timed separately.
* GPT-2 prefill: ``prompt`` tokens at batch 1 through the whole model, building the cache
  and the last position's logits only (as ``generate`` does).
* GPT-2 training step: batch x seq tokens, LM loss, backward, ``AdamW.step()`` and (sparse
  models) ``DST.step()``.
* ViT inference at two batch sizes and a training step (cross-entropy on 1000 classes, the
  classifier kept dense with ``keep_last_dense=True``; the patch embedding is a Conv2d and
  stays dense too).

Timed training steps are plain steps: DST is built with an update interval longer than the
run, so no step does a structure update or an armed (growth-gradient) backward. What those
add, amortised over ``delta_t`` steps, is ``bench_dst_overhead.py``'s measurement. DST's
every-step work (DynaDiag's gates and importance Adam, SRigL's ablation hold) is included.
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsefx
from common import Candidate, fmt, interleaved, machine_line, markdown_table, median_ratio, \
    median_time
from ideal_sparse import IdealSparseLinear, ideal_sparse, sparsified_layers
from sparsefx.registry import pattern_named

# (pattern, sparsity, DST method): each pattern's own method (SRigL is fan-in only, so N:M
# trains with RigL)
PATTERNS = {"diag": ("diag", 0.9, "dynadiag"), "fanin": ("fanin", 0.9, "srigl"),
            "nm": ("nm", 0.5, "rigl")}
# fraction of the ideal speed-up each pattern should reach (SPEC section 6)
TARGETS = {"byte-bound": {"diag": 0.85, "fanin": 0.7, "nm": 0.7},
           "compute-bound": {"diag": 0.55, "fanin": 0.45, "nm": 0.45}}


@dataclass
class Variant:
    """One version of a model: dense, sparse (a pattern) or the ideal-sparse reference."""

    label: str                       # "dense", "diag 90%", "ideal diag 90%/fanin 90%", ...
    kind: str                        # "dense" | "sparse" | "ideal"
    model: nn.Module
    pattern: str | None = None       # sparse: its PATTERNS key
    ideal: str | None = None         # sparse: label of its ideal reference
    dst_method: str | None = None
    training_state: dict = field(default_factory=dict)  # optimizer and DST, built once


def _takes_nm(key: str) -> bool:
    return pattern_named(PATTERNS[key][0]).takes_nm


def _label(key: str) -> str:
    pattern, sparsity, _ = PATTERNS[key]
    return f"{pattern} 2:4" if _takes_nm(key) else f"{pattern} {sparsity:.0%}"


def build_variants(dense: nn.Module, patterns: list[str], **transform_options) -> list[Variant]:
    """Dense, one ideal reference per distinct set of sparsified layer shapes (diag and fan-in
    at 90 % store the same weights per layer in GPT-2 and ViT-B, so they share theirs), and
    each sparse pattern."""
    sparse, groups = [], {}
    for key in patterns:
        pattern, sparsity, method = PATTERNS[key]
        model = sparsefx.transform(dense, pattern=pattern, sparsity=sparsity,
                                   **transform_options)
        layers = sparsified_layers(model)
        variant = Variant(_label(key), "sparse", model, pattern=key,
                          dst_method=method)
        sparse.append(variant)
        groups.setdefault(tuple(sorted(layers.items())), (layers, model, []))[2].append(variant)
    ideals = []
    for layers, model, served in groups.values():
        label = "ideal " + "/".join(v.label for v in served)  # e.g. "ideal diag 90%/fanin 90%"
        ideal = ideal_sparse(dense, model)
        check_ideal(ideal, layers)
        ideals.append(Variant(label, "ideal", ideal))
        for variant in served:
            variant.ideal = label
    return [Variant("dense", "dense", dense), *ideals, *sparse]


def check_ideal(ideal: nn.Module, layers: dict[str, tuple[int, int, int]]) -> None:
    """The ideal reference replaces exactly the sparsified layers, at their shapes."""
    found = {name: (m.in_features, m.out_features, m.compact.out_features)
             for name, m in ideal.named_modules() if isinstance(m, IdealSparseLinear)}
    # a Conv1D site is named by its weight; the ideal layer replaces the whole Conv1D
    expected = {name.removesuffix(".weight"): shape for name, shape in layers.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise AssertionError(f"ideal reference mismatch: missing {missing[:3]}, extra "
                             f"{extra[:3]}, or different shapes")


def compile_model(module: nn.Module) -> nn.Module:
    # static shapes: every workload has its own fixed shapes, and a dynamic-batch graph
    # would be a different (slower) program than the one a deployment would compile
    return torch.compile(module, dynamic=False)


# ------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """One timed job, built for every variant eager and compiled."""

    model: str                       # "gpt2" | "vit"
    name: str
    bound: str                       # "byte-bound" | "compute-bound": which targets apply
    build: Callable[[Variant, bool], Callable[[], object]]
    training: bool = False
    heavy: bool = False              # seconds a call: N:M (slow at 50 %) only on request


def optimizer_and_dst(variant: Variant):
    if not variant.training_state:
        optimizer = torch.optim.AdamW(variant.model.parameters(), lr=1e-4)
        dst = None
        if variant.kind == "sparse":
            # an interval longer than the run: every timed step is a plain step (see the
            # module docstring); total_steps keeps DynaDiag's gates soft, as mid-training
            dst = sparsefx.DST(variant.model, optimizer, method=variant.dst_method,
                               total_steps=10**9, delta_t=10**9)
        variant.training_state.update(optimizer=optimizer, dst=dst)
    return variant.training_state["optimizer"], variant.training_state["dst"]


def gpt2_workloads(config, past: int, prompt: int, train_batch: int, train_seq: int
                   ) -> list[Workload]:
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    tokens = lambda *shape: torch.randint(0, config.vocab_size, shape, generator=generator)
    history, next_token = tokens(1, past), tokens(1, 1)
    prompt_ids, train_ids = tokens(1, prompt), tokens(train_batch, train_seq)

    def decode(whole_model: bool):
        def build(variant: Variant, compiled: bool):
            model = variant.model if whole_model else variant.model.transformer
            run = compile_model(model) if compiled else model
            cache = DynamicCache(config=config)
            with torch.no_grad():  # the cache is filled once, outside the timing
                variant.model.transformer(history, cache=cache, use_cache=True)

            @torch.no_grad()
            def step():
                out = run(next_token, cache=cache, use_cache=True)
                cache.crop(-(cache.get_seq_length() - past))  # back to `past` tokens
                return out
            return step
        return build

    def prefill(variant: Variant, compiled: bool):
        run = compile_model(variant.model) if compiled else variant.model

        @torch.no_grad()
        def step():
            return run(prompt_ids, use_cache=True, logits_to_keep=1)
        return step

    def train(variant: Variant, compiled: bool):
        run = compile_model(variant.model) if compiled else variant.model
        optimizer, dst = optimizer_and_dst(variant)

        def step():
            optimizer.zero_grad(set_to_none=True)
            run(train_ids, labels=train_ids).loss.backward()
            optimizer.step()
            if dst is not None:
                dst.step()
        return step

    return [Workload("gpt2", f"decode b1, past {past}: body", "byte-bound", decode(False)),
            Workload("gpt2", f"decode b1, past {past}: whole model", "byte-bound",
                     decode(True)),
            Workload("gpt2", f"prefill b1 x {prompt}", "compute-bound", prefill),
            Workload("gpt2", f"training step {train_batch}x{train_seq}", "compute-bound",
                     train, training=True, heavy=True)]


def vit_workloads(config, batches: list[int], train_batch: int) -> list[Workload]:
    generator = torch.Generator().manual_seed(0)
    images = lambda batch: torch.randn(batch, config.num_channels, config.image_size,
                                       config.image_size, generator=generator)

    def infer(batch: int):
        pixels = images(batch)

        def build(variant: Variant, compiled: bool):
            run = compile_model(variant.model) if compiled else variant.model
            return torch.no_grad()(lambda: run(pixels))
        return build

    pixels = images(train_batch)
    labels = torch.randint(0, config.num_labels, (train_batch,), generator=generator)

    def train(variant: Variant, compiled: bool):
        run = compile_model(variant.model) if compiled else variant.model
        optimizer, dst = optimizer_and_dst(variant)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(run(pixels).logits, labels).backward()
            optimizer.step()
            if dst is not None:
                dst.step()
        return step

    return [*(Workload("vit", f"inference b{b}", "compute-bound", infer(b), heavy=b > 1)
              for b in batches),
            Workload("vit", f"training step b{train_batch}", "compute-bound", train,
                     training=True, heavy=True)]


# ---------------------------------------------------------------------------------- run


def run_workload(workload: Workload, variants: list[Variant], modes: list[str],
                 skip: Callable[[Variant, str], str], rounds: int, min_run_time: float,
                 progress) -> list[dict]:
    """Time every (variant, mode) of one workload, interleaved; one row each. ``skip``
    returns why a (variant, mode) is left out, or ""."""
    for variant in variants:
        variant.model.train(workload.training)
    candidates = {}
    for mode in modes:
        for variant in variants:
            name = f"{variant.label} [{mode}]"
            reason = skip(variant, mode)
            candidates[(variant.label, mode)] = (
                Candidate(name, None, skipped=reason) if reason else
                Candidate(name, workload.build(variant, mode == "compiled"),
                          warmup=2 if mode == "compiled" else 1))
    interleaved(list(candidates.values()), rounds, min_run_time, log=progress)
    torch._dynamo.reset()  # drop this workload's compiled graphs (memory, guard lists)

    rows = []
    for mode in modes:
        dense = candidates[("dense", mode)]
        for variant in variants:
            candidate = candidates[(variant.label, mode)]
            row = dict(model=workload.model, workload=workload.name, bound=workload.bound,
                       variant=variant.label, kind=variant.kind, mode=mode,
                       skipped=candidate.skipped, note=candidate.note,
                       ms=1e3 * median_time(candidate),
                       rounds_ms=[1e3 * t for t in candidate.times],
                       warmup_s=candidate.warmup_s,
                       speedup_vs_dense=median_ratio(dense, candidate))
            if variant.kind == "sparse":
                ideal = candidates[(variant.ideal, mode)]
                target = TARGETS[workload.bound][variant.pattern]
                fraction = median_ratio(ideal, candidate)  # t_ideal / t_sparse
                row.update(ideal=variant.ideal, ideal_ms=1e3 * median_time(ideal),
                           ideal_speedup=median_ratio(dense, ideal),
                           fraction_of_ideal=fraction, target=target,
                           met=None if math.isnan(fraction) else bool(fraction >= target))
            rows.append(row)
        mode_rows = rows[-len(variants):]
        reasons = {r["skipped"] for r in mode_rows}
        if len(reasons) == 1 and "" not in reasons:  # the whole mode left out: one line
            progress(f"{workload.model:4s} {workload.name:30s} {mode:8s} skipped: "
                     f"{reasons.pop()}")
            continue
        for row in mode_rows:
            progress(_progress_line(row))
    return rows


def _progress_line(row: dict) -> str:
    line = f"{row['model']:4s} {row['workload']:30s} {row['mode']:8s} {row['variant']:28s} "
    if row["skipped"]:
        return line + f"skipped: {row['skipped']}"
    line += f"{row['ms']:10.2f} ms  {row['speedup_vs_dense']:5.2f}x vs dense"
    if row["kind"] == "sparse":
        line += (f"  ideal {row['ideal_speedup']:5.2f}x  fraction of ideal "
                 f"{row['fraction_of_ideal']:.2f} (target {row['target']:.2f})")
    if row["mode"] == "compiled":
        line += f"  [warm-up {row['warmup_s']:.0f} s]"
    return line + (f"  ({row['note']})" if row["note"] else "")


def run(args, progress) -> dict:
    """The whole models section; returns the JSON payload."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    modes = ["eager", "compiled"]
    compile_skip = "" if args.compile else "--no-compile"
    if args.quick:
        compile_skip = "--quick (compiling takes tens of seconds per model)"
        gpt2_config = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=512, n_positions=64,
                                 bos_token_id=0, eos_token_id=0)
        vit_config = ViTConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                               intermediate_size=256, image_size=32, patch_size=8,
                               num_labels=10)
        gpt2_sizes = dict(past=16, prompt=16, train_batch=2, train_seq=16)
        vit_sizes = dict(batches=[1, 4], train_batch=4)
    else:
        gpt2_config, vit_config = GPT2Config(), ViTConfig(num_labels=1000)  # ImageNet head
        if args.depth:
            gpt2_config.n_layer = vit_config.num_hidden_layers = args.depth
        gpt2_sizes = dict(past=args.past, prompt=args.prompt, train_batch=args.train_batch,
                          train_seq=args.train_seq)
        vit_sizes = dict(batches=[1, 32], train_batch=32)

    rows, variants_info, seconds = [], {}, {}
    for family in args.model_families:
        torch.manual_seed(0)
        if family == "gpt2":
            dense = GPT2LMHeadModel(gpt2_config)
            workloads = gpt2_workloads(gpt2_config, **gpt2_sizes)
            variants = build_variants(dense, args.patterns)
        else:
            dense = ViTForImageClassification(vit_config)
            workloads = vit_workloads(vit_config, **vit_sizes)
            variants = build_variants(dense, args.patterns, keep_last_dense=True)
        variants_info[family] = describe(variants)
        check_outputs(family, variants, gpt2_config if family == "gpt2" else vit_config)
        for workload in workloads:  # inference first: DST (built for training) adds gates
            if workload.training and args.skip_training:
                continue

            def skip(variant: Variant, mode: str, workload=workload) -> str:
                if mode == "compiled" and compile_skip:
                    return compile_skip
                nm_only = (variant.pattern and _takes_nm(variant.pattern)) or (
                    variant.kind == "ideal" and all(_takes_nm(v.pattern) for v in variants
                                                    if v.ideal == variant.label))
                if workload.heavy and nm_only and not args.nm_everywhere:
                    return ("N:M left out of the slow workloads to save time "
                            "(--nm-everywhere)")
                return ""
            slow = family == "vit" and workload.training
            progress(f"{family}: {workload.name}, {len(variants)} variants x {len(modes)} "
                     "modes, interleaved")
            begin = time.perf_counter()
            rows += run_workload(workload, variants, modes, skip,
                                 rounds=min(args.rounds, args.slow_rounds) if slow else
                                 args.rounds, min_run_time=args.min_run_time, progress=progress)
            seconds[f"{family}: {workload.name}"] = time.perf_counter() - begin
            progress(f"{family}: {workload.name}: {seconds[f'{family}: {workload.name}']:.0f} s")
        del variants, dense
        gc.collect()  # the next family's models (and their optimizer states) need the room
    return dict(rows=rows, variants=variants_info, workload_seconds=seconds,
                configs=dict(gpt2=gpt2_config.to_dict() if "gpt2" in args.model_families
                             else None,
                             vit=vit_config.to_dict() if "vit" in args.model_families else None,
                             gpt2_sizes=gpt2_sizes, vit_sizes=vit_sizes))


def describe(variants: list[Variant]) -> list[dict]:
    """Per variant: parameters, and for sparse ones how many layers became sparse."""
    out = []
    for variant in variants:
        info = dict(label=variant.label, kind=variant.kind,
                    params=sum(p.numel() for p in variant.model.parameters()))
        if variant.kind == "sparse":
            report = sparsefx.report(variant.model)
            info.update(sparse_layers=sum(r.pattern != "dense" for r in report),
                        dense_layers=[f"{r.name} ({r.note})" for r in report
                                      if r.pattern == "dense"],
                        dst_method=variant.dst_method, ideal=variant.ideal)
        out.append(info)
    return out


@torch.no_grad()
def check_outputs(family: str, variants: list[Variant], config) -> None:
    """Every variant runs and returns what dense returns, shape for shape."""
    if family == "gpt2":
        x = torch.randint(0, config.vocab_size, (2, 8))
        shape = lambda model: model(x).logits.shape
    else:
        x = torch.randn(2, config.num_channels, config.image_size, config.image_size)
        shape = lambda model: model(x).logits.shape
    shapes = {}
    for variant in variants:
        variant.model.eval()
        shapes[variant.label] = shape(variant.model)
    if len(set(shapes.values())) != 1:
        raise AssertionError(f"{family}: output shapes differ: {shapes}")


# ------------------------------------------------------------------------------ markdown


def compiled_vs_eager(rows: list[dict]) -> list[str]:
    """The "compiled never slower than eager" check: eager ms / compiled ms per model,
    workload and variant (medians of the same run; > 1 means compiling helped)."""
    timed = {(r["model"], r["workload"], r["variant"], r["mode"]): r for r in rows
             if not r["skipped"]}
    table = []
    for (model, workload, variant, mode), eager in timed.items():
        compiled = timed.get((model, workload, variant, "compiled"))
        if mode != "eager" or compiled is None:
            continue
        gain = eager["ms"] / compiled["ms"]
        verdict = ("—" if eager["kind"] != "sparse" else  # the baselines: context only
                   "**met**" if gain >= 1 else "**missed**")
        table.append([model, workload, variant, fmt(eager["ms"], ".2f"),
                      fmt(compiled["ms"], ".2f"), f"{gain:.2f}x", verdict])
    if not table:
        return []
    return (["Compiled against eager, medians of the same run (target, for the sparsefx rows: "
             "compiled never slower; the dense and ideal rows show what Inductor does to the "
             "parts sparsefx leaves alone):", ""]
            + markdown_table(["model", "workload", "variant", "eager ms", "compiled ms",
                              "eager / compiled", "target"], table, "lllrrrl") + [""])


def markdown(payload: dict, info: dict) -> str:
    sizes = payload["configs"]
    lines = ["# Real architectures: dense vs sparsefx vs ideal-sparse (CPU)", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {machine_line(info)}.  ",
             f"Method: {payload['method']}  ",
             f"Run time: {payload['seconds'] / 60:.1f} min.", "",
             "- **Ideal-sparse**: each layer sparsefx sparsified replaced by a dense "
             "`nn.Linear` with `ceil((1 - s) * out)` rows whose output is repeated to `out` "
             "(the sparse layer's bytes and FLOPs at dense-GEMM efficiency, no overhead); "
             "everything else is the dense model.",
             "- **Fraction of ideal** = t_ideal / t_sparse (median of per-round ratios). "
             "Speed-ups are against the dense model in the same mode (eager or compiled).",
             "- **Targets**: decode at batch 1 diag >= 0.85, fan-in >= 0.7 of the ideal; "
             "prefill, ViT inference and training steps diag >= 0.55, fan-in >= 0.45 (N:M is "
             "held to the fan-in targets).",
             f"- **Workloads**: GPT-2 decode is one token at batch 1 on a KV cache of "
             f"{sizes['gpt2_sizes']['past']} tokens (cropped back after every call); the body is "
             "`model.transformer`, the whole model adds the tied, dense lm_head. Prefill is "
             f"{sizes['gpt2_sizes']['prompt']} tokens at batch 1 with the cache and the last "
             "logits only. Training steps are forward, backward, `AdamW.step()` and, for "
             "sparse models, `DST.step()` (plain steps: no structure update falls in the "
             "timing; `bench_dst_overhead.py` measures what updates add). `torch.compile` "
             "runs with static shapes; its warm-up (compiling) is not timed.", ""]
    for family, variants in payload["variants"].items():
        for v in variants:
            if v["kind"] == "sparse":
                lines.append(f"- {family} {v['label']}: {v['sparse_layers']} sparse layers, "
                             f"DST {v['dst_method']}; left dense: "
                             f"{', '.join(v['dense_layers']) or 'none'}")
    lines.append("")
    rows = payload["rows"]
    table, verdicts = [], []
    for r in (r for r in rows if r["kind"] == "sparse"):
        dense = next(d for d in rows if d["workload"] == r["workload"] and d["model"] ==
                     r["model"] and d["mode"] == r["mode"] and d["kind"] == "dense")
        if r["skipped"]:
            table.append([r["model"], r["workload"], r["mode"], r["variant"],
                          f"skipped: {r['skipped']}", "", "", "", "", "", ""])
            continue
        verdict = "—" if r["met"] is None else ("**met**" if r["met"] else "**missed**")
        if r["note"]:
            verdict += f" ({r['note']})"
        verdicts.append(r["met"])
        table.append([r["model"], r["workload"], r["mode"], r["variant"],
                      fmt(dense["ms"], ".2f"), fmt(r["ideal_ms"], ".2f"), fmt(r["ms"], ".2f"),
                      fmt(r["speedup_vs_dense"], ".2f") + "x",
                      fmt(r["ideal_speedup"], ".2f") + "x",
                      f"{fmt(r['fraction_of_ideal'], '.3f')} (>= {r['target']:.2f})", verdict])
    lines += markdown_table(["model", "workload", "mode", "sparse", "dense ms", "ideal ms",
                             "sparse ms", "speed-up vs dense", "ideal speed-up",
                             "fraction of ideal", "target"], table, "llllrrrrrrl")
    lines += ["", f"Targets met: {sum(v is True for v in verdicts)} of {len(verdicts)} "
              "measured rows.", ""]
    lines += compiled_vs_eager(rows)
    lines += ["Time per workload (warm-up and compiling included):", ""]
    lines += markdown_table(["workload", "s"], [[name, f"{seconds:.0f}"] for name, seconds in
                                                payload["workload_seconds"].items()], "lr")
    return "\n".join(lines) + "\n"
