"""Imports only point down: the model (and its checkpoint folder format) below decoding and the feature cache, both
below training and inference, and training and inference never import each other.

Every import statement counts, including the ones inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "pv2tea"

# sub-package -> the sub-packages above it, which its modules must not import
ABOVE = {
    "models": ("decoding", "train", "inference", "experiment", "bench", "cli"),
    "decoding": ("train", "inference", "experiment", "bench", "cli"),
    "cache": ("decoding", "train", "inference", "experiment", "bench", "cli"),
    "train": ("inference", "experiment", "bench", "cli"),
    "inference": ("train", "experiment", "bench", "cli"),
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
