"""``benchmarks/gpu.py``'s full run replayed on the CPU without running a kernel: how many
JIT compiles and autotune timings an H200 run makes, and about how long it takes.

    python benchmarks/gpu_replay.py        # writes benchmarks/results/gpu_replay.{json,md}

The replay calls ``gpu.main`` on the full shapes (no ``--tiny``, no budget) with the Triton
kernels under the interpreter, where each kernel is a Python object whose launches can be
intercepted; nothing is launched:

- each launch is keyed as the JIT keys it: Triton's own ``native_specialize_impl`` on every
  argument (pointer dtype and 16-byte alignment; an integer's width, 16-divisibility, or 1
  made a constant), the constexprs, warps and stages. A key not seen before is a compile.
- the autotuners take their GPU path, keyed as ``triton.autotune`` keys them; a new key
  times every config its pruning keeps (each also a compile), an H200's 132 SMs decide the
  split reductions.
- the float64 checks only repeat the timed cell's launches, so they are not computed;
  ``do_bench`` calls are counted with their lengths, not run. Outputs are garbage: this
  counts work, it checks nothing.

The estimate prices what was counted (``--compile-s`` and the rest; the defaults are stated
in the output, the compile time measured here on a sample of variants unless given).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # the imports count, as in the run replayed
os.environ["TRITON_INTERPRET"] = "1"  # the kernels as Python objects, before Triton loads
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import gpu  # noqa: E402  (sets the script's environment and imports sparsefx)
from common import command_line, machine, machine_line  # noqa: E402
import sparsefx  # noqa: E402
from sparsefx.kernels import triton_runtime, triton_variants  # noqa: E402
from sparsefx.kernels.blockdiag import triton_kernels as blockdiag_triton  # noqa: E402

H200_SMS = 132
AUTOTUNE_CONFIG_S = 0.030  # do_bench: 5 estimating calls, warmup 5 ms, rep 20 ms, L2 flushes
BENCH_OVERHEAD_S = 0.010   # per timed cell, beyond do_bench's warmup and rep
CHECK_S = 0.010            # per float64 check on the GPU (4096^3 in fp64: ~2 ms on an H200)
CUDA_INIT_S = 5.0          # CUDA context and cuBLAS handles, not measured here
VIT_SETUP_S = 10.0         # ViT-B built, moved to the GPU and stepped once, per pattern too
LAUNCHER_S = 1.0           # Triton 3.6 (the image's) builds a C launcher per signature: gcc


class Recorder:
    """What the workload launches, per section: compiles, autotune keys and timings."""

    def __init__(self):
        self.section = "imports"
        self.compiled: set = set()
        self.launchers: set = set()  # argument types, constexprs as such: one C stub each
        self.specialisations: set = set()  # as the ahead-of-time audit names its variants
        self.tuned: set = set()
        self.counts = collections.defaultdict(collections.Counter)
        self.bench_ms: list[tuple[str, int]] = []
        self.transform_s = 0.0

    def compile_key(self, fn, args, kwargs) -> tuple:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        import inspect

        parameters = inspect.signature(fn.fn).parameters
        named = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items()
                                                  if k in parameters}
        spec = []
        for name, value in named.items():
            if "constexpr" in str(parameters[name].annotation):
                spec.append((name, ("constexpr", str(value))))
            else:
                spec.append((name, native_specialize_impl(BaseBackend, value, False, True,
                                                          True)))
        return (fn.fn.__name__, tuple(spec), kwargs.get("num_warps", 4),
                kwargs.get("num_stages", triton_runtime.NUM_STAGES))

    def launch(self, fn, args, kwargs) -> None:
        key = self.compile_key(fn, args, kwargs)
        self.counts[self.section]["launches"] += 1
        if key not in self.compiled:
            self.compiled.add(key)
            self.counts[self.section]["compiles"] += 1
        self.specialisations.add(_specialisation(key))
        types = tuple(spec[0] for _, spec in key[1])
        if types not in self.launchers:
            self.launchers.add(types)
            self.counts[self.section]["launchers"] += 1


RECORD = Recorder()


def _specialisation(key: tuple) -> tuple:
    """A compile key as ``triton_variants`` lists variants: kernel, pointer types,
    constexprs, warps."""
    name, spec, warps, _ = key
    return (name, tuple(s[0] for _, s in spec if s[0].startswith("*")),
            tuple(sorted((n, s[1]) for n, s in spec
                         if s[0] == "constexpr" and isinstance(s[1], str))),
            warps)


def unaudited() -> list[str]:
    """The specialisations the run launched that ``python -m sparsefx.kernels.
    triton_variants`` does not compile (so could spill unseen)."""
    audited = {(v.kernel.__name__, tuple(t for t in v.signature.values() if t[0] == "*"),
                tuple(sorted((k, str(value)) for k, value in v.constexprs.items())), v.num_warps)
               for v in triton_variants.every_variant()}
    return sorted(map(str, RECORD.specialisations - audited))


def _interpreted_run(self, *args, grid, warmup, **kwargs):
    """In place of ``InterpretedFunction.run``: record the launch, run nothing."""
    RECORD.launch(self, args, kwargs)


def _autotuned_run(self, *args, **kwargs):
    """In place of ``Autotuner.run``: a new key times each config pruning keeps (recorded as
    its compile and one timing); the first config is then launched."""
    self.nargs = dict(zip(self.arg_names, args))
    config = self.configs[0]
    if len(self.configs) > 1:
        named = {**self.nargs, **kwargs}
        key = tuple([named[k] for k in self.keys if k in named]
                    + [str(v.dtype) for k, v in named.items()
                       if k in self.arg_names and hasattr(v, "dtype")])
        if (id(self), key) not in RECORD.tuned:
            RECORD.tuned.add((id(self), key))
            pruned = self.prune_configs(kwargs)
            if len(pruned) > 1:
                RECORD.counts[RECORD.section]["autotune keys"] += 1
                RECORD.counts[RECORD.section]["autotune timings"] += len(pruned)
                for candidate in pruned:
                    RECORD.launch(self.fn, args, {**kwargs, **candidate.all_kwargs()})
            config = pruned[0]
    RECORD.launch(self.fn, args, {**kwargs, **config.all_kwargs()})


def _bench_ms(fn, rep_ms: int = 100) -> float:
    RECORD.bench_ms.append((RECORD.section, rep_ms))
    return 1.0


def _errors(run, x, grad_out, params, dense, stored, backward: bool) -> dict:
    """The check's launches (its cell's again, after ``fn()``: no new key) without the
    float64 reference; dense cells launch no Triton kernel."""
    RECORD.counts[RECORD.section]["checks"] += 1
    if stored is not None:
        y = run(x)
        if backward:
            torch.autograd.grad(y, (x, params[0]), grad_out)
    return dict(forward=0.0, grad_x=0.0, grad_values=0.0) if backward else dict(forward=0.0)


def _in_section(name_of, function):
    def wrapped(*args, **kwargs):
        previous, RECORD.section = RECORD.section, name_of(*args)
        try:
            return function(*args, **kwargs)
        finally:
            RECORD.section = previous
    return wrapped


def _timed_transform(function):
    def wrapped(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            RECORD.transform_s += time.perf_counter() - started
    return wrapped


@contextlib.contextmanager
def replaying():
    """The patches above, and an H200's SM count for the split reductions."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    split_count = triton_runtime.split_count
    info = dict(gpu.device_info(), gpu="H200 replay", capability="9.0",
                multiprocessors=H200_SMS)

    def h200_split(programs, work, min_per_split, device):
        return split_count(programs, work, min_per_split, torch.device("cuda", 0))

    patches = [(InterpretedFunction, "run", _interpreted_run), (Autotuner, "run", _autotuned_run),
               (triton_runtime, "INTERPRETED", False), (blockdiag_triton, "INTERPRETED", False),
               (triton_runtime, "_multiprocessors", lambda index: H200_SMS),
               (gpu, "ON_GPU", True), (gpu, "bench_ms", _bench_ms),
               (gpu, "errors_against_reference", _errors),
               (gpu, "device_info", lambda: info),
               (gpu, "check", _in_section(lambda *a: "correctness", gpu.check)),
               (gpu, "copy_bandwidth", _in_section(lambda *a: "bandwidth", gpu.copy_bandwidth)),
               (gpu, "time_shape", _in_section(lambda o, i, *a: f"layers {o}x{i}",
                                               gpu.time_shape)),
               (gpu, "time_vit_training", _in_section(lambda *a: "ViT",
                                                      gpu.time_vit_training)),
               (sparsefx, "transform", _timed_transform(sparsefx.transform))]
    for name, module in list(sys.modules.items()):  # the launchers that imported it
        if name.startswith("sparsefx.kernels.") and getattr(module, "split_count",
                                                            None) is split_count:
            patches.append((module, "split_count", h200_split))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        with sparsefx.kernels.use_cpu_kernels("triton"):
            yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def compile_seconds(samples: int) -> float:
    """Median seconds of one JIT compile (``triton.compile`` to a cubin) here, over
    ``samples`` variants spread over every kernel, in a fresh cache and a process that
    compiles rather than interprets."""
    probe = (
        "import sys, time, statistics\n"
        "from sparsefx.kernels import triton_variants as t\n"
        "variants = t.every_variant()\n"
        f"step = max(1, len(variants) // {samples})\n"
        "times = []\n"
        "for v in variants[::step]:\n"
        "    started = time.perf_counter(); t.compile_ptx(v, 90)\n"
        "    times.append(time.perf_counter() - started)\n"
        "print(statistics.median(times))\n")
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, check=True, timeout=1200)
    return float(run.stdout.split()[-1])


