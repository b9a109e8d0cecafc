"""The accuracy study's report, from ``study.json`` alone: ``study.md`` (every table, the
targets met or missed), ``study.png`` (metric against sparsity), ``lm_curves.png``
(validation loss against steps and against training seconds) and, with ``--readme``, the
README's section between its ``study`` markers.

    python examples/study_report.py                  # examples/results/*
    python examples/study_report.py --readme         # and README.md's section
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
METRIC = {"mlp": ("accuracy", "test accuracy %"), "vit": ("accuracy", "test accuracy %"),
          "lm": ("perplexity", "validation perplexity per byte")}
CURVES = [("dense", "dense"), ("unstructured", "static"), ("unstructured", "rigl"),
          ("fanin", "rigl"), ("fanin", "srigl"), ("diag", "rigl"), ("diag", "dynadiag"),
          ("diag", "dynadiag-ref"), ("blockdiag", "rigl")]


def _cells(results: dict, task: str) -> list[dict]:
    """The task's runs at its own width (not the wide iso runs, not the iso-time pairs)."""
    config = results["tasks"][task]["model"]
    width = config.get("dim", config.get("hidden"))
    return [r for r in results["runs"] if r["task"] == task and r.get("kind", "cell") == "cell"
            and r.get("width", width) == width]


def _stats(values: list[float]) -> tuple[float, float, int]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
            len(values))


def summarise(results: dict, task: str) -> dict:
    """``{(pattern, method): {sparsity: (mean, std, n)}}``; dense under every sparsity."""
    from study import METHODS
    metric = METRIC[task][0]
    runs = _cells(results, task)
    sparsities = sorted({r["sparsity"] for r in runs if r["sparsity"]})
    table = {}
    for pattern, method in METHODS:
        row = {}
        for sparsity in sparsities:
            wanted = 0.0 if pattern == "dense" else sparsity
            values = [r[metric] for r in runs if r["pattern"] == pattern
                      and r["method"] == method and r["sparsity"] == wanted]
            if values:
                row[sparsity] = _stats(values)
        if row:
            table[pattern, method] = row
    return table


def iso_rows(results: dict) -> dict:
    """The LM's iso-parameter cells (wide sparse, same steps) and iso-time pairs."""
    if "lm" not in results["tasks"]:
        return {}
    base = results["tasks"]["lm"]["model"]["dim"]
    wide = [r for r in results["runs"] if r["task"] == "lm" and r.get("kind", "cell") == "cell"
            and r.get("width", base) != base]
    timed = [r for r in results["runs"] if r.get("kind") == "iso-time"]
    pairs = []
    for seed in sorted({r["seed"] for r in timed}):
        dense = [r for r in timed if r["seed"] == seed and r["pattern"] == "dense"]
        sparse = [r for r in timed if r["seed"] == seed and r["pattern"] != "dense"]
        if dense and sparse:
            pairs.append((dense[-1], sparse[-1]))
    return {"wide": wide, "pairs": pairs}


