"""The library's shape, checked: no import circle between its modules (imports inside
functions and under ``TYPE_CHECKING`` count), no file over 500 lines, and ``kernels/``
importing nothing of the rest of sparsefx."""
import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = {"sparsefx": "sparsefx", "kernels": "sparsefx.kernels", "passes": "sparsefx.passes"}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


def _imports(name: str, is_package: bool, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file (a ``from m import x`` counts
    ``m`` and ``m.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module
            out |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t in _imports(name, is_package, path)
                   if t in modules and t != name and not name.startswith(t + ".")}
            for name, (path, is_package) in modules.items()}  # a parent package: not a cycle


def test_no_import_circle_between_library_modules():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name, path):
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_library_file_over_500_lines():
    long = {str(path.relative_to(ROOT)): n for path, _ in _modules().values()
            if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long


def test_kernels_import_nothing_of_the_rest_of_sparsefx():
    graph = _graph()
    outside = {name: sorted(t for t in targets if not t.startswith("sparsefx.kernels"))
               for name, targets in graph.items() if name.startswith("sparsefx.kernels")}
    assert not {name: targets for name, targets in outside.items() if targets}
