"""One sparse linear layer on the CPU against dense ``F.linear`` and CSR, over the shapes of
GPT-2 / ViT-B blocks and a 4096x4096 layer.

Per (shape, batch, pass) the candidates are: dense ``F.linear``; for each pattern (diag and
fan-in at 80/90/95 %, N:M 2:4) the sparsefx op and PyTorch's CSR matmul on the same weights
(int32 indices, built once outside the timing, as if cached until the structure changes;
its backward is a CSR product with ``W.T`` plus ``sampled_addmm`` for the values). All of
one cell are timed interleaved (``common.interleaved``).

Bytes each candidate must move, for the GB/s columns: the weight side (dense ``out*in*4``;
diag ``K*L*4`` values + ``K*8`` offsets; fan-in ``out*k*(4 + index bytes)``, int16 ids below
2**15 inputs; CSR ``nnz*(4+4) + (out+1)*4``) plus the activations ``batch*(in+out)*4``. The
forward+backward pass is three such products (forward, input gradient, weight gradient),
each moving the weight side once and two activation-sized tensors: 3x the forward bytes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sparsefx  # noqa: F401  (registers torch.ops.sparsefx)
from common import Candidate, fmt, interleaved, machine_line, markdown_table, median_ratio, \
    median_time
from sparsefx.kernels import patterns

SHAPES = [(768, 768), (2304, 768), (3072, 768), (768, 3072), (1024, 1024), (4096, 4096)]
BATCHES = [1, 8, 32, 256]
SPARSITIES = [0.8, 0.9, 0.95]
PASSES = ["forward", "forward+backward"]


@dataclass
class SparseWeight:
    """One pattern's weights for one shape: how the op and CSR each get them."""

    label: str                  # "diag 90%", "nm 2:4", ...
    op: Callable                # (x, values, structure) -> y, the pattern's sparsefx op
    values: torch.Tensor
    structure: torch.Tensor     # diag offsets [K] or fan-in indices [out, k]
    weight_bytes: int           # what the sparsefx kernel must read: values + structure
    dense: torch.Tensor | None  # the same weights materialised, to build CSR from (then freed)


def sparse_weights(out_features: int, in_features: int, generator: torch.Generator
                   ) -> list[SparseWeight]:
    weights = []

    def diag_op(x, values, offsets):
        return torch.ops.sparsefx.diag_linear(x, values, offsets, out_features)

    for sparsity in SPARSITIES:
        num_kept = patterns.diag_num_kept(out_features, in_features, sparsity)
        offsets = patterns.random_diag_offsets(out_features, in_features, num_kept, generator)
        _, length = patterns.diag_geometry(out_features, in_features)
        values = torch.randn(num_kept, length, generator=generator) / num_kept ** 0.5
        weights.append(SparseWeight(
            f"diag {sparsity:.0%}", diag_op, values, offsets,
            values.numel() * 4 + offsets.numel() * offsets.element_size(),
            patterns.diag_to_dense(values, offsets, out_features, in_features)))
    fanins = [(f"fanin {s:.0%}",
               patterns.random_fanin_indices(out_features, in_features,
                                             patterns.fanin_num_kept(in_features, s), generator))
              for s in SPARSITIES]
    fanins.append(("nm 2:4",
                   patterns.random_nm_indices(out_features, in_features, 2, 4, generator)))
    for label, indices in fanins:
        values = torch.randn(indices.shape, generator=generator) / indices.shape[1] ** 0.5
        weights.append(SparseWeight(
            label, torch.ops.sparsefx.fanin_linear, values, indices,
            values.numel() * 4 + indices.numel() * indices.element_size(),
            patterns.fanin_to_dense(values, indices, in_features)))
    return weights


def csr_int32(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as CSR with int32 indices (half the index bytes of PyTorch's default)."""
    csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32),
                                   csr.col_indices().to(torch.int32), csr.values(),
                                   size=weight.shape)


