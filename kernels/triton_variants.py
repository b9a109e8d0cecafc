"""Every variant the ops can launch, compiled ahead of time for a GPU that need not be
present: ``triton.compile`` on an ``ASTSource`` for
``GPUTarget("cuda", 80 | 90, 32)`` gives the PTX, and the ``ptxas`` that ships with Triton,
run on it as Triton runs it (``-v``), reports registers per thread, the stack frame and the
spill stores and loads. Each variant is compiled as the JIT specialises its launches: the
pointers and integers 16-divisible (``aligned_attrs``), and the integers it is launched with
as 1 (a single-row tile's row count) constants. ``tests/test_triton_compile.py`` fails on a
compile error or a spill; ``python -m sparsefx.kernels.triton_variants`` prints the table.

Each pattern's ``triton_kernels`` lists its variants (``launch_variants()``) from the same
constants its launchers choose from, so the list and the launches cannot drift apart.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import traceback
from dataclasses import dataclass

from .triton_runtime import Variant

__all__ = ["Resources", "every_variant", "aligned_attrs", "compile_ptx", "compile_variant",
           "compile_every_variant", "table", "TARGETS"]

TARGETS = (80, 90)  # Ampere (A100) and Hopper (H100, H200)


@dataclass
class Resources:
    """What ``ptxas -v`` reports for one compiled variant."""

    registers: int
    stack: int          # bytes of stack frame per thread
    spill_stores: int   # bytes
    spill_loads: int    # bytes

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def every_variant() -> list[Variant]:
    """The variants of the Triton kernels of every pattern whose ops are defined
    (``_library.define_ops``: each names its CUDA kernels' module, whose
    ``launch_variants()`` lists what it launches)."""
    import importlib

    from ._library import defined
    return [variant for ops in defined()
            for variant in importlib.import_module(ops.cuda).launch_variants()]


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself runs for ``capability``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except ImportError:  # older Triton: one ptxas
        from triton import knobs
        return knobs.nvidia.ptxas.path


def aligned_attrs(variant: Variant, backend) -> dict:
    """The specialisation the JIT gives a launch whose pointers and integer arguments are all
    multiples of 16 (``tt.divisibility`` 16): torch's allocations and the shapes a model
    uses. It is the one that vectorises most, so the one that needs the most registers (it
    added up to 61 over none). An integer equal to 1 the JIT makes a constant: ``Variant.ones``
    names those a variant is launched with."""
    return {(index,): backend.parse_attr("D")
            for index, kind in enumerate(variant.signature.values())
            if kind.startswith("*") or kind in ("i32", "i64")}


def compile_ptx(variant: Variant, capability: int) -> str:
    """The PTX of ``variant`` for ``sm_<capability>``, specialised as the JIT specialises its
    launches: aligned arguments (``aligned_attrs``), the integers in ``variant.ones`` constant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    ones = {name: 1 for name in variant.ones}
    specialised = Variant(variant.kernel, {name: "constexpr" if name in ones else kind
                                           for name, kind in variant.signature.items()},
                          {**variant.constexprs, **ones}, variant.num_warps, variant.num_stages)
    source = ASTSource(fn=variant.kernel, signature=specialised.signature,
                       constexprs=specialised.constexprs,
                       attrs=aligned_attrs(specialised, make_backend(target)))
    compiled = triton.compile(source, target=target,
                              options=dict(num_warps=variant.num_warps,
                                           num_stages=variant.num_stages))
    return compiled.asm["ptx"]


def compile_variant(variant: Variant, capability: int) -> Resources:
    """Compile ``variant`` for ``sm_<capability>`` (``compile_ptx``) and read ptxas' report on
    it."""
    ptx = compile_ptx(variant, capability)
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        report = subprocess.run([_ptxas(capability), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={arch}", path, "-o", path + ".o"],
                                check=True, capture_output=True, text=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", report)
    registers = re.search(r"Used (\d+) registers", report)
    return Resources(registers=int(registers.group(1)), stack=int(frame.group(1)),
                     spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def _compile_one(job: tuple[int, int]) -> tuple[str, int, Resources | str]:
    index, capability = job
    variant = every_variant()[index]
    try:
        return variant.name, capability, compile_variant(variant, capability)
    except Exception:  # noqa: BLE001 (reported per variant, with its name)
        return variant.name, capability, traceback.format_exc(limit=-3)


def compile_every_variant(jobs: int = os.cpu_count() or 1) -> list[tuple[str, int, object]]:
    """``(variant name, capability, Resources or the compile error)`` for every variant and
    every target, compiled by ``jobs`` processes (Triton caches what it compiled)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    work = [(i, capability) for i in range(len(every_variant())) for capability in TARGETS]
    # the processes must jit the kernels, not interpret them: they start without
    # TRITON_INTERPRET (which the tests set), read when they first import Triton
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            return list(pool.map(_compile_one, work, chunksize=8))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def table(results) -> str:
    """One line per compiled variant: registers per thread, stack and spill bytes."""
    lines = []
    for name, capability, r in results:
        if isinstance(r, Resources):
            lines.append(f"sm_{capability}  {r.registers:3d} regs  stack {r.stack:3d}  spills "
                         f"{r.spill_stores:3d}/{r.spill_loads:3d}  {name}")
        else:
            lines.append(f"sm_{capability}  FAILED  {name}: {r}")
    return "\n".join(lines)


def main() -> None:
    results = compile_every_variant()
    print(table(results))
    failed = [r for r in results if not isinstance(r[2], Resources) or r[2].spills]
    print(f"{len(results)} compiled for {', '.join(f'sm_{c}' for c in TARGETS)}: "
          f"{len(failed)} failed or spilled")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
