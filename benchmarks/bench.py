"""sparsefx's CPU benchmark suite, one command: single layers and real architectures, every
candidate against its baselines in the same run.

    python benchmarks/bench.py                  # everything, writes benchmarks/results/
                                                #   (2 cores: calls seconds, layers ~10 min,
                                                #   models ~40 min, dst ~5 min)
    python benchmarks/bench.py --only layers    # or calls, blockdiag, models, dst;
                                                #   repeatable or a comma list
    python benchmarks/bench.py --quick --no-write   # seconds-long smoke run (CI)
    python benchmarks/bench.py --render         # rewrite the Markdown and plot from the JSON

Sections:
* calls (``call_suite.py``): what one op call costs at 128x128, batch 1, against
  ``F.linear`` and ``nn.Linear`` (functions and modules, with and without autograd). Writes
  ``calls_cpu.{json,md}``; seconds.

* layers (``layer_suite.py``): one linear layer at GPT-2 / ViT-B block shapes and 4096x4096,
  batch 1 to 256, forward and forward+backward; dense ``F.linear``, the sparsefx op (diag and
  fan-in at 80/90/95 %, N:M 2:4) and CSR on the same weights; median ms, speed-up vs dense
  and GB/s. Writes ``layers_cpu.{json,md}`` and ``speedup_vs_batch.png``.
* blockdiag (``blockdiag_suite.py``): blocked diagonals against diagonals at 90 % (and
  dense) at the layer shapes, batch 1 and 256, forward and training step. Writes
  ``blockdiag_cpu.{json,md}``; about a minute.
* dst (``bench_dst_overhead.py``): what DST's structure updates (every 100 steps) add to
  training a 90 %-sparse MLP, per method. Writes ``dst_overhead_cpu.{json,md}``.
* models (``model_suite.py``): HF GPT-2 small (decode with a KV cache, prefill, training
  step) and ViT-B/16 (inference, training step), dense vs sparsefx vs the ideal-sparse
  reference (``ideal_sparse.py``), eager and compiled; reports the fraction of the ideal
  speed-up reached against the targets. Writes ``models_cpu.{json,md}``.

Method (``common.interleaved``): warm-up first; then rounds, each timing every candidate of a
cell once (round-robin); a timing is the median over rounds, a ratio the median of per-round
ratios. This machine class is shared and noisy: compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling modules, when run as a script

import torch
from tqdm import tqdm

import bench_dst_overhead
import blockdiag_suite
import call_suite
import layer_suite
import model_suite
from common import RESULTS, command_line, configure_compile, machine, machine_line

SECTIONS = ("calls", "layers", "blockdiag", "models", "dst")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="calls, layers, models, dst (repeatable or comma separated); "
                             "default all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes and 1-layer models, 1 round, no compile")
    parser.add_argument("--no-write", action="store_true", help="print only, write nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", action="store_true",
                        help="time nothing: rewrite the selected sections' Markdown (and the "
                             "plot) from the JSON already in --out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of calls per candidate per round (default: layers 0.2, "
                             "models 0.5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, i.e. the cores)")
    layers = parser.add_argument_group("layers")
    layers.add_argument("--shapes", default=None,
                        help="out x in list, e.g. 768x768,4096x4096 (default: all six)")
    layers.add_argument("--batches", default=None, help="e.g. 1,256 (default 1,8,32,256)")
    layers.add_argument("--passes", default=None,
                        help="forward, forward+backward (default both)")
    layers.add_argument("--compile-layers", choices=("none", "90", "all"), default=None,
                        help="which layers are also timed under torch.compile: dense and "
                             "the 90 %% and 2:4 patterns (default; none with --quick), every "
                             "pattern, or none")
    models = parser.add_argument_group("models")
    models.add_argument("--models", default="gpt2,vit", help="gpt2, vit")
    models.add_argument("--patterns", default="diag,fanin,nm", help="diag, fanin, nm")
    models.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager only")
    models.add_argument("--skip-training", action="store_true",
                        help="leave out the training steps")
    models.add_argument("--depth", type=int, default=None,
                        help="transformer blocks (default: the configs' 12); fewer for a "
                             "quicker look at the same widths")
    models.add_argument("--past", type=int, default=128, help="GPT-2 decode: KV cache length")
    models.add_argument("--prompt", type=int, default=128, help="GPT-2 prefill length")
    models.add_argument("--train-batch", type=int, default=8, help="GPT-2 training batch")
    models.add_argument("--train-seq", type=int, default=128, help="GPT-2 training length")
    models.add_argument("--nm-everywhere", action="store_true",
                        help="also time N:M 2:4 (and its ideal) in the training steps and ViT "
                             "at batch 32 (slow: 2:4 keeps half the weights)")
    models.add_argument("--slow-rounds", type=int, default=2,
                        help="rounds for the ViT training step (tens of seconds a call)")
    calls = parser.add_argument_group("calls (the cost of one op call)")
    calls.add_argument("--call-width", type=int, default=128)
    dst = parser.add_argument_group("dst (what DST's updates add to training)")
    dst.add_argument("--dst-steps", type=int, default=400)
    dst.add_argument("--dst-width", type=int, default=1024,
                     help="the MLP width-2w-2w-w-10")
    dst.add_argument("--dst-rounds", type=int, default=3)
    args = parser.parse_args(argv)

    args.sections = [s for item in args.only for s in item.split(",") if s] or list(SECTIONS)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only {sorted(unknown)}: expected {SECTIONS}")
    for value, allowed, flag in ((args.passes, layer_suite.PASSES, "--passes"),
                                 (args.models, ("gpt2", "vit"), "--models"),
                                 (args.patterns, tuple(model_suite.PATTERNS), "--patterns")):
        if value and set(value.split(",")) - set(allowed):
            parser.error(f"{flag} {value}: expected values from {allowed}")
    if args.quick:
        # tiny shapes that still take every code path (N:M needs in % 4 == 0); compiling
        # would take longer than everything else together
        args.shapes = args.shapes or "64x64,192x64"
        args.batches = args.batches or "1,8"
        args.rounds, args.slow_rounds = 1, 1
        args.min_run_time = args.min_run_time or 0.01
        args.compile_layers = args.compile_layers or "none"
        args.dst_steps, args.dst_width, args.dst_rounds = 20, 128, 1
    args.shapes = ([tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
                   if args.shapes else list(layer_suite.SHAPES))
    args.batches = ([int(b) for b in args.batches.split(",")] if args.batches
                    else list(layer_suite.BATCHES))
    args.passes = args.passes.split(",") if args.passes else list(layer_suite.PASSES)
    args.compile_layers = args.compile_layers or "90"
    args.model_families = args.models.split(",")
    args.patterns = args.patterns.split(",")
    return args


def method_line(args, min_run_time: float) -> str:
    return (f"{args.rounds} interleaved round(s) after warm-up (1 call eager, 2 compiled); "
            f"each round is the median of single calls over >= {min_run_time:g} s; timings "
            "are medians over rounds, ratios medians of per-round ratios.")


def write(args, name: str, payload: dict, markdown: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps(_finite(payload), indent=1, default=str, allow_nan=False) + "\n")
    (args.out / f"{name}.md").write_text(markdown)
    print(f"wrote {args.out / name}.json and .md")


def _finite(value):
    """NaN (a skipped candidate) as null: NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def render(args) -> None:
    """The Markdown (and plot) of each selected section again, from its JSON in ``args.out``:
    the tables always come from the measured numbers and the current formatting code."""
    for section in args.sections:
        name = {"calls": "calls_cpu", "layers": "layers_cpu", "blockdiag": "blockdiag_cpu",
                "models": "models_cpu", "dst": "dst_overhead_cpu"}[section]
        path = args.out / f"{name}.json"
        if not path.exists():
            print(f"{section}: no {path}, nothing to render")
            continue
        payload = json.loads(path.read_text())
        info = payload["machine"]
        if section == "calls":
            text = call_suite.markdown(payload, info)
        elif section == "layers":
            text = layer_suite.markdown(payload, info)
            layer_suite.plot(payload, args.out / "speedup_vs_batch.png")
        elif section == "blockdiag":
            text = blockdiag_suite.markdown(payload, info)
        elif section == "models":
            text = model_suite.markdown(payload, info)
        else:
            text = bench_dst_overhead.markdown(payload["rows"], payload["command"], info,
                                               payload.get("width", args.dst_width),
                                               payload.get("rounds", args.dst_rounds))
        (args.out / f"{name}.md").write_text(text)
        print(f"rendered {args.out / name}.md from {path.name}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        render(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_compile()
    info = machine()
    command = command_line()
    print(f"{command}\n{machine_line(info)}")
    started = time.perf_counter()

    if "calls" in args.sections:
        section_start = time.perf_counter()
        call_args = argparse.Namespace(**{**vars(args),
                                          "min_run_time": args.min_run_time or 0.2})
        payload = dict(command=command, machine=info,
                       method=method_line(args, call_args.min_run_time),
                       rows=call_suite.run(call_args, print),
                       seconds=time.perf_counter() - section_start)
        print(f"calls: {payload['seconds']:.0f} s")
        if not args.no_write:
            write(args, "calls_cpu", payload, call_suite.markdown(payload, info))

    if "layers" in args.sections:
        section_start = time.perf_counter()
        layer_args = argparse.Namespace(**{**vars(args),
                                           "min_run_time": args.min_run_time or 0.2})
        cells = len(args.shapes) * len(args.batches) * len(args.passes)
        # the bar only on a terminal: in a log file it would garble the result lines
        with tqdm(total=cells, desc="layers", unit="cell", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            rows = layer_suite.run(layer_args, tqdm.write, bar)
        payload = dict(command=command, machine=info,
                       method=method_line(args, layer_args.min_run_time),
                       compiled_note=layer_suite.compiled_note(args.compile_layers),
                       compile_layers=args.compile_layers, shapes=args.shapes,
                       batches=args.batches, passes=args.passes,
                       sparsities=layer_suite.SPARSITIES, rows=rows,
                       seconds=time.perf_counter() - section_start)
        print(f"layers: {payload['seconds']:.0f} s")
        if not args.no_write:
            write(args, "layers_cpu", payload, layer_suite.markdown(payload, info))
            layer_suite.plot(payload, args.out / "speedup_vs_batch.png")
            print(f"wrote {args.out / 'speedup_vs_batch.png'}")

    if "blockdiag" in args.sections:
        section_start = time.perf_counter()
        block_args = argparse.Namespace(**{**vars(args),
                                           "min_run_time": args.min_run_time or 0.2})
        payload = dict(command=command, machine=info,
                       method=method_line(args, block_args.min_run_time),
                       rows=blockdiag_suite.run(block_args, print),
                       seconds=time.perf_counter() - section_start)
        print(f"blockdiag: {payload['seconds']:.0f} s")
        if not args.no_write:
            write(args, "blockdiag_cpu", payload, blockdiag_suite.markdown(payload, info))

    if "models" in args.sections:
        section_start = time.perf_counter()
        model_args = argparse.Namespace(**{**vars(args),
                                           "min_run_time": args.min_run_time or 0.5})
        result = model_suite.run(model_args, tqdm.write)
        payload = dict(command=command, machine=info,
                       method=method_line(args, model_args.min_run_time) +
                       f" ViT training step: {min(args.rounds, args.slow_rounds)} round(s).",
                       **result, seconds=time.perf_counter() - section_start)
        print(f"models: {payload['seconds']:.0f} s")
        if not args.no_write:
            write(args, "models_cpu", payload, model_suite.markdown(payload, info))
    if "dst" in args.sections:
        section_start = time.perf_counter()
        # an update every 5 steps in the quick run, so that updates happen at all
        delta_t = 5 if args.quick else 100
        rows = bench_dst_overhead.measure(args.dst_steps, args.dst_width, 256, delta_t,
                                          args.dst_rounds)
        table = bench_dst_overhead.markdown(rows, command, info, args.dst_width,
                                            args.dst_rounds)
        print(table)
        print(f"dst: {time.perf_counter() - section_start:.0f} s")
        if not args.no_write:
            write(args, "dst_overhead_cpu", dict(command=command, machine=info, rows=rows,
                                                 width=args.dst_width, rounds=args.dst_rounds),
                  table)
    print(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
