"""CPU speed of the sparse linear ops against dense F.linear and CSR, measured in one run.

One 4096x4096 layer at 90 % sparsity (diag: 410 of 4096 diagonals; fanin: 410 entries per
row), batch 1 and 256, forward and forward+backward. Every ratio compares timings taken in
the same run, interleaved over several rounds; each timing is the median of a
``torch.utils.benchmark`` blocked autorange, and each ratio the median over rounds.

    python benchmarks/bench_ops_cpu.py            # writes benchmarks/results/ops_cpu.{json,md}
    python benchmarks/bench_ops_cpu.py --quick    # fewer rounds, shorter timings
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import sparsefx  # noqa: F401  (registers torch.ops.sparsefx)
from sparsefx.kernels import cpu_kernels, patterns, use_cpu_kernels

RESULTS = Path(__file__).parent / "results"


def csr_int32(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as CSR with int32 indices (half the index bytes of PyTorch's default)."""
    csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32),
                                   csr.col_indices().to(torch.int32), csr.values(),
                                   size=weight.shape)


def make_cases(batch: int, features: int, sparsity: float, generator: torch.Generator):
    """name -> (forward, forward+backward) callables, all computing the same kind of layer."""
    x = torch.randn(batch, features, generator=generator)
    grad_out = torch.randn(batch, features, generator=generator)
    dense_weight = torch.randn(features, features, generator=generator) / features ** 0.5

    num_kept = patterns.diag_num_kept(features, features, sparsity)
    offsets = patterns.random_diag_offsets(features, features, num_kept, generator)
    diag_values = torch.randn(num_kept, features, generator=generator) / num_kept ** 0.5
    fan_in = patterns.fanin_num_kept(features, sparsity)
    indices = patterns.random_fanin_indices(features, features, fan_in, generator)
    fanin_values = torch.randn(features, fan_in, generator=generator) / fan_in ** 0.5

    def dense_forward():
        return F.linear(x, dense_weight)

    x_grad = x.clone().requires_grad_()
    weight_grad = dense_weight.clone().requires_grad_()

    def dense_train():
        F.linear(x_grad, weight_grad).backward(grad_out)

    def sparse_pair(run_op, values):
        values_grad = values.clone().requires_grad_()
        return (lambda: run_op(x, values),
                lambda: run_op(x_grad, values_grad).backward(grad_out))

    def csr_pair(weight):
        """The CSR baseline at its best: W and W.T built once (as if cached until the
        structure changes); the values gradient is the sampled product dY.T @ x at W's
        pattern."""
        w_csr, wt_csr = csr_int32(weight), csr_int32(weight.T.contiguous())
        pattern = torch.sparse_csr_tensor(w_csr.crow_indices(), w_csr.col_indices(),
                                          torch.zeros_like(w_csr.values()), size=weight.shape)
        forward = lambda: torch.mm(w_csr, x.T).T

        def train():
            torch.mm(w_csr, x.T)                                     # y.T = W @ x.T
            torch.mm(wt_csr, grad_out.T)                             # dx.T = W.T @ dy.T
            torch.sparse.sampled_addmm(pattern, grad_out.T, x)       # dW at W's pattern
        return forward, train

    diag_op = lambda x, v: torch.ops.sparsefx.diag_linear(x, v, offsets, features)
    fanin_op = lambda x, v: torch.ops.sparsefx.fanin_linear(x, v, indices)
    return {
        "dense F.linear": (dense_forward, dense_train),
        "diag: sparsefx": sparse_pair(diag_op, diag_values),
        "diag: CSR": csr_pair(patterns.diag_to_dense(diag_values, offsets, features, features)),
        "fanin: sparsefx": sparse_pair(fanin_op, fanin_values),
        "fanin: CSR": csr_pair(patterns.fanin_to_dense(fanin_values, indices, features)),
    }


def measure(fn, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run(features: int, sparsity: float, batches: list[int], rounds: int, min_run_time: float,
        with_fallback: bool):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        cases = make_cases(batch, features, sparsity, generator)
        if with_fallback:
            cases |= fallback_cases(cases)
        for mode_index, mode in enumerate(("forward", "forward+backward")):
            samples = {name: [] for name in cases}
            for _ in range(rounds):
                for name, fns in cases.items():
                    samples[name].append(measure(fns[mode_index], min_run_time))
            dense = samples["dense F.linear"]
            for name, times in samples.items():
                ratio = statistics.median(d / t for d, t in zip(dense, times, strict=True))
                rows.append(dict(batch=batch, mode=mode, candidate=name,
                                 median_ms=1e3 * statistics.median(times),
                                 speedup_vs_dense=ratio))
                print(f"batch {batch:4d} {mode:17s} {name:26s} "
                      f"{1e3 * statistics.median(times):9.3f} ms  {ratio:6.2f}x vs dense")
    return rows


def fallback_cases(cases):
    """The same sparsefx ops on the PyTorch fallback kernels, to show why native is kept."""
    def on_fallback(fn):
        def wrapped():
            with use_cpu_kernels("torch"):
                return fn()
        return wrapped
    return {f"{name} (torch fallback)": tuple(on_fallback(f) for f in fns)
            for name, fns in cases.items() if name.endswith("sparsefx")}


def machine() -> dict:
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


def write(rows, info, args):
    RESULTS.mkdir(exist_ok=True)
    payload = dict(command=args.command, machine=info, features=args.features,
                   sparsity=args.sparsity, rows=rows)
    (RESULTS / "ops_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"`{args.command}` on {info['cpu']} ({info['torch_threads']} threads, torch "
             f"{info['torch']}); {args.features}x{args.features} at {args.sparsity:.0%} "
             "sparsity; speed-up = dense time / candidate time, same run.", "",
             "| batch | pass | candidate | median ms | speed-up vs dense |",
             "|---:|---|---|---:|---:|"]
    lines += [f"| {r['batch']} | {r['mode']} | {r['candidate']} | {r['median_ms']:.3f} | "
              f"{r['speedup_vs_dense']:.2f}x |" for r in rows]
    (RESULTS / "ops_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'ops_cpu.json'} and {RESULTS / 'ops_cpu.md'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--fallback", action="store_true",
                        help="also time the PyTorch fallback kernels (slow)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.1 s each")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.min_run_time = 2, 0.1
    args.command = "python benchmarks/bench_ops_cpu.py" + (
        " --fallback" if args.fallback else "")
    info = machine()
    print(info)
    rows = run(args.features, args.sparsity, args.batches, args.rounds, args.min_run_time,
               args.fallback)
    if not args.no_write:
        write(rows, info, args)


if __name__ == "__main__":
    main()
