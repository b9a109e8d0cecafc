"""The package list, found rather than listed: ``sparsefx`` and its subpackages, with the
top-level ``kernels/`` and ``passes/`` installed as ``sparsefx.kernels`` and
``sparsefx.passes`` (``pyproject.toml`` holds everything else)."""
from setuptools import find_packages, setup


def _under(name: str, folder: str) -> list[str]:
    return [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


PACKAGES = (_under("sparsefx", "sparsefx") + _under("sparsefx.kernels", "kernels")
            + _under("sparsefx.passes", "passes"))
# each pattern's native sources, built on the user's machine at first import
PACKAGE_DATA = {"sparsefx.kernels": ["csrc/*.h"]} | {
    name: ["*.cpp", "*.h"] for name in PACKAGES if name.startswith("sparsefx.kernels.")}

setup(packages=PACKAGES, package_data=PACKAGE_DATA)
