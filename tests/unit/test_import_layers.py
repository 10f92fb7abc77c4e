"""Imports only point down: the data layer below the model (and its checkpoint folder format), the model below
decoding and the feature cache, both below training and inference, inference below the HTTP service, and training
and inference (or the service) never import each other. Drawn from the imports, the whole package has no cycle: not between modules, not between sub-packages.

Every import statement counts, including the ones inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "pv2tea"

# sub-package -> the sub-packages above it, which its modules must not import
ABOVE = {
    "data": (
        "models",
        "baselines",
        "decoding",
        "cache",
        "regularize",
        "train",
        "inference",
        "serve",
        "experiment",
        "demo",
        "bench",
        "cli",
        "viz",
    ),
    "models": ("decoding", "train", "inference", "experiment", "demo", "bench", "cli"),
    "decoding": ("train", "inference", "experiment", "demo", "bench", "cli"),
    "cache": ("decoding", "train", "inference", "experiment", "demo", "bench", "cli"),
    "train": ("inference", "experiment", "demo", "bench", "cli"),
    "inference": ("train", "serve", "experiment", "demo", "bench", "cli"),
    "serve": ("train", "experiment", "demo", "bench", "cli"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in the file at ``path``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from pv2tea import train` imports the sub-package named by the alias
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "pv2tea" else []
            out.extend((node.lineno, name) for name in names or [node.module])
    return out


def upward_imports(package_dir: Path, above: tuple[str, ...], root: str = "pv2tea") -> list[str]:
    """``file:line imports module`` for each import in ``package_dir``'s modules of a sub-package in ``above``."""
    found = []
    for path in sorted(package_dir.glob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[0] == root and parts[1] in above:
                found.append(f"{path.name}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_upward_imports(package: str) -> None:
    assert (SRC / package / "__init__.py").is_file()
    assert upward_imports(SRC / package, ABOVE[package]) == []


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text(
        "import os\nfrom pv2tea.models import checkpoint\n\ndef f():\n    from pv2tea.inference.predictor import x\n"
    )
    (tmp_path / "other.py").write_text("from pv2tea import inference\nimport pv2tea.cli\n")
    assert upward_imports(tmp_path, ABOVE["train"]) == [
        "loop.py:5 imports pv2tea.inference.predictor",
        "other.py:1 imports pv2tea.inference",
        "other.py:2 imports pv2tea.cli",
    ]


# ------------------------------------------------------------------------------------------------ cycles


def package_modules(package_dir: Path, root: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package in ``package_dir`` (named ``root``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path, root: str = "pv2tea") -> dict[str, dict[str, str]]:
    """Module -> {module of the package it imports: ``file:line`` of the first such import statement}.

    Every ``import`` and ``from ... import`` counts, at any depth (in functions, under ``TYPE_CHECKING``), absolute
    or relative. ``from a.b import c`` is an import of the module ``a.b.c`` when there is one, else of ``a.b``; a
    name is resolved to the longest module of the package it starts with; modules outside the package are left out.
    """
    modules = package_modules(package_dir, root)

    def resolve(name: str) -> str | None:
        while name not in modules:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*prefix, *([base] if base else [])])
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target is not None and target != module:
                    edges.setdefault(target, f"{path.relative_to(package_dir.parent)}:{node.lineno}")
        graph[module] = edges
    return graph


def subpackage_graph(graph: Mapping[str, Mapping[str, str]], root: str = "pv2tea") -> dict[str, dict[str, str]]:
    """The graph with every module merged into its top-level sub-package (``pv2tea.models.fusion`` -> ``pv2tea.models``).

    Top-level modules (``pv2tea.config``) and the package's own ``__init__`` stay nodes of their own.
    """
    out: dict[str, dict[str, str]] = {}

    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    for module, edges in graph.items():
        node = out.setdefault(top(module), {})
        for target, where in edges.items():
            if top(target) != top(module):
                node.setdefault(top(target), where)
    return out


def strongly_connected(graph: Mapping[str, Mapping[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
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
                    out.append(sorted(component))
    return sorted(out)


def import_cycles(graph: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One shortest cycle per strongly connected component, as ``a (file:line) -> b (file:line) -> a``."""
    found = []
    for component in strongly_connected(graph):
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first from start, inside the component, until an edge leads back to start
            node = queue.popleft()
            if start in graph[node]:
                break
            for child in sorted(graph[node]):
                if child in members and child not in previous and child != start:
                    previous[child] = node
                    queue.append(child)
        path = [node]
        while path[-1] != start:
            path.append(previous[path[-1]])
        path.reverse()
        steps = [f"{a} ({graph[a][b]})" for a, b in zip(path, [*path[1:], start])]
        found.append(" -> ".join([*steps, start]))
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(SRC)
    assert len(graph) > 50
    assert "pv2tea.data.dataset" in graph["pv2tea.models.checkpoint"]  # an import inside a function is an edge
    assert import_cycles(graph) == []


def test_the_subpackages_have_no_import_cycle() -> None:
    assert import_cycles(subpackage_graph(import_graph(SRC))) == []


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_an_import_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    _write(
        pkg,
        {
            "__init__.py": "",
            "a.py": "import os\n\ndef f():\n    from pkg.sub import b\n",  # function level
            "sub/__init__.py": "",
            "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.c.missing\n",
            "sub/c.py": "from .. import a\n",  # relative: the parent of pkg.sub
            "d.py": "from pkg import a\n",  # imports into the cycle, is not on it
        },
    )
    graph = import_graph(pkg, root="pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.c": "pkg/sub/b.py:3"}
    assert import_cycles(graph) == [
        "pkg.a (pkg/a.py:4) -> pkg.sub.b (pkg/sub/b.py:3) -> pkg.sub.c (pkg/sub/c.py:1) -> pkg.a"
    ]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(pkg, root="pkg")) == []


def test_a_cycle_between_subpackages_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    _write(
        pkg,
        {
            "__init__.py": "",
            "data/__init__.py": "",
            "data/dataset.py": "from pkg.models.model import Batch\n",
            "models/__init__.py": "",
            "models/model.py": "import torch\n",
            "models/build.py": "from pkg.data.dataset import Preprocessor\n",
        },
    )
    graph = import_graph(pkg, root="pkg")
    assert import_cycles(graph) == []  # no module imports itself back ...
    assert import_cycles(subpackage_graph(graph, root="pkg")) == [  # ... but the sub-packages do
        "pkg.data (pkg/data/dataset.py:1) -> pkg.models (pkg/models/build.py:1) -> pkg.data"
    ]
