"""The native CPU library: every pattern's ``*.cpp`` built once per machine with the system
C++ compiler (cached on disk under ``TORCH_EXTENSIONS_DIR``, named by the sources, the flags
and the CPU) and loaded, or ``None`` where that fails."""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

__all__ = ["NATIVE_FLAGS", "native_sources", "load_native"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
NATIVE_FLAGS = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in
                                      ("x86_64", "AMD64") else [])


def native_sources() -> list[Path]:
    """Every pattern package's C++ sources."""
    return sorted(_HERE.glob("*/*.cpp"))


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU model and its instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({line for line in lines if line.startswith(wanted)}))


@functools.cache
def load_native() -> str | None:
    """Build (once per machine, cached on disk under ``TORCH_EXTENSIONS_DIR``) and load the
    C++ library of every pattern's ``*.cpp``; its path, or ``None`` if that fails."""
    from torch.utils import cpp_extension

    # The name carries the sources, the flags and the CPU, so a changed kernel or a cache
    # shared with another machine never loads a stale or foreign build.
    digest = hashlib.sha1()
    for source in sorted([*_HERE.glob("*/*.cpp"), *_HERE.glob("*/*.h")]):
        digest.update(str(source.relative_to(_HERE)).encode() + source.read_bytes())
    digest.update(" ".join(NATIVE_FLAGS + [_cpu_signature(), platform.machine(),
                                            torch.__version__]).encode())
    name = f"sparsefx_ops_{digest.hexdigest()[:12]}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = (build_dir / f"{name}.so").exists()
    if not built:
        logger.warning("sparsefx: building the native CPU kernels in %s (first use with this "
                       "source and CPU; about a minute)", build_dir)
    started = time.perf_counter()
    try:
        path = cpp_extension.load(name=name, sources=[str(s) for s in native_sources()],
                                  extra_cflags=NATIVE_FLAGS, extra_ldflags=["-fopenmp"],
                                  is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: fall back, loudly
        logger.warning("sparsefx: building the native CPU kernels failed (%s); using the slower "
                       "PyTorch fallback. Set SPARSEFX_CPU_KERNELS=torch to silence this.", error)
        return None
    if not built:
        logger.warning("sparsefx: native CPU kernels built in %.0f s",
                       time.perf_counter() - started)
    return path
