"""Test session setup.

Without a GPU the Triton kernels run under the interpreter, which must be switched on
before triton is first imported. The native CPU kernels are built when sparsefx is first
imported (about a minute on first use); a failed build fails the session here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "sparsefx", deadline=None, max_examples=40, print_blob=True,
    # fixtures here only pick a backend, which is the same for every generated example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", parent=settings.get_profile("sparsefx"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sparsefx"))


@pytest.fixture(scope="session", autouse=True)
def _native_cpu_kernels():
    from sparsefx import kernels
    if os.environ.get("SPARSEFX_CPU_KERNELS", "native") == "native":
        assert kernels.cpu_kernels() == "native", "the native CPU kernels failed to build"