def targets(results: dict, tables: dict) -> list[str]:
    """The issue's targets, each marked met or missed, from the mean over seeds at 90 %."""
    lines = []

    def cell(task, pattern, method, sparsity=0.9):
        return tables.get(task, {}).get((pattern, method), {}).get(sparsity)

    seeds = len(results.get("seeds", [])) or 1

    def verdict(met, *cells):
        """Met or missed; "so far" while a cell it compares has fewer runs than seeds."""
        fewest = min((c[2] for c in cells if c), default=seeds)
        word = "**met**" if met else "**missed**"
        return word if fewest >= seeds else f"{word} so far ({fewest} of {seeds} seeds)"

    if "lm" in tables:
        for pattern in ("unstructured", "fanin", "diag", "blockdiag"):
            static, set_, rigl = (cell("lm", pattern, m) for m in ("static", "set", "rigl"))
            if None in (static, set_, rigl):
                continue
            gap_static = static[0] - set_[0]
            gap_set = set_[0] - rigl[0]
            noise = max(static[1], set_[1], rigl[1])
            met = gap_static > noise and gap_set >= 0 and (gap_set > noise or gap_set == 0)
            lines.append(f"- lm, {pattern}: static {static[0]:.3f} > SET {set_[0]:.3f} >= "
                         f"RigL {rigl[0]:.3f}, each gap above the seed std ({noise:.3f}): "
                         f"{verdict(met, static, set_, rigl)}")
        for pattern, method, baseline in (("diag", "dynadiag", "rigl"),
                                          ("fanin", "srigl", "rigl")):
            value, base = cell("lm", pattern, method), cell("lm", pattern, baseline)
            if None not in (value, base):
                lines.append(f"- lm, {pattern} {method} {value[0]:.3f} <= {pattern} {baseline} "
                             f"{base[0]:.3f}: {verdict(value[0] <= base[0], value, base)}")
        reference = cell("lm", "unstructured", "rigl")
        if reference:
            for (pattern, method), row in tables["lm"].items():
                if pattern in ("dense", "unstructured") or 0.9 not in row:
                    continue
                ratio = row[0.9][0] / reference[0] - 1
                lines.append(f"- lm, {pattern} {method} {row[0.9][0]:.3f}: {100 * ratio:+.1f} % "
                             f"against unstructured RigL {reference[0]:.3f} (within 2 %?): "
                             f"{verdict(ratio <= 0.02, row[0.9], reference)}")
        iso = iso_rows(results)
        dense = cell("lm", "dense", "dense")
        if iso.get("wide") and dense:
            wide = _stats([r["perplexity"] for r in iso["wide"]])
            lines.append(f"- lm, iso-parameters: sparse-wide {wide[0]:.3f} ± {wide[1]:.3f} <= "
                         f"dense {dense[0]:.3f} ± {dense[1]:.3f}: {verdict(wide[0] <= dense[0])}")
        if iso.get("pairs"):
            dense_time = _stats([d["perplexity"] for d, _ in iso["pairs"]])
            wide_time = _stats([w["perplexity"] for _, w in iso["pairs"]])
            lines.append(f"- lm, iso-time (the moonshot): sparse-wide {wide_time[0]:.3f} < dense "
                         f"{dense_time[0]:.3f} in the same training seconds: "
                         f"{verdict(wide_time[0] < dense_time[0])}")
    for task in ("mlp", "vit"):
        dense, rigl = cell(task, "dense", "dense"), cell(task, "unstructured", "rigl")
        for pattern, method in (("diag", "dynadiag"), ("fanin", "srigl")):
            value = cell(task, pattern, method)
            if None in (value, dense, rigl):
                continue
            met = value[0] >= rigl[0] - 1 and value[0] >= dense[0] - 2
            lines.append(f"- {task}, {pattern} {method} {value[0]:.2f} within 1 point of "
                         f"unstructured RigL {rigl[0]:.2f} and 2 of dense {dense[0]:.2f}: "
                         f"{verdict(met, value, dense, rigl)}")
    return lines


