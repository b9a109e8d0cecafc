"""sparsefx on a GPU, one command: first correctness on the device, then speed against cuBLAS
in the same run, inside a time budget.

    python benchmarks/gpu.py --out DIR             # everything, within --budget-s (270 s);
                                                   #   writes DIR/gpu_<device>.{json,md}
    python benchmarks/gpu.py --check-only          # correctness only
    python benchmarks/gpu.py --tiny --budget-s 20  # tiny shapes; on a machine without a GPU
                                                   #   it runs the Triton kernels under
                                                   #   TRITON_INTERPRET=1 (CI): the timing is
                                                   #   a smoke run of the code, not data

1. Correctness: every pattern's op (diag, fan-in, blockdiag), forward and both gradients, in
   fp32 and bf16, against a float64 reference on the same weights; the relative error
   (max |error| / max |reference|) must stay under fp32 1e-5 (3e-4 where TF32 is allowed)
   and bf16 2e-2. A failure writes the results (the failing cells marked) and stops the
   script before timing.
2. Layers: ``triton.testing.do_bench`` medians for dense ``F.linear`` in bf16 (cuBLAS) and
   each pattern's op, at 4096x4096 and the ViT-B shapes (out x in: 3072x768, 768x3072,
   2304x768), 80/90/95 %, batch 1 to 4096, forward and forward+backward; speed-up over
   cuBLAS, and at batch 1 the fraction of the bandwidth bound (bytes the op must move over
   the device-to-device copy bandwidth measured in the same run). Every timed cell is first
   checked once against the float64 reference, after the call that autotuned it, so the
   configurations timed are the ones verified.
3. Model: a ViT-B/16 training step (HF ``ViTForImageClassification`` from ``ViTConfig()``,
   random weights, bf16 autocast, AdamW), dense vs each pattern at 90 %, in interleaved
   rounds.

The results are written after the correctness section and after each shape, so a run cut
off (``--budget-s``, or the machine taken back) leaves what it measured; what the budget left
out is listed as skipped. Stdout has one line per section (and per shape); the cells are in
the files. Autotuning results persist within the run (``TRITON_CACHE_AUTOTUNING=1``), and the
native CPU kernels are not built (``SPARSEFX_CPU_KERNELS=torch``): nothing here uses them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

STARTED = time.perf_counter()  # the budget counts the imports too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:  # the Triton kernels on CPU tensors: only the interpreter runs them
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # read when Triton is imported
os.environ.setdefault("SPARSEFX_CPU_KERNELS", "torch")  # no native build: unused here

import sparsefx  # noqa: E402  (after TRITON_INTERPRET)
from sparsefx.kernels import patterns  # noqa: E402
from sparsefx.kernels.triton_runtime import interpreter_problem  # noqa: E402
from sparsefx.registry import build_layer  # noqa: E402

from common import command_line, fmt, markdown_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PATTERNS = ("diag", "fanin", "blockdiag")
SHAPES = [(4096, 4096), (3072, 768), (768, 3072), (2304, 768)]  # (out, in)
TINY_SHAPES = [(48, 32), (32, 64)]
SPARSITIES = (0.8, 0.9, 0.95)
BATCHES = (1, 8, 32, 256, 4096)
TOLERANCE = {torch.float32: 1e-5, "tf32": 3e-4, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------------ operands


def sparse_operands(pattern: str, out_features: int, in_features: int, sparsity: float,
                    dtype: torch.dtype, device: str, generator: torch.Generator):
    """``(op, values, dense weight, stored)`` for a random structure drawn by the pattern's
    layer (``init="random"``): ``op(x, values)`` runs the pattern's op; the dense weight
    (float64) is the reference it must match, and ``stored`` (rows, columns) says where each
    value sits in it."""
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    layer = build_layer(pattern, weight, None, sparsity=sparsity, init="random",
                        generator=generator).to(dtype)  # the reference: the values as stored
    structure = layer.structure.to(device)
    if pattern == "fanin":
        stored = (torch.arange(out_features)[:, None].expand_as(layer.indices),
                  layer.indices.long())
        op = lambda x, v: torch.ops.sparsefx.fanin_linear(x, v, structure)  # noqa: E731
    else:
        stored = patterns.diag_coordinates(layer.offsets, out_features, in_features)
        if pattern == "blockdiag":
            op = lambda x, v: torch.ops.sparsefx.blockdiag_linear(  # noqa: E731
                x, v, structure, out_features, layer.groups)
        else:
            op = lambda x, v: torch.ops.sparsefx.diag_linear(x, v, structure,  # noqa: E731
                                                             out_features)
    dense = layer.dense_weight().double()
    return (op, layer.values.detach().to(device), dense.to(device),
            tuple(t.to(device) for t in stored))


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (actual.double() - reference).abs().max().item() / (scale or 1.0)


# --------------------------------------------------------------------------------- budget


class Budget:
    """The run's wall-clock allowance: what is left, and each section's seconds."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = STARTED
        self.sections: dict[str, float] = dict(imports=time.perf_counter() - STARTED)
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str) -> bool:
        """Whether time is left to start ``what``; if not it is recorded as skipped."""
        if self.left() > 0:
            return True
        self.skipped.append(what)
        return False

    @contextlib.contextmanager
    def section(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - started


# --------------------------------------------------------------------------- correctness


def errors_against_reference(run, x, grad_out, params, dense, stored, backward: bool) -> dict:
    """Relative errors of ``run(x)`` (and, with ``backward``, of the gradients of ``x`` and
    of the stored values ``params[0]``, which sit at ``stored`` in the dense weight, or are
    all of it where ``stored`` is None) against float64 ``F.linear`` on ``dense``."""
    x64 = x.detach().double().requires_grad_(backward)
    w64 = dense.clone().requires_grad_(backward)
    if not backward:
        with torch.no_grad():
            return dict(forward=relative_error(run(x), F.linear(x64, w64)))
    y = run(x)
    grad_x, grad_values = torch.autograd.grad(y, (x, params[0]), grad_out)
    y64 = F.linear(x64, w64)
    ref_grad_x, ref_grad_w = torch.autograd.grad(y64, (x64, w64), grad_out.double())
    return dict(forward=relative_error(y, y64), grad_x=relative_error(grad_x, ref_grad_x),
                grad_values=relative_error(grad_values, ref_grad_w if stored is None
                                           else ref_grad_w[stored]))


def bound_for(dtype: torch.dtype) -> float:
    tf32 = ON_GPU and torch.backends.cuda.matmul.allow_tf32
    return TOLERANCE["tf32" if dtype == torch.float32 and tf32 else dtype]


def check(shapes, rows_list, device: str, budget: Budget) -> list[dict]:
    """Forward, input gradient and values gradient of every pattern against float64."""
    results = []
    for pattern in PATTERNS:
        for out_features, in_features in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                if not budget.allows(f"check {pattern} {out_features}x{in_features} {dtype}"):
                    continue
                for rows in rows_list:
                    generator = torch.Generator().manual_seed(rows)
                    op, values, dense, stored = sparse_operands(
                        pattern, out_features, in_features, 0.9, dtype, device, generator)
                    x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
                    grad_out = torch.randn(rows, out_features, generator=generator).to(
                        device, dtype)
                    x.requires_grad_()
                    values.requires_grad_()
                    errors = errors_against_reference(lambda x: op(x, values), x, grad_out,
                                                      (values,), dense, stored, backward=True)
                    bound = bound_for(dtype)
                    results.append(dict(pattern=pattern, shape=[out_features, in_features],
                                        rows=rows, dtype=str(dtype).removeprefix("torch."),
                                        errors=errors, bound=bound,
                                        ok=max(errors.values()) <= bound))
    return results


# -------------------------------------------------------------------------------- timing


def bench_ms(fn, rep_ms: int = 100) -> float:
    """``triton.testing.do_bench``'s median (it flushes L2 between calls) over ``rep_ms``, in
    ms; without a GPU the median of 3 wall-clock calls (a smoke run of this script, not a
    measurement)."""
    if not ON_GPU:
        import statistics
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                   return_mode="median")