@dataclass
class Layer:
    """Everything of one shape that does not depend on the batch: built once per shape."""

    out_features: int
    in_features: int
    dense: torch.Tensor
    sparse: list[SparseWeight]
    csr: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # W, W.T, W's pattern


def build_layer(out_features: int, in_features: int, generator: torch.Generator) -> Layer:
    dense = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    sparse = sparse_weights(out_features, in_features, generator)
    csr = {}
    for weight in sparse:
        w_csr = csr_int32(weight.dense)
        pattern = torch.sparse_csr_tensor(w_csr.crow_indices(), w_csr.col_indices(),
                                          torch.zeros_like(w_csr.values()),
                                          size=weight.dense.shape)
        csr[weight.label] = (w_csr, csr_int32(weight.dense.T.contiguous()), pattern)
        weight.dense = None  # only CSR needed it; a 4096x4096 copy per pattern adds up
    return Layer(out_features, in_features, dense, sparse, csr)


def csr_bytes(w_csr: torch.Tensor) -> int:
    return w_csr.values().numel() * 8 + w_csr.crow_indices().numel() * 4


def candidates(layer: Layer, batch: int, pass_name: str, compile_labels: set[str],
               generator: torch.Generator) -> list[tuple[Candidate, str, int]]:
    """(candidate, pattern label or "dense", weight-side bytes) for one cell; dense and each
    pattern in ``compile_labels`` also under ``torch.compile``."""
    out_features, in_features = layer.out_features, layer.in_features
    x = torch.randn(batch, in_features, generator=generator)
    grad_out = torch.randn(batch, out_features, generator=generator)
    train = pass_name == "forward+backward"

    def timed(forward, params):
        """forward(x, *params) as the pass needs it: no-grad forward, or forward+backward
        into fresh leaves (the gradient of x and of the weights, as a layer's would be)."""
        if not train:
            return lambda: forward(x, *params)
        x_leaf = x.clone().requires_grad_()
        leaves = [p.clone().requires_grad_() if p.is_floating_point() else p for p in params]

        def step():
            x_leaf.grad = None
            for leaf in leaves:
                leaf.grad = None
            forward(x_leaf, *leaves).backward(grad_out)
        return step

    def both(name, forward, params, label, weight_bytes):
        """The eager candidate and, if asked for, the compiled one (static shapes: one
        graph per cell; the backward is compiled too, through AOTAutograd)."""
        out = [(Candidate(name, timed(forward, params)), label, weight_bytes)]
        if label in compile_labels:
            run = torch.compile(forward, dynamic=False)
            out.append((Candidate(f"{name} [compiled]", timed(run, params), warmup=2), label,
                        weight_bytes))
        return out

    rows = both("dense F.linear", F.linear, [layer.dense], "dense", layer.dense.numel() * 4)
    for weight in layer.sparse:
        rows += both(f"{weight.label}: sparsefx", weight.op, [weight.values, weight.structure],
                     weight.label, weight.weight_bytes)
        # CSR stays eager: torch.compile does not take sparse tensors ("Attempted to wrap
        # sparse Tensor")
        w_csr, wt_csr, pattern = layer.csr[weight.label]
        rows.append((Candidate(f"{weight.label}: CSR", _csr_fn(w_csr, wt_csr, pattern, x,
                                                               grad_out, train)),
                     weight.label, csr_bytes(w_csr)))
    return rows


def _csr_fn(w_csr, wt_csr, pattern, x, grad_out, train):
    """The CSR baseline at its best: W and W.T built once; the values gradient is the
    sampled product dY.T @ x at W's pattern."""
    if not train:
        return lambda: torch.mm(w_csr, x.T).T

    def step():
        torch.mm(w_csr, x.T)                                     # y.T = W @ x.T
        torch.mm(wt_csr, grad_out.T)                             # dx.T = W.T @ dy.T
        torch.sparse.sampled_addmm(pattern, grad_out.T, x)       # dW at W's pattern
    return step


