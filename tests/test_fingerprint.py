"""Training with every pattern and method gives what it gave when ``tests/data/
fingerprint.json`` was written (``python tests/fingerprint.py --write
tests/data/fingerprint.json``): the guard for changes that move code, which must change no
result. On the machine and versions that wrote it, every case's hash of final weights,
structures and optimizer state is the same; elsewhere (another CPU's BLAS may round
differently) the losses, the steps that moved and the summaries agree to 1e-9."""
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_every_pattern_and_method_trains_as_the_committed_fingerprint_says():
    expected = json.loads((HERE / "data" / "fingerprint.json").read_text())
    run = subprocess.run([sys.executable, str(HERE / "fingerprint.py")], capture_output=True,
                         text=True, timeout=600, check=True)
    actual = json.loads(run.stdout)
    assert set(actual["cases"]) == set(expected["cases"])
    same_machine = actual["machine"] == expected["machine"]
    for case, want in expected["cases"].items():
        got = actual["cases"][case]
        assert got["moved"] == want["moved"], case
        if same_machine:
            assert got["hash"] == want["hash"], (case, "changed bit for bit")
        for key in ("sum", "abs_sum"):
            assert math.isclose(got[key], want[key], rel_tol=1e-9), (case, key)
        assert all(math.isclose(g, w, rel_tol=1e-9) for g, w in
                   zip(got["losses"], want["losses"], strict=True)), case
