"""sparsefx on a GPU, one command: first correctness on the device, then speed against cuBLAS
in the same run.

    python benchmarks/gpu.py                       # everything; writes benchmarks/results/
                                                   #   gpu_<device>.{json,md}
    python benchmarks/gpu.py --check-only          # correctness only
    python benchmarks/gpu.py --check-only --tiny   # tiny shapes; on a machine without a GPU
                                                   #   it runs the Triton kernels under
                                                   #   TRITON_INTERPRET=1 (CI)
    python benchmarks/gpu.py --tiny                # every step on tiny shapes; without a GPU
                                                   #   the timing is a smoke run of the code
                                                   #   (interpreter, wall clock), not data

1. Correctness: every pattern's op (diag, fan-in, blockdiag), forward and both gradients, in
   fp32 and bf16, against a float64 reference on the same weights; the relative error
   (max |error| / max |reference|) must stay under fp32 1e-5 (3e-4 where TF32 is allowed)
   and bf16 2e-2. Any failure stops the script before timing.
2. Layers: ``triton.testing.do_bench`` medians for dense ``F.linear`` in bf16 (cuBLAS) and
   each pattern's op, at 4096x4096 and the ViT-B shapes (out x in: 3072x768, 768x3072,
   2304x768), 80/90/95 %, batch 1 to 4096, forward and forward+backward; speed-up over
   cuBLAS, and at batch 1 the fraction of the bandwidth bound (bytes the op must move over
   the device-to-device copy bandwidth measured in the same run).
3. Model: a ViT-B/16 training step (HF ``ViTForImageClassification`` from ``ViTConfig()``,
   random weights, bf16 autocast, AdamW), dense vs each pattern at 90 %.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:  # the Triton kernels on CPU tensors: only the interpreter runs them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsefx  # noqa: E402  (after TRITON_INTERPRET)
from sparsefx.kernels import patterns  # noqa: E402
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


# --------------------------------------------------------------------------- correctness


def check(shapes, rows_list, device: str) -> list[dict]:
    """Forward, input gradient and values gradient of every pattern against float64."""
    results = []
    tf32 = ON_GPU and torch.backends.cuda.matmul.allow_tf32
    for pattern in PATTERNS:
        for out_features, in_features in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                for rows in rows_list:
                    generator = torch.Generator().manual_seed(rows)
                    op, values, dense, stored = sparse_operands(pattern, out_features, in_features,
                                                        0.9, dtype, device, generator)
                    x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
                    grad_out = torch.randn(rows, out_features, generator=generator).to(
                        device, dtype)
                    x.requires_grad_()
                    values.requires_grad_()
                    y = op(x, values)
                    grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_out)
                    x64 = x.detach().double().requires_grad_()
                    w64 = dense.clone().requires_grad_()
                    y64 = F.linear(x64, w64)
                    ref_grad_x, ref_grad_w = torch.autograd.grad(y64, (x64, w64),
                                                                 grad_out.double())
                    errors = dict(forward=relative_error(y, y64),
                                  grad_x=relative_error(grad_x, ref_grad_x),
                                  grad_values=relative_error(grad_values, ref_grad_w[stored]))
                    bound = TOLERANCE["tf32" if dtype == torch.float32 and tf32 else dtype]
                    results.append(dict(pattern=pattern, shape=[out_features, in_features],
                                        rows=rows, dtype=str(dtype).removeprefix("torch."),
                                        errors=errors, bound=bound,
                                        ok=max(errors.values()) <= bound))
                    print(f"check {pattern:9s} {out_features}x{in_features} rows {rows:4d} "
                          f"{results[-1]['dtype']:8s} "
                          + " ".join(f"{k} {v:.1e}" for k, v in errors.items())
                          + f"  (bound {bound:.0e}) {'ok' if results[-1]['ok'] else 'FAILED'}",
                          flush=True)
    return results


# -------------------------------------------------------------------------------- timing


def bench_ms(fn) -> float:
    """``triton.testing.do_bench``'s median (it flushes L2 between calls), in ms; without a
    GPU the median of 3 wall-clock calls (a smoke run of this script, not a measurement)."""
    if not ON_GPU:
        import statistics
        import time
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(size: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of ``size`` bytes."""
    source = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * source.numel() / (bench_ms(lambda: target.copy_(source)) * 1e-3)


