"""Every third-party import of the shipped packages is a main dependency in pyproject.toml.

A module that only a test extra installs works on every machine that ran `make test` (developer machines, CI) and
breaks `make demo` on a fresh one. So a module counts as provided only when its distribution is *declared* in
`[project] dependencies`: a transitive requirement of another package can vanish with that package's next release.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Distributions a shipped module may import without declaring them, and why that cannot break a fresh install.
OPTIONAL = {
    "triton": "model/nearest_centroid_kernel.py: ships with CUDA torch builds (and the `gpu` extra names it); "
              "imported only for CUDA tensors, and model/quantizer.py falls back to the torch path when it is missing",
}


def shipped_packages() -> list[str]:
    """The top-level packages pyproject installs (`[tool.setuptools.packages.find] include`)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main_dependencies() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalize(re.split(r"[\s<>=!~\[;(]", d, maxsplit=1)[0]) for d in deps}


def third_party_imports(package_dir: Path) -> dict[str, set[str]]:
    """{top-level module: {files importing it}} for absolute imports that are neither stdlib nor the project."""
    local = {p.name for p in ROOT.iterdir() if p.is_dir()} | {p.stem for p in ROOT.glob("*.py")}
    found: dict[str, set[str]] = {}
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def undeclared_imports(declared: set[str]) -> list[str]:
    """'file: import X (from dist)' for each import that no distribution in `declared` provides."""
    dists = packages_distributions()
    problems = []
    for package in shipped_packages():
        for module, files in sorted(third_party_imports(ROOT / package).items()):
            providers = {normalize(d) for d in dists.get(module, [module])}
            if not providers & declared:
                problems += [f"{f}: import {module} (from {', '.join(sorted(providers))})" for f in sorted(files)]
    return problems


def test_every_shipped_import_is_a_main_dependency():
    problems = undeclared_imports(main_dependencies() | set(OPTIONAL))
    assert not problems, "imports no main dependency in pyproject.toml provides:\n" + "\n".join(problems)


def test_the_check_names_a_test_only_dependency():
    """httpx (the quickstart's HTTP client) was once only a test extra: `make demo` died on a fresh machine."""
    problems = undeclared_imports(main_dependencies() - {"httpx"})
    assert any(p.endswith("import httpx (from httpx)") for p in problems), problems
