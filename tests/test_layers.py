"""The import graph: no circles between modules, and every import goes down the layers

    model < configs < bank < pipelines, serve < memory3

(pipelines and serve never import each other; model never imports Ray). Parsed with ast, so lazy imports inside
functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYER = {"model": 0, "configs": 1, "bank": 2, "pipelines": 3, "serve": 3, "memory3": 4}

ALLOWED_UPWARD: set[str] = set()  # none: the quickstart and the local dev cluster are CLI code in memory3/


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names (a `from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in LAYER for p in sorted((REPO / top).rglob("*.py"))}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_import_goes_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        here = name.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if here == there or name in ALLOWED_UPWARD:
                continue
            if LAYER[there] >= LAYER[here]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that run up or across the layers:\n" + "\n".join(sorted(wrong))


def test_model_and_bank_never_import_ray():
    for name, path in project_modules().items():
        if name.split(".")[0] in ("model", "configs", "bank"):
            ray = sorted(m for m in imports_of(path) if m == "ray" or m.startswith("ray."))
            assert not ray, f"{name} imports {ray}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
