"""benchmarks/gpu.py on tiny shapes: on the Triton kernels under the interpreter here (as in
CI), on the device where there is one. Without a GPU its timing is a smoke run of the code,
so that a lent GPU's minutes are not lost to a bug in it: every section runs, the results are
written after each part, a spent budget skips what is left (and says so), and a failed check
writes the failing cells before it stops the run."""
import importlib
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu.py"
# without a GPU the script runs its kernels under the interpreter, which some Triton and
# NumPy pairs cannot run; the script then refuses to start (the test session's
# TRITON_INTERPRET is the script's)
from sparsefx.kernels.triton_runtime import interpreter_problem  # noqa: E402

pytestmark = pytest.mark.skipif(interpreter_problem() is not None,
                                reason=str(interpreter_problem()))


def _results(folder: Path) -> tuple[dict, str]:
    (written,) = folder.glob("gpu_*.json")
    return json.loads(written.read_text()), written.with_suffix(".md").read_text()


def test_the_gpu_script_checks_every_pattern_then_times_every_step(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--budget-s", "600", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "correctness: 24 of 24 within bounds" in run.stdout
    assert len(run.stdout.splitlines()) <= 6, run.stdout  # a line per section and shape
    results, markdown = _results(tmp_path)
    cells = {(c["pattern"], c["dtype"]) for c in results["checks"]}
    assert cells == {(p, d) for p in ("diag", "fanin", "blockdiag")
                     for d in ("float32", "bfloat16")}
    assert len(results["checks"]) == 24 and all(c["ok"] for c in results["checks"])
    assert {r["pattern"] for r in results["layers"]} == {"dense", "diag", "fanin", "blockdiag"}
    assert {r["step"] for r in results["layers"]} == {"forward", "forward+backward"}
    for row in results["layers"]:  # every timed cell was checked
        assert row["ok"] and set(row["errors"]) == (
            {"forward"} if row["step"] == "forward" else {"forward", "grad_x", "grad_values"})
    assert [r["pattern"] for r in results["model"]] == ["dense", "diag", "fanin", "blockdiag"]
    assert results["skipped"] == []
    assert set(results["sections"]) == {"imports", "correctness", "bandwidth", "layers",
                                        "model"}
    assert markdown.count("\n| ") > 40 and "FAILED" not in markdown


def test_a_spent_budget_skips_what_is_left_and_still_writes(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--budget-s", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, markdown = _results(tmp_path)
    assert results["checks"] == [] and results["layers"] == [] and results["model"] == []
    assert "check diag 48x32 torch.float32" in results["skipped"]
    assert "layers 48x32" in results["skipped"] and "ViT" in results["skipped"]
    assert "Skipped, out of time" in markdown and "skipped, out of time" in run.stdout


def test_a_failed_check_writes_the_failing_cells_and_stops(tmp_path, monkeypatch):
    for name, value in (("SPARSEFX_CPU_KERNELS", "native"), ("TRITON_CACHE_AUTOTUNING", "0")):
        monkeypatch.setenv(name, value)  # what importing the script would set, restored after
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("common", "gpu"):  # examples/ has a ``common`` too, imported by other tests
        monkeypatch.delitem(sys.modules, name, raising=False)
    gpu = importlib.import_module("gpu")
    monkeypatch.setattr(gpu, "TOLERANCE", {key: 0.0 for key in gpu.TOLERANCE})
    monkeypatch.setattr(gpu, "PATTERNS", ("diag",))
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        gpu.main()
    assert stop.value.code == 1
    results, markdown = _results(tmp_path)
    assert results["checks"] and not any(c["ok"] for c in results["checks"])
    assert results["layers"] == [] and results["model"] == []  # nothing timed
    assert markdown.count("**FAILED**") == len(results["checks"])


def test_the_device_command_runs_from_a_placed_copy_and_fills_its_folder(tmp_path):
    """``benchmarks/gpu_device.sh OUT``: the package placed (not installed) on PYTHONPATH,
    every output in OUT."""
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_device.sh"), str(out), "--tiny",
                          "--budget-s", "1"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, _ = _results(out)
    assert not results["device"]["sparsefx"].startswith(str(BENCHMARKS.parent))
    for name in ("gpu.log", "gpu.stderr", "nvidia-smi.txt", "triton-cache.tar.gz"):
        assert (out / name).exists(), name
    assert "correctness:" in (out / "gpu.log").read_text()


def test_the_replay_counts_the_runs_work_and_finds_every_launch_in_the_audit(tmp_path):
    """``benchmarks/gpu_replay.py`` on the tiny run: compiles, autotune timings and timed
    cells counted per section, an estimate with its assumptions, and every specialisation the
    run launched among those ``python -m sparsefx.kernels.triton_variants`` compiles."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_replay.py"), "--tiny",
                          "--compile-s", "0.3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_replay.json").read_text())
    sections = result["estimate"]["sections"]
    assert {"correctness", "layers 48x32", "layers 32x64", "ViT"} <= set(sections)
    totals = result["totals"]
    assert totals["compiles"] > 0 and totals["autotune timings"] >= 2 * totals["autotune keys"]
    assert totals["timed cells"] == sum(s["timed_cells"] for s in sections.values()) > 0
    assert result["unaudited"] == []
    assert 0 < result["estimate"]["total_s"] and len(result["assumptions"]) >= 5
    assert "launched but not in the variant audit: 0" in run.stdout