def estimate(compile_s: float, imports_s: float) -> dict:
    """Seconds per section on an H200, from the counts and the stated prices."""
    sections = {}
    for section, counts in RECORD.counts.items():
        benched = [rep for s, rep in RECORD.bench_ms if s == section]
        timed = sum(max(5, rep // 4) + rep for rep in benched) / 1e3 + BENCH_OVERHEAD_S * len(
            benched)
        sections[section] = dict(
            counts=dict(counts), timed_cells=len(benched),
            seconds=dict(compile=counts["compiles"] * compile_s,
                         launchers=counts["launchers"] * LAUNCHER_S,
                         autotune=counts["autotune timings"] * AUTOTUNE_CONFIG_S,
                         timing=timed, checks=counts["checks"] * CHECK_S))
    sections.setdefault("ViT", dict(counts={}, timed_cells=0, seconds={}))
    sections["ViT"]["seconds"]["transforms (measured here)"] = RECORD.transform_s
    sections["ViT"]["seconds"]["models built and first steps"] = VIT_SETUP_S
    sections["imports"] = dict(counts={}, timed_cells=0, seconds=dict(
        imports=imports_s, cuda_init=CUDA_INIT_S))
    total = sum(sum(s["seconds"].values()) for s in sections.values())
    return dict(sections=sections, total_s=total)


def markdown(result: dict) -> str:
    lines = ["# benchmarks/gpu.py on an H200, replayed on the CPU", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", "",
             "| section | launches | compiles | launchers | autotune keys | autotune timings "
             "| timed cells | estimated s |", "|---|---|---|---|---|---|---|---|"]
    for name, section in result["estimate"]["sections"].items():
        c = section["counts"]
        lines.append(f"| {name} | {c.get('launches', 0)} | {c.get('compiles', 0)} | "
                     f"{c.get('launchers', 0)} | "
                     f"{c.get('autotune keys', 0)} | {c.get('autotune timings', 0)} | "
                     f"{section['timed_cells']} | {sum(section['seconds'].values()):.1f} |")
    totals = result["totals"]
    lines += [f"| **total** | {totals['launches']} | {totals['compiles']} | "
              f"{totals['launchers']} | "
              f"{totals['autotune keys']} | {totals['autotune timings']} | "
              f"{totals['timed cells']} | **{result['estimate']['total_s']:.0f}** |", "",
              "Assumptions:", ""] + [f"- {a}" for a in result["assumptions"]] + [
              "", f"Specialisations launched that the variant audit does not compile: "
              f"{len(result['unaudited'])}"] + [f"- `{u}`" for u in result["unaudited"]] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--compile-s", type=float, default=None,
                        help="seconds per JIT compile (default: measured here)")
    parser.add_argument("--compile-samples", type=int, default=24)
    parser.add_argument("--tiny", action="store_true",
                        help="replay gpu.py --tiny (seconds: a smoke run of this script)")
    args = parser.parse_args()
    command = command_line()
    imports_s = time.perf_counter() - STARTED
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, replaying():
        sys.argv = ["gpu.py", "--out", scratch, "--budget-s", "1e9"] + (
            ["--tiny"] if args.tiny else [])
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its figures are placeholders
                gpu.main()
        except SystemExit as stop:
            if stop.code:
                raise SystemExit(f"the replayed run stopped with {stop.code}")
    replay_s = time.perf_counter() - started
    compile_s = args.compile_s or compile_seconds(args.compile_samples)
    result = dict(command=command, machine=machine_line(machine()),
                  replay_s=replay_s, compile_s=compile_s, unaudited=unaudited(),
                  estimate=estimate(compile_s, imports_s))
    totals = collections.Counter()
    for section in result["estimate"]["sections"].values():
        totals.update(section["counts"])
        totals["timed cells"] += section["timed_cells"]
    result["totals"] = dict(totals)
    result["assumptions"] = [
        f"a JIT compile (to a cubin) takes {compile_s:.2f} s: "
        + (f"the median of {args.compile_samples} variants compiled here in one process, "
           "fresh cache" if not args.compile_s else "the value given"),
        f"Triton 3.6 (the device image's) builds a C launcher per distinct signature in "
        f"{LAUNCHER_S:.0f} s (Triton 3.9's launcher is generic: none)",
        f"an autotune timing takes {AUTOTUNE_CONFIG_S * 1e3:.0f} ms (do_bench warmup "
        f"{triton_runtime.AUTOTUNE_WARMUP_MS} ms, rep {triton_runtime.AUTOTUNE_REP_MS} ms, "
        "plus its estimating calls)",
        f"a timed cell takes its do_bench warmup and rep plus {BENCH_OVERHEAD_S * 1e3:.0f} ms; "
        "a float64 check " f"{CHECK_S * 1e3:.0f} ms",
        f"imports as measured here ({imports_s:.1f} s), CUDA start {CUDA_INIT_S:.0f} s; the "
        f"ViT transforms as long as here, building and first-stepping the ViTs "
        f"{VIT_SETUP_S:.0f} s; the kernels' own run time inside the timings",
        "the device machine's own start-up is not in the estimate"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_replay.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_replay.md").write_text(markdown(result))
    print(f"{totals['compiles']} compiles, {totals['autotune keys']} autotune keys "
          f"({totals['autotune timings']} timings), {totals['timed cells']} timed cells: "
          f"about {result['estimate']['total_s']:.0f} s on an H200 (replayed in "
          f"{replay_s:.0f} s; {args.out}/gpu_replay.md); launched but not in the variant "
          f"audit: {len(result['unaudited'])}")


if __name__ == "__main__":
    main()
