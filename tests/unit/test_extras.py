"""A feature whose optional extra is not installed names the command that installs it (simulated by blocking the
package in ``sys.modules``, which makes importing it fail as if it were absent)."""

from __future__ import annotations

import importlib
import sys

import pytest

from pv2tea.extras import MissingExtraError, import_extra, require_extra

SERVE_MESSAGE = "pv2tea serve needs the serve extra: pip install 'pv2tea[serve]'"


def _block(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def _forget(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported anew (monkeypatch restores it)


def test_a_missing_package_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert import_extra("json", "serve", "serve") is sys.modules["json"]
    require_extra("serve", "serve", "json", "math")  # all there: no error
    _block(monkeypatch, "fastapi")
    with pytest.raises(MissingExtraError) as info:
        require_extra("serve", "serve", "json", "fastapi")
    assert str(info.value) == f"{SERVE_MESSAGE} (fastapi is not installed)"
    assert isinstance(info.value, ImportError)


def test_importing_the_server_without_the_serve_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "fastapi")
    _forget(monkeypatch, "pv2tea.serve.server")
    with pytest.raises(MissingExtraError, match=r"^pv2tea serve needs the serve extra: pip install 'pv2tea\[serve\]'"):
        importlib.import_module("pv2tea.serve.server")


def test_importing_the_figures_without_the_report_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "matplotlib")
    _forget(monkeypatch, "pv2tea.viz", "pv2tea.viz.figures", "pv2tea.viz.run_report")
    with pytest.raises(
        MissingExtraError, match=r"^pv2tea report needs the report extra: pip install 'pv2tea\[report\]'"
    ):
        importlib.import_module("pv2tea.viz.run_report")


@pytest.mark.parametrize(
    ("args", "blocked", "message"),
    [
        (["serve", "--model", "no_such_model"], "uvicorn", SERVE_MESSAGE),
        (["report", "no_such_run"], "matplotlib", "pv2tea report needs the report extra: pip install 'pv2tea[report]'"),
        (
            ["bench", "serve", "--model", "no_such_model"],
            "httpx",
            "pv2tea bench serve needs the serve extra: pip install 'pv2tea[serve]'",
        ),
    ],
)
def test_the_cli_exits_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], blocked: str, message: str
) -> None:
    from pv2tea.cli import main

    _block(monkeypatch, blocked)
    assert main(args) == 2
    printed = " ".join(capsys.readouterr().err.split())
    assert message in printed


EXTRA_MODULES = {  # the modules of the optional features, each importing its extra's packages
    "pv2tea.serve.server",
    "pv2tea.bench.serve",
    "pv2tea.serve.connections",
    "pv2tea.serve.metrics",
    "pv2tea.viz",
    "pv2tea.viz.catalog",
    "pv2tea.viz.figures",
    "pv2tea.viz.run_report",
}
EXTRA_PACKAGES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "httpx", "matplotlib")

CORE_IMPORTS = """
import importlib, pkgutil, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed
import pv2tea
names = sorted(m.name for m in pkgutil.walk_packages(pv2tea.__path__, "pv2tea."))
for name in names:
    if name not in {extra!r}:
        importlib.import_module(name)
print(len(names))
"""


def test_the_core_imports_without_any_extra() -> None:
    import subprocess

    code = CORE_IMPORTS.format(blocked=EXTRA_PACKAGES, extra=sorted(EXTRA_MODULES))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 40  # every module of the package was found