def time_layers(shapes, sparsities, batches, bandwidth: float) -> list[dict]:
    """Dense ``F.linear`` (cuBLAS) and every pattern's op in bf16, forward and
    forward+backward, one row per (shape, batch, pass, candidate)."""
    rows = []
    dtype = torch.bfloat16
    for out_features, in_features in shapes:
        generator = torch.Generator().manual_seed(0)
        weight = (torch.randn(out_features, in_features, generator=generator)
                  / in_features ** 0.5).to(DEVICE, dtype).requires_grad_()
        candidates = [("dense", None, lambda x, w=weight: F.linear(x, w), (weight,),
                       weight.numel() * 2)]
        for pattern in PATTERNS:
            for sparsity in sparsities:
                op, values, _, stored = sparse_operands(pattern, out_features, in_features,
                                                        sparsity, dtype, DEVICE, generator)
                values.requires_grad_()
                structure_bytes = (stored[1].numel() * 2 if pattern == "fanin"
                                   else values.shape[0] * 8)
                candidates.append((pattern, sparsity, lambda x, op=op, v=values: op(x, v),
                                   (values,), values.numel() * 2 + structure_bytes))
        for batch in batches:
            x = torch.randn(batch, in_features, device=DEVICE, dtype=dtype, requires_grad=True)
            grad_out = torch.randn(batch, out_features, device=DEVICE, dtype=dtype)
            for step in ("forward", "forward+backward"):
                dense_ms = None
                for name, sparsity, run, params, weight_bytes in candidates:
                    if step == "forward":
                        fn = torch.no_grad()(lambda run=run: run(x))
                    else:
                        fn = lambda run=run, params=params: torch.autograd.grad(  # noqa: E731
                            run(x), (x, *params), grad_out)
                    ms = bench_ms(fn)
                    dense_ms = ms if name == "dense" else dense_ms
                    moved = weight_bytes + (x.numel() + grad_out.numel()) * 2
                    row = dict(shape=[out_features, in_features], batch=batch, step=step,
                               pattern=name, sparsity=sparsity, ms=ms,
                               speedup=dense_ms / ms,
                               bandwidth_fraction=(moved / (ms * 1e-3) / bandwidth
                                                   if batch == 1 and step == "forward"
                                                   else None))
                    rows.append(row)
                    print(f"{out_features}x{in_features} b{batch:<5d} {step:16s} {name:9s} "
                          f"{fmt(sparsity, '.0%', ''):4s} {ms:8.4f} ms  x{row['speedup']:.2f}",
                          flush=True)
    return rows


