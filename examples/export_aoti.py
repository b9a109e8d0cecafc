"""Deploy a sparse model: ``torch.export``, then an AOTInductor package that runs on the CPU
with sparsefx's C++ ops, checked against eager and timed next to it.

    python examples/export_aoti.py                        # diag and fan-in MLPs at 90 %
    python examples/export_aoti.py --out deploy/ --rounds 9

For each pattern: transform a 256-1024-1024-10 MLP, ``torch.export.export`` it (the sparse
ops stay ops in the graph), compile it with ``torch._inductor.aoti_compile_and_package`` into
a ``.pt2`` package, load it back with ``torch._inductor.aoti_load_package`` and compare its
outputs with eager. Then time eager and the package at batch 1 and 64, interleaved in the
same run (medians; ratios > 1: the package is faster).

The package calls the ops through the dispatcher: the process that runs it must have them
registered. ``import sparsefx`` registers them in Python; the model's own code is not
needed. With ``--runner``, a C++ program without Python (``examples/aoti_runner.cpp``,
compiled with the ops' schemas and C++ kernels by ``sparsefx.kernels.deployment``) runs
each package too, and its outputs are checked against eager.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import sparsefx
from common import interleaved_ms  # this folder is on sys.path


def package(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` exported (the batch dimension dynamic) and compiled into ``path``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the packages")
    parser.add_argument("--patterns", nargs="+", default=["diag", "fanin"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runner", action="store_true",
                        help="also run each package from C++, without Python")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sparsefx-aoti-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(256, args.hidden), nn.GELU(),
                          nn.Linear(args.hidden, args.hidden), nn.GELU(),
                          nn.Linear(args.hidden, 10))
    for pattern in args.patterns:
        sparse = sparsefx.transform(dense, pattern, args.sparsity).eval()
        path = package(sparse, torch.randn(8, 256), out / f"{pattern}.pt2")
        runner = torch._inductor.aoti_load_package(str(path))
        line = [f"{pattern}: {path} ({path.stat().st_size / 1e6:.1f} MB)"]
        for batch in (1, 64):
            x = torch.randn(batch, 256)
            with torch.no_grad():
                expected, got = sparse(x), runner(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                ms = interleaved_ms({"eager": lambda: sparse(x), "package": lambda: runner(x)},
                                    rounds=args.rounds)
            line.append(f"batch {batch}: eager {ms['eager']:.3f} ms, package "
                        f"{ms['package']:.3f} ms ({ms['eager'] / ms['package']:.2f}x)")
        if args.runner:
            line.append(run_from_cpp(sparse, path))
        print("\n  ".join(line) + "\n  outputs equal to eager (rtol 1e-5)")


def run_from_cpp(sparse: nn.Module, path: Path, rows: int = 4) -> str:
    """Run the package ``path`` from the C++ runner; check it against eager."""
    import subprocess

    from sparsefx.kernels import deployment

    runner = deployment.build_runner(Path(__file__).parent / "aoti_runner.cpp")
    printed = subprocess.run([str(runner), str(path), str(rows), "256"], check=True,
                             capture_output=True, text=True,
                             env=deployment.runner_environment()).stdout
    got = torch.tensor([float(v) for v in printed.split()]).view(rows, -1)
    x = torch.arange(rows * 256, dtype=torch.float32).view(rows, 256).mul_(0.37).sin_()
    with torch.no_grad():
        torch.testing.assert_close(got, sparse(x), rtol=1e-5, atol=1e-6)
    return f"C++ runner without Python ({runner.name}): outputs equal to eager"


if __name__ == "__main__":
    main()