def _table(task: str, table: dict, config: dict) -> list[str]:
    sparsities = sorted({s for row in table.values() for s in row})
    budget = f"{config['epochs']} epochs" if config["epochs"] else f"{config['steps']} steps"
    lines = [f"### {task}: {METRIC[task][1]}", "",
             f"Model {config['model']}, {budget}, batch {config['batch_size']}, lr "
             f"{config['lr']}, DST update every {config['delta_t']} steps. Mean ± std over "
             "seeds (n).", "",
             "| pattern | method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    digits = 3 if task == "lm" else 2
    for (pattern, method), row in table.items():
        cells = [f"{row[s][0]:.{digits}f} ± {row[s][1]:.{digits}f} ({row[s][2]})" if s in row
                 else "" for s in sparsities]
        if pattern == "dense":
            first = next(iter(row.values()))
            cells = [f"{first[0]:.{digits}f} ± {first[1]:.{digits}f} ({first[2]})"] + \
                ["″"] * (len(sparsities) - 1)
        lines.append(f"| {pattern} | {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _iso_table(results: dict, tables: dict) -> list[str]:
    iso = iso_rows(results)
    dense = tables.get("lm", {}).get(("dense", "dense"), {})
    if not iso or not (iso["wide"] or iso["pairs"]) or not dense:
        return []
    dense_cell = next(iter(dense.values()))
    dense_runs = [r for r in _cells(results, "lm") if r["pattern"] == "dense"]
    lines = ["### lm: does sparsity pay?", "",
             "| model | width | linear weights | steps | training s | perplexity |",
             "|---|---|---|---|---|---|",
             f"| dense | {results['tasks']['lm']['model']['dim']} | "
             f"{dense_runs[0]['linear_weights']:,} | {dense_runs[0]['steps']} | "
             f"{statistics.fmean(r['train_seconds'] for r in dense_runs):.0f} | "
             f"{dense_cell[0]:.3f} ± {dense_cell[1]:.3f} ({dense_cell[2]}) |"]
    if iso["wide"]:
        wide = iso["wide"]
        stats = _stats([r["perplexity"] for r in wide])
        lines.append(f"| iso-parameters: {wide[0]['pattern']} {wide[0]['method']} 90 % | "
                     f"{wide[0]['width']} | {wide[0]['linear_weights']:,} | {wide[0]['steps']} | "
                     f"{statistics.fmean(r['train_seconds'] for r in wide):.0f} | "
                     f"{stats[0]:.3f} ± {stats[1]:.3f} ({stats[2]}) |")
    if iso["pairs"]:
        for label, index in (("iso-time: dense", 0), ("iso-time: sparse-wide", 1)):
            rows = [pair[index] for pair in iso["pairs"]]
            stats = _stats([r["perplexity"] for r in rows])
            lines.append(f"| {label} | {rows[0]['width']} | {rows[0]['linear_weights']:,} | "
                         f"{', '.join(str(r['steps']) for r in rows)} | "
                         f"{statistics.fmean(r['train_seconds'] for r in rows):.0f} | "
                         f"{stats[0]:.3f} ± {stats[1]:.3f} ({stats[2]}) |")
        lines += ["", "The iso-time pairs ran one after the other with nothing else running "
                  f"({results.get('iso_threads', 'see command')}); the cells above ran "
                  f"{results['jobs']} at a time with {results['threads']} thread(s) each, so "
                  "their training seconds compare with each other, not with the pairs'."]
    return lines + [""]


def _profile_table(results: dict) -> list[str]:
    profile = results.get("profile")
    if not profile:
        return []
    kinds = sorted({k for side in profile.values() for k in side["ms_per_step"]},
                   key=lambda k: -profile["wide"]["ms_per_step"].get(k, 0))
    lines = ["### lm: where a training step's time goes", "",
             f"`torch.profiler`, self CPU time per step (ms), 10 steps: the dense model at width "
             f"{profile['dense']['width']} against the sparse-wide one at "
             f"{profile['wide']['width']}.", "",
             "| work | dense | sparse-wide |", "|---|---|---|"]
    for kind in kinds:
        lines.append(f"| {kind} | {profile['dense']['ms_per_step'].get(kind, 0):.1f} | "
                     f"{profile['wide']['ms_per_step'].get(kind, 0):.1f} |")
    totals = [sum(side["ms_per_step"].values()) for side in (profile["dense"], profile["wide"])]
    lines.append(f"| **total** | {totals[0]:.1f} | {totals[1]:.1f} |")
    return lines + [""]


def _commands(commands: list[str]) -> str:
    """The commands in order, a command repeated at once (a resumed run) written once."""
    runs = [(command, len(list(group))) for command, group in itertools.groupby(commands)]
    return ", then ".join(f"`{command}`" + (f" ({count} times: it resumes)" if count > 1 else "")
                          for command, count in runs)


def markdown(results: dict, tables: dict) -> str:
    info = results["machine"]
    lines = ["# Accuracy study", "",
             "Commands: " + _commands(results.get("commands", [results["command"]])) + "  ",
             f"Machine: {info['cpu']}, {info['logical_cores']} logical cores; torch "
             f"{info['torch']}, Python {info['python']}. Written by "
             "`python examples/study_report.py` from `study.json`.", ""]
    for task, table in tables.items():
        lines += _table(task, table, results["tasks"][task])
        if task == "lm":
            lines += ["![validation loss against steps and seconds](lm_curves.png)", ""]
            lines += _iso_table(results, tables) + _profile_table(results)
    lines += ["### Targets", ""] + (targets(results, tables) or ["- (not enough runs yet)"])
    return "\n".join(lines) + "\n"


def plot(results: dict, tables: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4.6), squeeze=False)
    for axis, (task, table) in zip(axes[0], tables.items(), strict=True):
        for index, ((pattern, method), row) in enumerate(table.items()):
            if pattern == "dense":
                mean, std, _ = next(iter(row.values()))
                axis.axhline(mean, color="black", linestyle="--", label="dense")
                axis.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                continue
            shift = 0.1 * (index - len(table) / 2)
            xs = sorted(row)
            axis.errorbar([100 * s + shift for s in xs], [row[s][0] for s in xs],
                          yerr=[row[s][1] for s in xs], marker="o", capsize=3,
                          label=f"{pattern} {method}")
        axis.set_title(task)
        axis.set_xlabel("sparsity %")
        axis.set_ylabel(METRIC[task][1])
        axis.grid(alpha=0.3)
    labelled = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    figure.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=5, fontsize=7)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    figure.savefig(out / "study.png", dpi=110)
    plt.close(figure)
    if "lm" in tables:
        _plot_curves(results, out, plt)