def time_vit_training(batch: int, tiny: bool = False) -> list[dict]:
    """A ViT-B/16 training step (bf16 autocast, AdamW), dense vs each pattern at 90 %
    (``tiny``: a one-layer ViT of width 64 on 32-pixel images)."""
    from transformers import ViTConfig, ViTForImageClassification
    config = (ViTConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                        intermediate_size=256, image_size=32, patch_size=8, num_labels=10)
              if tiny else ViTConfig(num_labels=1000))
    torch.manual_seed(0)
    dense = ViTForImageClassification(config)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=DEVICE)
    labels = torch.randint(0, config.num_labels, (batch,), device=DEVICE)
    rows = []
    for name in ("dense", *PATTERNS):
        model = dense if name == "dense" else sparsefx.transform(dense, name, 0.9,
                                                                 keep_last_dense=True)
        model = model.to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(pixels).logits, labels)
            loss.backward()
            optimizer.step()
        ms = bench_ms(step)
        rows.append(dict(model="tiny ViT" if tiny else "ViT-B/16", batch=batch, pattern=name,
                         ms=ms))
        print(f"ViT training step b{batch} {name:9s} {ms:8.2f} ms", flush=True)
        model.cpu()
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
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
                    triton=triton.__version__, python=platform.python_version())
    if not ON_GPU:
        return dict(gpu="cpu interpreter smoke run", capability="0.0", multiprocessors=0,
                    **versions)
    properties = torch.cuda.get_device_properties(0)
    return dict(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                multiprocessors=properties.multi_processor_count, **versions)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + results["device"]["gpu"].lower().replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    info = results["device"]
    title = ("# sparsefx on a GPU" if ON_GPU else
             "# benchmarks/gpu.py smoke run without a GPU (interpreter, wall clock: not data)")
    lines = [title, "",
             f"Command: `{results['command']}`  ",
             f"Device: {info['gpu']} (sm_{info['capability'].replace('.', '')}, "
             f"{info['multiprocessors']} SMs), driver {info['driver']}, CUDA {info['cuda']}; "
             f"torch {info['torch']}, Triton {info['triton']}  ",
             f"Copy bandwidth measured: {results['copy_bandwidth'] / 1e9:.0f} GB/s", "",
             "## Correctness (relative error against float64)", ""]
    lines += markdown_table(
        ["pattern", "shape", "rows", "dtype", "forward", "grad x", "grad values", "bound"],
        [[c["pattern"], "x".join(map(str, c["shape"])), str(c["rows"]), c["dtype"],
          *(f"{c['errors'][k]:.1e}" for k in ("forward", "grad_x", "grad_values")),
          f"{c['bound']:.0e}"] for c in results["checks"]], "lllrrrrr")
    lines += ["", "## Layers: bf16, speed-up over cuBLAS (`F.linear`)", ""]
    lines += markdown_table(
        ["layer (out x in)", "batch", "pass", "pattern", "sparsity", "ms", "vs cuBLAS",
         "of bandwidth bound"],
        [["x".join(map(str, r["shape"])), str(r["batch"]), r["step"], r["pattern"],
          fmt(r["sparsity"], ".0%", ""), f"{r['ms']:.4f}", f"{r['speedup']:.2f}",
          fmt(r["bandwidth_fraction"], ".0%", "")] for r in results["layers"]], "lrllrrrr")
    if results.get("model"):
        lines += ["", f"## {results['model'][0]['model']} training step (bf16 autocast, AdamW), "
                  "90 %", ""]
        lines += markdown_table(["pattern", "batch", "ms", "vs dense"],
                                [[r["pattern"], str(r["batch"]), f"{r['ms']:.2f}",
                                  f"{r['speedup']:.2f}"] for r in results["model"]], "lrrr")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


# --------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (interpreter: CI)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--vit-batch", type=int, default=64)
    args = parser.parse_args()
    if not ON_GPU and not args.tiny:
        parser.error("no CUDA device: only --tiny runs here (on the interpreter)")
    def kernels():  # the Triton kernels: on the GPU, or on CPU tensors under the interpreter
        return (contextlib.nullcontext() if ON_GPU
                else sparsefx.kernels.use_cpu_kernels("triton"))

    with kernels():
        checks = check(TINY_SHAPES if args.tiny else SHAPES[:2],
                       (1, 20) if args.tiny else (1, 32, 300), DEVICE)
    failed = [c for c in checks if not c["ok"]]
    print(f"correctness: {len(checks) - len(failed)} of {len(checks)} within bounds")
    if failed or args.check_only:
        raise SystemExit(1 if failed else 0)
    with kernels():
        results = dict(command=command_line(), device=device_info(), checks=checks,
                       copy_bandwidth=copy_bandwidth(1 << 20 if args.tiny else 1 << 30))
        results["layers"] = time_layers(TINY_SHAPES if args.tiny else SHAPES,
                                        SPARSITIES[1:2] if args.tiny else SPARSITIES,
                                        (1, 20) if args.tiny else BATCHES,
                                        results["copy_bandwidth"])
        write(results, args.out)  # the layer table first: the model can run out of time
        results["model"] = time_vit_training(2 if args.tiny else args.vit_batch, args.tiny)
        write(results, args.out)


if __name__ == "__main__":
    main()
