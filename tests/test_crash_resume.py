"""Crash and resume with real SIGKILLs: a training process killed between two DST updates and
started again ends bit-identical to an uninterrupted run (examples/crash_resume.py), and a
process killed while writing a checkpoint leaves the previous one whole."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sparsefx

EXAMPLE = Path(__file__).parent.parent / "examples" / "crash_resume.py"


@pytest.mark.parametrize("pattern,method,kill_at", [
    ("fanin", "srigl", 12),     # resumes from step 9, the step before an update (armed tap)
    ("diag", "dynadiag", 25),   # resumes from step 18, between updates; DynaDiag's own state
])
def test_sigkill_between_updates_then_resume_is_bit_identical(pattern, method, kill_at):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "40", "--delta-t", "10",
         "--checkpoint-every", "9", "--hidden", "64", "--pattern", pattern, "--method", method,
         "--kill-at", str(kill_at)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"killed by SIGKILL at step {kill_at}" in result.stdout
    assert "bit-identical" in result.stdout


WRITER = textwrap.dedent("""
    import sys, torch, sparsefx
    path = sys.argv[1]
    big = torch.ones(64_000_000)  # 256 MB: the write takes long enough to be caught in it
    sparsefx.save_checkpoint(path, step=1, weights=torch.zeros(3))
    print("first written", flush=True)
    sparsefx.save_checkpoint(path, step=2, weights=big)
""")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "latest.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "first written"
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".latest.pt.*.tmp")):  # the second write has begun
            assert writer.poll() is None, "the writer ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(60) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
    assert list(tmp_path.glob(".latest.pt.*.tmp"))  # the write it was killed in
    extra = sparsefx.load_checkpoint(path)
    assert extra["step"] == 1 and torch.equal(extra["weights"], torch.zeros(3))
