"""What every benchmark in this folder shares: the machine description, the interleaved
timing loop, and small Markdown helpers.

Timing method (``interleaved``): every candidate is warmed up first (compiling, building
caches), then timed in rounds, round-robin: round 1 times each candidate once, then round 2,
and so on, so that slow drifts of a shared machine (other jobs, clock changes) hit every
candidate alike. A candidate's round is the median of as many single calls as fit in
``min_run_time`` (at least one); its result is the median over rounds, and a ratio between
two candidates is the median of the per-round ratios.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsefx.kernels import cpu_kernels

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU model, cores, threads and versions: what a reader needs to compare two runs."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=model, logical_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                cpu_kernels=cpu_kernels())


def machine_line(info: dict) -> str:
    return (f"{info['cpu']}, {info['logical_cores']} logical cores, {info['torch_threads']} "
            f"torch thread(s); torch {info['torch']}, Python {info['python']}, sparsefx CPU "
            f"kernels: {info['cpu_kernels']}")


def command_line() -> str:
    """The command as it was typed (relative script path, flags), for the results' header."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


@dataclass
class Candidate:
    """One thing to time. ``fn`` is ``None`` when it cannot run here; ``skipped`` says why."""

    name: str
    fn: Callable[[], object] | None
    skipped: str = ""
    warmup: int = 1                         # calls before timing (2 for compiled code: the
    #                                         second call may still specialise and recompile)
    times: list[float] = field(default_factory=list)  # seconds, one median per round
    warmup_s: float = 0.0                   # wall time of the warm-up (compile included)
    note: str = ""                          # anything a reader of the result must know


def configure_compile() -> None:
    """Many compiled programs share one Python function here (every cell's layer, every
    model instance's forward), so dynamo's per-function recompile limit (8) would silently
    send the later ones to eager; raise it, and make hitting it an error instead."""
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 8192
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (to catch recompiles while timing)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _time_round(fn: Callable[[], object], min_run_time: float) -> float:
    """Median of single calls until ``min_run_time`` has passed (at least one call)."""
    samples: list[float] = []
    spent = 0.0
    while spent < min_run_time or not samples:
        begin = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - begin
        samples.append(elapsed)
        spent += elapsed
    return statistics.median(samples)


def interleaved(candidates: list[Candidate], rounds: int, min_run_time: float,
                log: Callable[[str], None] | None = None) -> list[Candidate]:
    """Warm up every runnable candidate, then time them round-robin for ``rounds`` rounds;
    fills each candidate's ``times`` and returns the list. Python's garbage collector is
    held off while timing (as ``torch.utils.benchmark`` does): tensors are freed by
    reference counting, so this only defers collecting cycles to the end of the cell.
    ``log``, if given, hears about each warm-up and round (for slow candidates)."""
    runnable = [c for c in candidates if c.fn is not None]
    for candidate in runnable:
        begin = time.perf_counter()
        for _ in range(candidate.warmup):
            candidate.fn()
        candidate.warmup_s = time.perf_counter() - begin
        if log and candidate.warmup_s > 2:  # worth a line: compiling, or a slow step
            log(f"  warmed up {candidate.name} in {candidate.warmup_s:.1f} s")
    gc.collect()  # once: a full collection costs ~0.1 s with transformers loaded
    gc.disable()
    try:
        for round_index in range(rounds):
            for candidate in runnable:
                graphs = compiled_graphs()
                candidate.times.append(_time_round(candidate.fn, min_run_time))
                if compiled_graphs() != graphs:  # compiling inside the timing: flag it
                    candidate.note = "recompiled while timed"
            if log and sum(c.times[-1] for c in runnable) > 2:
                log(f"  round {round_index + 1}/{rounds}: " + ", ".join(
                    f"{c.name} {1e3 * c.times[-1]:.1f} ms" for c in runnable))
    finally:
        gc.enable()
    return candidates


def median_time(candidate: Candidate) -> float:
    return statistics.median(candidate.times) if candidate.times else math.nan


def median_ratio(numerator: Candidate, denominator: Candidate) -> float:
    """Median over rounds of numerator time / denominator time (NaN if either was skipped).
    ``median_ratio(dense, sparse)`` is the sparse candidate's speed-up over dense."""
    if not numerator.times or not denominator.times:
        return math.nan
    return statistics.median(n / d for n, d in zip(numerator.times, denominator.times,
                                                   strict=True))


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """``align`` holds one character per column: ``l`` or ``r``."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows]


def fmt(value: float, spec: str, missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)
