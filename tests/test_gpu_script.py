"""benchmarks/gpu.py on tiny shapes: on the Triton kernels under the interpreter here (as in
CI), on the device where there is one. Without a GPU its timing is a smoke run of the code,
so that a lent GPU's minutes are not lost to a bug in it."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_script_checks_every_pattern_then_times_every_step(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("check ")]
    for pattern in ("diag", "fanin", "blockdiag"):
        for dtype in ("float32", "bfloat16"):
            assert sum(f" {pattern} " in line and f" {dtype} " in line
                       for line in lines) == 4, (pattern, dtype)
    assert all(line.endswith(" ok") for line in lines)
    assert "correctness: 24 of 24 within bounds" in run.stdout
    (written,) = tmp_path.glob("gpu_*.json")
    results = json.loads(written.read_text())
    assert {r["pattern"] for r in results["layers"]} == {"dense", "diag", "fanin", "blockdiag"}
    assert {r["step"] for r in results["layers"]} == {"forward", "forward+backward"}
    assert [r["pattern"] for r in results["model"]] == ["dense", "diag", "fanin", "blockdiag"]
    assert written.with_suffix(".md").read_text().count("\n| ") > 40