def compiled_patterns(choice: str) -> set[str]:
    """Which candidates ``--compile-layers`` also times compiled: "none"; "90" (default:
    dense, diag and fan-in at 90 %, N:M); "all"."""
    every = {f"{family} {s:.0%}" for family in ("diag", "fanin") for s in SPARSITIES}
    return {"none": set(), "90": {"dense", "diag 90%", "fanin 90%", "nm 2:4"},
            "all": {"dense", "nm 2:4", *every}}[choice]


def compiled_note(choice: str) -> str:
    what = {"none": "Compiled variants: none (`--compile-layers none`).",
            "90": "`[compiled]`: dense and the sparsefx op at 90 % and 2:4 under "
                  "`torch.compile` (static shapes, backward through AOTAutograd), each against "
                  "compiled dense; the other sparsities are left eager to keep the run short "
                  "(`--compile-layers all` times them too).",
            "all": "`[compiled]`: dense and every sparsefx pattern under `torch.compile` "
                   "(static shapes, backward through AOTAutograd), each against compiled "
                   "dense."}[choice]
    return what + " CSR is eager only: `torch.compile` does not take sparse tensors."


def run(args, progress, bar) -> list[dict]:
    """The whole layers section: one row per (shape, batch, pass, candidate)."""
    generator = torch.Generator().manual_seed(0)
    compile_labels = compiled_patterns(args.compile_layers)
    rows = []
    for out_features, in_features in args.shapes:
        layer = build_layer(out_features, in_features, generator)
        for batch in args.batches:
            for pass_name in args.passes:
                cell = candidates(layer, batch, pass_name, compile_labels, generator)
                interleaved([c for c, _, _ in cell], args.rounds, args.min_run_time)
                torch._dynamo.reset()  # this cell's graphs are done with: keep guards short
                dense = {c.name.endswith("[compiled]"): c for c, label, _ in cell
                         if label == "dense"}  # each mode against dense in the same mode
                activation_bytes = batch * (in_features + out_features) * 4
                factor = 3 if pass_name == "forward+backward" else 1
                for candidate, pattern, weight_bytes in cell:
                    seconds = median_time(candidate)
                    moved = factor * (weight_bytes + activation_bytes)
                    row = {"out_features": out_features, "in_features": in_features,
                           "batch": batch, "pass": pass_name, "candidate": candidate.name,
                           "pattern": pattern, "ms": 1e3 * seconds,
                           "rounds_ms": [1e3 * t for t in candidate.times],
                           "speedup_vs_dense": median_ratio(
                               dense[candidate.name.endswith("[compiled]")], candidate),
                           "bytes": moved, "gb_per_s": moved / seconds / 1e9}
                    rows.append(row)
                    progress(f"{out_features:4d}x{in_features:<4d} b{batch:<3d} "
                             f"{pass_name:16s} {candidate.name:34s} {row['ms']:9.3f} ms "
                             f"{row['speedup_vs_dense']:6.2f}x vs dense "
                             f"{row['gb_per_s']:6.1f} GB/s")
                bar.update(1)
        del layer
    return rows


# ------------------------------------------------------------------------------ markdown


