"""Deployment: a sparse model through torch.export into an AOTInductor package, run on the
CPU by a fresh process that has sparsefx's ops (``import sparsefx``) but not the model's
code; outputs equal to eager, at the exported batch size and at others (a dynamic batch)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsefx



def package(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` exported (the batch dimension dynamic) and compiled into ``path``, as
    ``examples/export_aoti.py`` does."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path)))


RUNNER = textwrap.dedent("""
    import sys, torch, sparsefx   # the ops; the model's code is not imported
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    torch.save([runner(x) for x in inputs], sys.argv[3])
""")


@pytest.mark.parametrize("pattern", ["diag", "fanin"])
def test_aoti_package_runs_in_a_fresh_process_like_eager(tmp_path, pattern):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 10))
    sparse = sparsefx.transform(dense, pattern, 0.75).eval()
    path = package(sparse, torch.randn(8, 32), tmp_path / "model.pt2")
    inputs = [torch.randn(batch, 32) for batch in (1, 8, 33)]
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", RUNNER, str(path), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], check=True, timeout=600)
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for x, got in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(got, sparse(x), rtol=1e-5, atol=1e-6)


def test_a_cpp_program_without_python_runs_the_package(tmp_path):
    """examples/aoti_runner.cpp, compiled with the sparse ops' schemas (generated from the
    Python SCHEMAS) and C++ kernels, links no Python and runs the package as eager does."""
    from sparsefx.kernels import deployment

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))
    sparse = sparsefx.transform(dense, "fanin", 0.75).eval()
    path = package(sparse, torch.randn(8, 32), tmp_path / "model.pt2")
    runner = deployment.build_runner(Path(__file__).parent.parent / "examples" /
                                     "aoti_runner.cpp")
    linked = subprocess.run(["ldd", str(runner)], capture_output=True, text=True).stdout
    assert "libpython" not in linked and "libtorch_python" not in linked, linked
    rows, width = 5, 32
    printed = subprocess.run([str(runner), str(path), str(rows), str(width)], check=True,
                             capture_output=True, text=True, timeout=300,
                             env=deployment.runner_environment()).stdout
    got = torch.tensor([float(v) for v in printed.split()]).view(rows, 10)
    x = torch.arange(rows * width, dtype=torch.float32).view(rows, width).mul_(0.37).sin_()
    with torch.no_grad():
        torch.testing.assert_close(got, sparse(x), rtol=1e-5, atol=1e-6)
