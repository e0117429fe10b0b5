"""The package layout stays what issue 24 made it: no import cycle among arrowvision modules, small
modules, and ``import arrowvision`` free of torch and transformers.

The import graph is read statically (``ast``), every import counted: module level, inside
functions (the lazy ones) and under ``TYPE_CHECKING``. ``from package import name`` is an edge to
the submodule ``package.name`` when there is one, else to the package itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "arrowvision"
MAX_MODULE_LINES = 500
# Modules allowed over MAX_MODULE_LINES, each with the reason it cannot be split. Keep it short.
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The arrowvision modules that module ``name`` (at ``path``) imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reader_sees_lazy_relative_and_package_imports():
    graph = import_graph()
    assert "arrowvision.weights.format" in graph["arrowvision.encoder"]  # from .weights.format import ...
    assert "arrowvision.search.index" in graph["arrowvision.cli.index"]  # from ..search import index (in functions)
    assert "arrowvision.backends.torch_backend" in graph["arrowvision.backends.factory"]  # lazy, inside create()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_arrowvision_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared part down a layer): " + "; ".join(" <-> ".join(c) for c in found)


def layer(module: str) -> str:
    """A module's place in the layout: its subpackage (``backends/``), or itself at the top level."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        return parts[1] + "/"
    return module


def test_each_folder_imports_only_downward():
    """No cycle among the folders (and top-level modules) either: a folder's modules never import
    a module that imports back into that folder."""
    folders: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        folders.setdefault(layer(module), set()).update(layer(t) for t in targets if layer(t) != layer(module))
    for targets in list(folders.values()):
        for target in targets:
            folders.setdefault(target, set())
    found = cycles(folders)
    assert not found, "folders that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_line_limit():
    over = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    over = {name: lines for name, lines in over.items() if lines > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by job): {over}"
    stale = set(LONG_MODULES) - set(modules())
    assert not stale, f"LONG_MODULES names modules that no longer exist: {stale}"


def test_import_arrowvision_and_its_cli_import_neither_torch_nor_transformers():
    code = textwrap.dedent("""
        import sys
        import arrowvision, arrowvision.cli
        arrowvision.cli.build_parser()
        print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"}))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
