"""A fixed-seed fingerprint of training with every pattern and method: the bytes of the final
weights, structures and optimizer state and the losses, hashed per case. A change meant to
move code without changing behaviour must leave every hash as it was.

    python tests/fingerprint.py              # prints the JSON
    python tests/fingerprint.py --write F    # writes it (tests/data/fingerprint.json)

One thread, the native CPU kernels, float64 (fewer ways for a reordering to round
differently). ``tests/test_fingerprint.py`` compares with the committed file: bit for bit
where the machine and versions are the ones that wrote it, and to 1e-9 in the summaries
elsewhere.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys

import torch
import torch.nn as nn

import sparsefx

CASES = [(pattern, method) for pattern in ("diag", "blockdiag", "fanin", "nm", "unstructured")
         for method in ("static", "set", "rigl", "srigl", "dynadiag")
         if (method != "srigl" or pattern == "fanin")
         and (method != "dynadiag" or pattern in ("diag", "blockdiag"))]
STEPS, DELTA_T, BATCH = 12, 3, 16


def _model(pattern: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).double()
    # nm: 2:4; blockdiag keeps 3 of 4 cosets (at 90 % it keeps one, which never moves)
    sparsity = {"nm": 0.5, "blockdiag": 0.3}.get(pattern, 0.9)
    return sparsefx.transform(model, pattern, sparsity, keep_last_dense=False)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu().reshape(-1)
        sha.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def run_case(pattern: str, method: str) -> dict:
    model = _model(pattern)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = sparsefx.DST(model, optimizer, method=method, total_steps=STEPS, delta_t=DELTA_T,
                       alpha=0.6)
    generator = torch.Generator().manual_seed(1)
    losses, moved = [], []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 64, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (BATCH,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        moved.append(bool(dst.step()))
        losses.append(loss.item())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, (param, values) in enumerate(optimizer.state.items()):
        for key, value in values.items():
            if torch.is_tensor(value):
                state[f"optimizer.{index}.{key}"] = value
    floats = [v.double() for v in state.values() if v.is_floating_point()]
    return dict(hash=_digest(state), losses=losses, moved=moved,
                sum=float(sum(v.sum() for v in floats)),
                abs_sum=float(sum(v.abs().sum() for v in floats)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> dict:
    torch.set_num_threads(1)
    from sparsefx import kernels
    return dict(machine=dict(cpu=_cpu_model(), isa=torch.backends.cpu.get_cpu_capability(),
                             torch=torch.__version__, python=platform.python_version(),
                             cpu_kernels=kernels.cpu_kernels()),
                cases={f"{pattern}/{method}": run_case(pattern, method)
                       for pattern, method in CASES})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    text = json.dumps(fingerprint(), indent=1)
    if args.write:
        with open(args.write, "w") as file:
            file.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
