"""Every Triton kernel variant the ops can launch compiles for Ampere (sm_80) and Hopper
(sm_90) without spilling registers (ptxas' spill stores and loads) -- no GPU needed
(``sparsefx.kernels.triton_variants``). The table of registers per thread is printed
(``pytest -s``, or ``python -m sparsefx.kernels.triton_variants``)."""
import os

import pytest

triton = pytest.importorskip("triton")
from sparsefx.kernels import triton_variants  # noqa: E402

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
