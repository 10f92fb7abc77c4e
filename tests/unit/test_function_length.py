"""No function or method in ``src/pv2tea`` is longer than 120 lines, from its ``def`` line to its last line (a typer
command's option declarations in its signature count)."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 120
SRC = Path(__file__).resolve().parents[2] / "src" / "pv2tea"


def long_functions(source: str, max_lines: int = MAX_LINES) -> list[tuple[str, int]]:
    """The functions and methods of ``source`` over ``max_lines`` lines, as (qualified name, length)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > max_lines:
                        found.append((name, length))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_check_finds_a_long_method() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(4))
    source = f"class A:\n    def short(self):\n        return 1\n\n    def long(self):\n{body}\n"
    assert long_functions(source, max_lines=4) == [("A.long", 5)]


def test_no_function_is_over_120_lines() -> None:
    offenders = [
        f"{path.relative_to(SRC.parent)}: {name} has {length} lines"
        for path in sorted(SRC.rglob("*.py"))
        for name, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(offenders)