def markdown(payload: dict, info: dict) -> str:
    rows = payload["rows"]
    lines = ["# One sparse layer vs dense F.linear and CSR (CPU)", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {machine_line(info)}.  ",
             f"Method: {payload['method']}  ",
             f"Run time: {payload['seconds'] / 60:.1f} min.", "",
             "Speed-up = dense time / candidate time (median of per-round ratios, same run). "
             "GB/s = bytes the candidate must move / its median time: weight side (dense "
             "`out*in*4`; diag `K*L*4 + K*8`; fan-in `out*k*(4 + index bytes)`; CSR "
             "`nnz*8 + (out+1)*4`) plus activations `batch*(in+out)*4`; forward+backward "
             "counts 3x that (forward, input gradient, weight gradient). "
             + payload["compiled_note"], ""]
    lines += ["## Summary: sparsefx speed-up vs dense", ""]
    labels = [c for c in dict.fromkeys(r["candidate"] for r in rows)
              if c.endswith(": sparsefx")]
    shapes = list(dict.fromkeys((r["out_features"], r["in_features"]) for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    index = {(r["out_features"], r["in_features"], r["batch"], r["pass"], r["candidate"]): r
             for r in rows}
    for pass_name in dict.fromkeys(r["pass"] for r in rows):
        summary = []
        for shape in shapes:
            for batch in batches:
                cells = [index.get((*shape, batch, pass_name, label)) for label in labels]
                summary.append([f"{shape[0]}x{shape[1]}", str(batch)] + [
                    fmt(c["speedup_vs_dense"] if c else None, ".2f") + "x" for c in cells])
        lines += [f"### {pass_name}", ""]
        lines += markdown_table(["out x in", "batch"] + [l.removesuffix(": sparsefx")
                                                          for l in labels],
                                summary, "lr" + "r" * len(labels))
        lines.append("")
    candidates_order = list(dict.fromkeys(r["candidate"] for r in rows))
    for shape in shapes:
        for pass_name in dict.fromkeys(r["pass"] for r in rows):
            header = ["candidate"]
            for batch in batches:
                header += [f"b{batch} ms", f"b{batch} x dense", f"b{batch} GB/s"]
            table = []
            for name in candidates_order:
                cells = [index.get((*shape, batch, pass_name, name)) for batch in batches]
                if not any(cells):
                    continue
                line = [name]
                for c in cells:
                    line += [fmt(c["ms"] if c else None, ".3f"),
                             fmt(c["speedup_vs_dense"] if c else None, ".2f") + "x",
                             fmt(c["gb_per_s"] if c else None, ".1f")]
                table.append(line)
            lines += [f"## {shape[0]}x{shape[1]} (out x in), {pass_name}", ""]
            lines += markdown_table(header, table, "l" + "r" * (3 * len(batches)))
            lines.append("")
    return "\n".join(lines)


def plot(payload: dict, path) -> None:
    """Speed-up against batch per pattern (sparsefx solid, CSR at 90 % dashed), one panel per
    shape; top row forward, bottom row forward+backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    rows = payload["rows"]
    shapes = list(dict.fromkeys((r["out_features"], r["in_features"]) for r in rows))
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    colours = {"diag": ["#9ecae1", "#3182bd", "#08519c"],
               "fanin": ["#fdae6b", "#e6550d", "#a63603"], "nm": ["#31a354"]}
    fig, axes = plt.subplots(len(passes), len(shapes), figsize=(3.4 * len(shapes),
                                                                3.2 * len(passes)),
                             squeeze=False, sharex=True)
    for i, pass_name in enumerate(passes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            cell = [r for r in rows if (r["out_features"], r["in_features"]) == shape
                    and r["pass"] == pass_name]
            seen = {"diag": 0, "fanin": 0, "nm": 0}
            for name in dict.fromkeys(r["candidate"] for r in cell):
                if name == "dense F.linear" or "[compiled]" in name:
                    continue
                pattern, _, impl = name.partition(": ")
                family = pattern.split()[0]
                if impl == "CSR" and pattern not in ("diag 90%", "fanin 90%"):
                    continue
                points = sorted((r["batch"], r["speedup_vs_dense"]) for r in cell
                                if r["candidate"] == name)
                colour = colours[family][1] if impl == "CSR" else \
                    colours[family][min(seen[family], len(colours[family]) - 1)]
                if impl != "CSR":
                    seen[family] += 1
                ax.plot(*zip(*points), marker="o", markersize=3,
                        linestyle="--" if impl == "CSR" else "-", color=colour,
                        label=name.replace(": sparsefx", ""))
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
            ax.set_title(f"{shape[0]}x{shape[1]}, {pass_name}", fontsize=9)
            if i == len(passes) - 1:
                ax.set_xlabel("batch")
            if j == 0:
                ax.set_ylabel("speed-up vs dense")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"sparsefx layer speed-up vs dense F.linear (CPU, "
                 f"{payload['machine']['torch_threads']} thread(s)); dashed: CSR", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(passes) > 1 else 0.16, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
