"""Every Triton kernel variant the ops can launch compiles for Ampere (sm_80) and Hopper
(sm_90) without spilling registers (ptxas' spill stores and loads) -- no GPU needed
(``sparsefx.kernels.triton_variants``). The table of registers per thread is printed
(``pytest -s``, or ``python -m sparsefx.kernels.triton_variants``)."""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
from sparsefx.kernels import triton_runtime, triton_variants  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(triton_variants._ptxas(90)),
                                reason="this Triton ships no ptxas")


def test_the_variants_cover_every_kernel_dtype_and_tile():
    variants = triton_variants.every_variant()
    kernels = {v.kernel.__name__ for v in variants}
    assert kernels == {"_diag_apply_kernel", "_diag_values_grad_kernel",
                       "_fanin_forward_kernel", "_fanin_input_grad_kernel",
                       "_fanin_values_grad_kernel", "_blockdiag_forward_kernel",
                       "_blockdiag_input_grad_kernel", "_blockdiag_values_grad_kernel"}
    names = [v.name for v in variants]
    assert len(set(names)) == len(names)
    for dtype in ("fp32", "fp16", "bf16"):
        for kernel in kernels:
            assert any(v.kernel.__name__ == kernel and f"[{dtype}," in v.name
                       for v in variants), (kernel, dtype)


def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    results = triton_variants.compile_every_variant(jobs=min(os.cpu_count() or 1, 4))
    print("\n" + triton_variants.table(results))
    failed = [f"sm_{c} {name}: {r}" for name, c, r in results
              if not isinstance(r, triton_variants.Resources)]
    assert not failed, "\n".join(failed)
    spilled = [f"sm_{c} {name}: {r.registers} registers, spill stores {r.spill_stores} B, "
               f"loads {r.spill_loads} B"
               for name, c, r in results if r.spills]
    assert not spilled, "\n".join(spilled)
    assert len(results) == 2 * len(triton_variants.every_variant())


def test_the_audit_compiles_what_the_jit_compiles_for_aligned_launches_and_single_rows():
    """The JIT specialises 16-divisible pointers and integers (``tt.divisibility``) and makes
    an integer equal to 1 a constant: the audit compiles the same, or its register counts
    would not be the GPU's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", 90, 32))
    variants = triton_variants.every_variant()
    for v in variants:
        aligned = {index for (index,) in triton_variants.aligned_attrs(v, backend)}
        assert aligned == {i for i, kind in enumerate(v.signature.values())
                           if kind[0] == "*" or kind in ("i32", "i64")}, v.name
        single_row = v.constexprs.get("BLOCK_ROWS") == 1 and "rows_key" in v.signature
        assert v.ones == (triton_runtime.SINGLE_ROW if single_row else ()), v.name
    # compiled, not interpreted: in a process started without the session's TRITON_INTERPRET
    probe = textwrap.dedent("""
        import dataclasses
        from sparsefx.kernels import triton_variants as t
        one = next(v for v in t.every_variant() if v.ones)
        print(*(t.compile_ptx(v, 90).count(".param .")
                for v in (one, dataclasses.replace(one, ones=()))))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    specialised, general = map(int, run.stdout.split())
    assert specialised == general - len(triton_runtime.SINGLE_ROW)  # rows, rows_key constant
