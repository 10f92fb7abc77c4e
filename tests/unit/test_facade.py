"""``import pv2tea`` gives the handful of names most programs need, each the very object of its home module, without
loading torch (the command line imports the package first)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pv2tea

INIT = Path(pv2tea.__file__)


def test_every_exported_name_is_its_home_modules_object() -> None:
    assert sorted(pv2tea.__all__) == sorted(["__version__", *pv2tea._EXPORTS])
    for name, module in pv2tea._EXPORTS.items():
        assert getattr(pv2tea, name) is getattr(importlib.import_module(module), name), name
    assert set(pv2tea._EXPORTS) <= set(dir(pv2tea))


def test_the_type_checking_imports_match_the_lazy_ones() -> None:
    """What mypy and the import-layer test see is what ``__getattr__`` returns."""
    tree = ast.parse(INIT.read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: n.module for n in guarded.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert seen == pv2tea._EXPORTS


def test_no_exported_name_is_a_subpackage() -> None:
    """Importing ``pv2tea.train.loop`` binds ``pv2tea.train`` to the sub-package: an export of that name would flip."""
    src = INIT.parent
    modules = {p.stem for p in src.glob("*.py")} | {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    assert not set(pv2tea._EXPORTS) & modules


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        pv2tea.no_such_name  # noqa: B018


def test_import_pv2tea_does_not_load_torch() -> None:
    code = "import sys, pv2tea; print('torch' in sys.modules, pv2tea.__version__); pv2tea.Predictor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", pv2tea.__version__, "True"]
