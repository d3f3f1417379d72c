"""The top-level parts of loraens (subpackages such as ``data``, modules such as ``config``) import
each other without a cycle, so each can be read, tested and replaced from the bottom up.

Imports are read from the source with ``ast``, including those inside functions: a lazy import
hides a cycle from the interpreter but not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import loraens

SRC = Path(loraens.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names a statement imports (``from a import b`` gives ``a.b``: b may be a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            package = module.split(".")
            package = package if is_package else package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def import_graph(root: Path) -> dict[str, set[str]]:
    """Edges between the top-level parts of the package at ``root`` (self-edges left out)."""
    package = root.name
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        parts = module.split(".")
        if len(parts) < 2:  # the package's own __init__: holds no imports of its parts
            continue
        source = parts[1]
        graph.setdefault(source, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                target = name.split(".")
                if target[0] == package and len(target) > 1 and target[1] != source:
                    graph[source].add(target[1])
    # `from loraens import __version__` names no part: keep targets that are parts
    return {node: {t for t in targets if t in graph} for node, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_any_import_form_is_found(tmp_path):
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "config.py": "",
            "data/__init__.py": "from .records import R\n",
            "data/records.py": "def f():\n    from pkg.training import run\n",
            "training/__init__.py": "",
            "training/run.py": "import pkg.config\nfrom ..data import records\n",
        },
    )
    graph = import_graph(root)
    assert graph == {"config": set(), "data": {"training"}, "training": {"config", "data"}}
    assert find_cycle(graph) in (["data", "training", "data"], ["training", "data", "training"])
    (root / "data/records.py").write_text("")
    assert find_cycle(import_graph(root)) is None


def test_the_graph_sees_the_real_imports():
    graph = import_graph(SRC)
    assert {"baselines", "config", "data", "evaluation", "models", "training"} <= set(graph)
    assert {"models", "data", "baselines"} <= graph["training"]  # module-level imports
    assert {"training", "experiments"} <= graph["cli"]  # imports inside the commands
    assert "training" not in graph["data"] and "cli" not in graph["training"]


def test_loraens_has_no_import_cycle():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, f"import cycle between parts of loraens: {' -> '.join(cycle)}"