def _plot_curves(results: dict, out: Path, plt) -> None:
    """Mean validation loss over seeds at each recorded step, 90 % (and the iso rows)."""
    runs = _cells(results, "lm")
    groups = {f"{p} {m}": [r for r in runs if r["pattern"] == p and r["method"] == m
                           and r["sparsity"] in (0.0, 0.9) and r.get("curve")]
              for p, m in CURVES}
    iso = iso_rows(results)
    if iso.get("wide"):
        groups["sparse-wide (iso-parameters)"] = iso["wide"]
    if iso.get("pairs"):
        groups["sparse-wide (iso-time)"] = [w for _, w in iso["pairs"]]
        groups["dense (iso-time)"] = [d for d, _ in iso["pairs"]]
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, rows in groups.items():
        if not rows:
            continue
        points = min(len(r["curve"]) for r in rows)
        steps = [rows[0]["curve"][i]["step"] for i in range(points)]
        seconds = [statistics.fmean(r["curve"][i]["seconds"] for r in rows)
                   for i in range(points)]
        losses = [statistics.fmean(r["curve"][i]["val_loss"] for r in rows)
                  for i in range(points)]
        style = "--" if "dense" in label else "-"
        by_step.plot(steps, losses, style, label=label)
        by_time.plot(seconds, losses, style, label=label)
    for axis, name in ((by_step, "step"), (by_time, "training seconds (mean over seeds)")):
        axis.set_xlabel(name)
        axis.set_ylabel("validation loss, nats per byte (subset)")
        axis.grid(alpha=0.3)
        axis.set_ylim(top=2.6)
    by_step.legend(fontsize=7)
    figure.suptitle("lm at 90 % sparsity: validation loss on the curve's subset of windows")
    figure.tight_layout()
    figure.savefig(out / "lm_curves.png", dpi=110)
    plt.close(figure)


def write(out: Path, readme: bool = False) -> None:
    results = json.loads((out / "study.json").read_text())
    tables = {task: summarise(results, task) for task in results["tasks"]
              if any(r["task"] == task for r in results["runs"])}
    text = markdown(results, tables)
    (out / "study.md").write_text(text)
    if tables:
        plot(results, tables, out)
    if readme:
        write_readme(text)


def write_readme(study_md: str) -> None:
    """README.md's section between the study markers: ``study.md`` under its own heading."""
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    readme = README.read_text()
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = study_md.split("\n", 2)[2].replace("](lm_curves.png)",
                                              "](examples/results/lm_curves.png)")
    note = ("<!-- generated by python examples/study_report.py --readme from "
            "examples/results/study.json: do not edit by hand -->\n")
    README.write_text(head + begin + "\n" + note + body.strip() + "\n" + end + tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="also rewrite README's section")
    args = parser.parse_args()
    write(args.out, args.readme)
    print((args.out / "study.md").read_text())


if __name__ == "__main__":
    main()