def copy_bandwidth(size: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of ``size`` bytes."""
    source = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * source.numel() / (bench_ms(lambda: target.copy_(source)) * 1e-3)


def time_shape(out_features: int, in_features: int, sparsities, batches, bandwidth: float,
               budget: Budget) -> list[dict]:
    """Dense ``F.linear`` (cuBLAS) and every pattern's op in bf16 at one shape, forward and
    forward+backward, one row per (batch, pass, candidate), each checked against float64
    once before it is timed."""
    rows = []
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator)
              / in_features ** 0.5).to(DEVICE, dtype).requires_grad_()
    candidates = [("dense", None, lambda x, w=weight: F.linear(x, w), (weight,),
                   weight.numel() * 2, weight.detach().double(), None)]
    for pattern in PATTERNS:
        for sparsity in sparsities:
            op, values, dense, stored = sparse_operands(pattern, out_features, in_features,
                                                        sparsity, dtype, DEVICE, generator)
            values.requires_grad_()
            structure_bytes = (stored[1].numel() * 2 if pattern == "fanin"
                               else values.shape[0] * 8)
            candidates.append((pattern, sparsity, lambda x, op=op, v=values: op(x, v),
                               (values,), values.numel() * 2 + structure_bytes, dense, stored))
    bound = bound_for(dtype)
    for batch in batches:
        if not budget.allows(f"layers {out_features}x{in_features} batch {batch}"):
            continue
        x = torch.randn(batch, in_features, device=DEVICE, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(batch, out_features, device=DEVICE, dtype=dtype)
        for step in ("forward", "forward+backward"):
            dense_ms = None
            for name, sparsity, run, params, weight_bytes, dense, stored in candidates:
                backward = step != "forward"
                if backward:
                    fn = lambda run=run, params=params: torch.autograd.grad(  # noqa: E731
                        run(x), (x, *params), grad_out)
                else:
                    fn = torch.no_grad()(lambda run=run: run(x))
                fn()  # autotunes this key: the configuration checked next is the one timed
                errors = errors_against_reference(run, x, grad_out, params, dense, stored,
                                                  backward)
                ms = bench_ms(fn)
                dense_ms = ms if name == "dense" else dense_ms
                moved = weight_bytes + (x.numel() + grad_out.numel()) * 2
                rows.append(dict(shape=[out_features, in_features], batch=batch, step=step,
                                 pattern=name, sparsity=sparsity, ms=ms,
                                 speedup=dense_ms / ms, errors=errors,
                                 ok=max(errors.values()) <= bound,
                                 bandwidth_fraction=(moved / (ms * 1e-3) / bandwidth
                                                     if batch == 1 and step == "forward"
                                                     else None)))
    return rows


def time_vit_training(batch: int, budget: Budget, tiny: bool = False,
                      rounds: int = 3) -> list[dict]:
    """A ViT-B/16 training step (bf16 autocast, AdamW), dense vs each pattern at 90 %
    (``tiny``: a one-layer ViT of width 64 on 32-pixel images), timed in ``rounds``
    interleaved rounds of about a second each; the step's time is the median over rounds,
    and its speed-up the median of the per-round ratios to dense."""
    import statistics

    if not budget.allows("ViT"):
        return []
    from transformers import ViTConfig, ViTForImageClassification
    config = (ViTConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                        intermediate_size=256, image_size=32, patch_size=8, num_labels=10)
              if tiny else ViTConfig(num_labels=1000))
    torch.manual_seed(0)
    dense = ViTForImageClassification(config)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=DEVICE)
    labels = torch.randint(0, config.num_labels, (batch,), device=DEVICE)
    steps = {}
    for name in ("dense", *PATTERNS):
        if not budget.allows(f"ViT {name}"):
            continue
        model = dense if name == "dense" else sparsefx.transform(
            dense, name, 0.9, init="random", keep_last_dense=True)  # the weights do not matter
        model = model.to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(pixels).logits, labels)
            loss.backward()
            optimizer.step()
        step()  # autotunes and allocates
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(rounds):
        if index and not budget.allows(f"ViT round {index + 1}"):
            break
        for name, step in steps.items():
            times[name].append(bench_ms(step, rep_ms=1000))
    rows = []
    for name, measured in times.items():
        ratios = [d / m for d, m in zip(times.get("dense", []), measured)]
        rows.append(dict(model="tiny ViT" if tiny else "ViT-B/16", batch=batch, pattern=name,
                         ms=statistics.median(measured), rounds=len(measured),
                         speedup=statistics.median(ratios) if ratios else None))
    return rows


def device_info() -> dict:
    import subprocess

    import triton
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = dict(driver=driver, cuda=torch.version.cuda, torch=torch.__version__,
                    triton=triton.__version__, python=platform.python_version(),
                    sparsefx=str(Path(sparsefx.__file__).parent))  # which copy ran
    if not ON_GPU:
        return dict(gpu="cpu interpreter smoke run", capability="0.0", multiprocessors=0,
                    **versions)
    properties = torch.cuda.get_device_properties(0)
    return dict(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                multiprocessors=properties.multi_processor_count, **versions)


def write(results: dict, out: Path) -> None:
    """The JSON and Markdown of what the run has so far (written again after each part)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + results["device"]["gpu"].lower().replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    info = results["device"]
    title = ("# sparsefx on a GPU" if ON_GPU else
             "# benchmarks/gpu.py smoke run without a GPU (interpreter, wall clock: not data)")
    bandwidth = results.get("copy_bandwidth")
    lines = [title, "",
             f"Command: `{results['command']}`  ",
             f"Device: {info['gpu']} (sm_{info['capability'].replace('.', '')}, "
             f"{info['multiprocessors']} SMs), driver {info['driver']}, CUDA {info['cuda']}; "
             f"torch {info['torch']}, Triton {info['triton']}  ",
             f"Budget: {results['budget_s']:.0f} s; seconds per section: "
             + ", ".join(f"{k} {v:.1f}" for k, v in results["sections"].items()) + "  ",
             "Copy bandwidth measured: " + (f"{bandwidth / 1e9:.0f} GB/s" if bandwidth
                                            else "not yet"), ""]
    if results["skipped"]:
        lines += ["**Skipped, out of time:** " + "; ".join(results["skipped"]), ""]
    lines += ["## Correctness (relative error against float64)", ""]
    lines += markdown_table(
        ["pattern", "shape", "rows", "dtype", "forward", "grad x", "grad values", "bound", ""],
        [[c["pattern"], "x".join(map(str, c["shape"])), str(c["rows"]), c["dtype"],
          *(f"{c['errors'][k]:.1e}" for k in ("forward", "grad_x", "grad_values")),
          f"{c['bound']:.0e}", "ok" if c["ok"] else "**FAILED**"] for c in results["checks"]],
        "lllrrrrrl")
    if results.get("layers"):
        lines += ["", "## Layers: bf16, speed-up over cuBLAS (`F.linear`)", "",
                  "Each cell was checked against float64 once, after the call that autotuned "
                  "it (largest relative error of the forward and gradients).", ""]
        lines += markdown_table(
            ["layer (out x in)", "batch", "pass", "pattern", "sparsity", "ms", "vs cuBLAS",
             "of bandwidth bound", "error", ""],
            [["x".join(map(str, r["shape"])), str(r["batch"]), r["step"], r["pattern"],
              fmt(r["sparsity"], ".0%", ""), f"{r['ms']:.4f}", f"{r['speedup']:.2f}",
              fmt(r["bandwidth_fraction"], ".0%", ""), f"{max(r['errors'].values()):.1e}",
              "ok" if r["ok"] else "**FAILED**"] for r in results["layers"]], "lrllrrrrrl")
    if results.get("model"):
        lines += ["", f"## {results['model'][0]['model']} training step (bf16 autocast, AdamW), "
                  "90 %", ""]
        lines += markdown_table(["pattern", "batch", "ms", "vs dense", "rounds"],
                                [[r["pattern"], str(r["batch"]), f"{r['ms']:.2f}",
                                  fmt(r["speedup"], ".2f", ""), str(r["rounds"])]
                                 for r in results["model"]], "lrrrr")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (interpreter: CI)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="wall-clock seconds for the whole run; what is left when they "
                             "run out is skipped, and listed as skipped")
    args = parser.parse_args()
    if not ON_GPU and not args.tiny:
        parser.error("no CUDA device: only --tiny runs here (on the interpreter)")
    if (problem := interpreter_problem()) is not None:
        parser.error(f"no CUDA device, and {problem}")
    budget = Budget(args.budget_s)

    def kernels():  # the Triton kernels: on the GPU, or on CPU tensors under the interpreter
        return (contextlib.nullcontext() if ON_GPU
                else sparsefx.kernels.use_cpu_kernels("triton"))

    results = dict(command=command_line(), device=device_info(), budget_s=args.budget_s,
                   sections=budget.sections, skipped=budget.skipped, checks=[], layers=[],
                   model=[])
    with kernels(), budget.section("correctness"):
        results["checks"] = check(TINY_SHAPES if args.tiny else SHAPES[:2],
                                  (1, 20) if args.tiny else (1, 32, 300), DEVICE, budget)
    failed = [c for c in results["checks"] if not c["ok"]]
    print(f"correctness: {len(results['checks']) - len(failed)} of {len(results['checks'])} "
          f"within bounds ({budget.sections['correctness']:.1f} s)"
          + "".join(f"\n  FAILED {c['pattern']} {c['shape']} rows {c['rows']} {c['dtype']}: "
                    f"{c['errors']}" for c in failed), flush=True)
    write(results, args.out)
    if failed or args.check_only:
        finish(results, args.out, 1 if failed else 0)
    with kernels():
        with budget.section("bandwidth"):
            results["copy_bandwidth"] = copy_bandwidth(1 << 20 if args.tiny else 1 << 30)
        for out_features, in_features in TINY_SHAPES if args.tiny else SHAPES:
            if not budget.allows(f"layers {out_features}x{in_features}"):
                continue
            with budget.section("layers"):
                rows = time_shape(out_features, in_features,
                                  SPARSITIES[1:2] if args.tiny else SPARSITIES,
                                  (1, 20) if args.tiny else BATCHES, results["copy_bandwidth"],
                                  budget)
            results["layers"] += rows
            write(results, args.out)
            best = {}
            for r in rows:
                if r["pattern"] != "dense":
                    best[r["pattern"]] = max(best.get(r["pattern"], 0.0), r["speedup"])
            print(f"layers {out_features}x{in_features}: {len(rows)} cells, "
                  f"{sum(not r['ok'] for r in rows)} failed the check; best vs cuBLAS "
                  + ", ".join(f"{k} x{v:.2f}" for k, v in best.items())
                  + f" ({budget.left():.0f} s left)", flush=True)
        with budget.section("model"):
            results["model"] = time_vit_training(2 if args.tiny else args.vit_batch, budget,
                                                 args.tiny, rounds=1 if args.tiny else 3)
        print("model: " + (", ".join(f"{r['pattern']} {r['ms']:.1f} ms"
                                    + (f" x{r['speedup']:.2f}" if r["speedup"] else "")
                                     for r in results["model"]) or "skipped")
              + f" ({budget.sections['model']:.1f} s)", flush=True)
    failed = [r for r in results["layers"] if not r["ok"]]
    finish(results, args.out, 1 if failed else 0)


def finish(results: dict, out: Path, code: int) -> None:
    write(results, out)
    skipped = results["skipped"]
    print(f"wrote {out}/gpu_*.json and .md; sections (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in results["sections"].items())
          + (f"; skipped, out of time: {len(skipped)} ({skipped[0]} ...)" if skipped else ""),
          flush=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
