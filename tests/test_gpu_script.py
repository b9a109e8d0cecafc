"""benchmarks/gpu.py's correctness part, on tiny shapes: on the Triton kernels under the
interpreter here (as in CI), on the device where there is one."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_script_checks_every_pattern_against_float64(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--check-only", "--tiny",
                          "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("check ")]
    for pattern in ("diag", "fanin", "blockdiag"):
        for dtype in ("float32", "bfloat16"):
            assert sum(f" {pattern} " in line and f" {dtype} " in line
                       for line in lines) == 4, (pattern, dtype)
    assert all(line.endswith(" ok") for line in lines)
    assert "correctness: 24 of 24 within bounds" in run.stdout
