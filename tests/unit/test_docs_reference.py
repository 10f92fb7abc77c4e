"""The documentation's generated references follow the code, and the hand-written pages name only real settings
and commands (docs/hooks/reference.py generates the pages; mkdocs runs it at build time)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import typer.main

from pv2tea.cli import app
from pv2tea.config import RENAMED_KEYS, Config, preset_names, read_yaml

ROOT = Path(__file__).resolve().parents[2]
# the hand-written pages of the docs' owner (results, history and cost have their own owners)
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name not in {"results.md", "history.md", "cost.md"}),
]


@pytest.fixture(scope="module")
def reference():
    path = ROOT / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("pv2tea_docs_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def config_keys() -> dict[str, object]:
    """Every dotted config key with its section's dataclass, read from the dataclasses themselves."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            out[f"{section.name}.{f.name}"] = cls
    return out


def command_options() -> dict[str, set[str]]:
    """'pv2tea data validate' -> its option names, walked from the Typer app's click tree (hidden options, the old
    names of renamed ones, left out: the reference shows the current names only)."""
    out: dict[str, set[str]] = {}

    def walk(cmd, path: str) -> None:
        names = set()
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            names |= {o for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])] if o.startswith("-")}
        out[path] = names
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "pv2tea")
    return out


def test_config_reference_lists_every_field_with_help_and_preset_values(reference):
    page = reference.config_reference_markdown()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    keys = config_keys()
    assert set(rows) == set(keys), "the configuration reference and the config dataclasses disagree"
    for key, cls in keys.items():
        section, name = key.split(".")
        default = getattr(cls(), name)
        assert f"`{reference.format_value(default)}`" in rows[key], f"{key}: default not shown"
        help_text = rows[key].rstrip(" |").rsplit("|", 1)[-1].strip()
        assert help_text, f"{key} has no help text: add a comment above or beside the field in config.py"
    for preset in preset_names():
        for section, values in read_yaml(preset).items():
            for name, value in values.items():
                assert f"`{reference.format_value(value)}`" in rows[f"{section}.{name}"], (
                    f"preset {preset} sets {section}.{name}={value!r}, not shown"
                )


def test_config_reference_refuses_a_preset_key_that_is_not_a_field(reference, monkeypatch):
    real = reference.preset_values()
    monkeypatch.setattr(reference, "preset_values", lambda: {**real, "cpu": {**real["cpu"], "schemes.no_such": 1}})
    with pytest.raises(ValueError, match="schemes.no_such"):
        reference.config_reference_markdown()


def test_cli_reference_lists_every_command_and_option(reference):
    page = reference.cli_reference_markdown()
    sections = re.split(r"^#+ `", page, flags=re.M)[1:]
    by_command = {s.split("`", 1)[0]: s for s in sections}
    expected = command_options()
    assert set(by_command) == set(expected)
    for path, options in expected.items():
        for option in options - {"--help"}:
            assert re.search(rf"`[^`]*{re.escape(option)}\b", by_command[path]), f"{path}: {option} missing"


def test_api_pages_cover_every_subpackage_but_the_cli(reference):
    pages = reference.api_modules()
    src = ROOT / "src" / "pv2tea"
    packages = {f"pv2tea.{p.name}" for p in src.iterdir() if (p / "__init__.py").is_file()}
    assert packages - {"pv2tea.cli"} <= set(pages)
    documented = [module for modules in pages.values() for module in modules]
    assert "pv2tea" in documented  # the facade
    assert not [m for m in documented if m == "pv2tea.cli" or m.startswith("pv2tea.cli.")]  # the CLI page has it
    for module in documented:
        parts = module.split(".")[1:]
        path = src.joinpath(*parts)
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_sphinx_roles_are_written_as_code(reference):
    html = (
        "see :class:<code>~pv2tea.data.dataset.Preprocessor</code> and (:mod:\n<code>pv2tea.baselines.kinds</code>), "
        ":meth:<code>TextExtractor.save &lt;pv2tea.baselines.extractor.TextExtractor.save&gt;</code>; <code>a:b</code>"
    )
    assert reference.strip_roles(html) == (
        "see <code>Preprocessor</code> and (<code>pv2tea.baselines.kinds</code>), <code>TextExtractor.save</code>; "
        "<code>a:b</code>"
    )


# modules whose public objects were not all documented when this test was written (their owners were changing them);
# the command line is documented by its own page
NOT_YET_DOCUMENTED = ("cli/", "bench/", "serve/", "data/fashion.py")


def undocumented(src: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """``file:line name`` of every public class, function and method of a public module under ``src`` without a
    docstring: mkdocstrings leaves those out of the API pages."""
    import ast

    out = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.as_posix().startswith(skip) or any(p.startswith("_") and p != "__init__.py" for p in rel.parts):
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name[0] == "_":
                continue
            members = [node, *(node.body if isinstance(node, ast.ClassDef) else [])]
            for member in members:
                is_def = isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                if is_def and not member.name.startswith("_") and not ast.get_docstring(member):
                    name = member.name if member is node else f"{node.name}.{member.name}"
                    out.append(f"{rel.as_posix()}:{member.lineno} {name}")
    return out


def test_every_public_object_has_a_docstring(tmp_path):
    assert undocumented(ROOT / "src" / "pv2tea", NOT_YET_DOCUMENTED) == []
    (tmp_path / "m.py").write_text(
        'def f():\n    """Doc."""\n\ndef g():\n    pass\n\nclass C:\n    def h(self):\n        pass\n\n'
        "    def _private(self):\n        pass\n\ndef _hidden():\n    pass\n"
    )
    assert undocumented(tmp_path) == ["m.py:4 g", "m.py:7 C", "m.py:8 C.h"]


def test_the_main_classes_and_methods_are_documented():
    """mkdocstrings leaves out a member without a docstring: the facade's names and their main methods have one."""
    import inspect

    import pv2tea

    for name in pv2tea._EXPORTS:
        obj = getattr(pv2tea, name)
        doc = (obj.__doc__ or "").strip()  # the object's own: a class does not inherit it
        assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring"  # dataclasses invent one
        if inspect.isclass(obj) and not issubclass(obj, Exception):
            own = [m for m, v in vars(obj).items() if not m.startswith("_") and inspect.isfunction(v)]
            own += [m for m, v in vars(obj).items() if isinstance(v, (classmethod, staticmethod, property))]
            for member in own:
                assert (getattr(obj, member).__doc__ or "").strip(), f"{name}.{member} has no docstring"
    for method in ("from_checkpoint", "predict"):
        doc = inspect.getdoc(getattr(pv2tea.Predictor, method))
        assert "Args:" in doc and "Returns:" in doc, f"Predictor.{method}: no Google-style Args/Returns"


def test_pages_name_only_real_config_keys():
    keys = config_keys()
    sections = {k.split(".")[0] for k in keys}
    pattern = re.compile(rf"(?<![\w/.-])((?:{'|'.join(sections)})\.[a-z_]+)\b(?![./\w])")
    files = ("jsonl", "json", "yaml", "log", "py", "csv", "parquet", "tsv", "txt", "png", "html", "md")
    for page in PAGES:
        text = page.read_text()
        for code in re.findall(r"`([^`]+)`", text):
            for key in pattern.findall(code):
                if key.rsplit(".", 1)[1] in files:
                    continue  # a file name such as train.jsonl
                # an old name (RENAMED_KEYS) still reads, and the page of names lists it
                assert key in keys or key in RENAMED_KEYS, (
                    f"{page.relative_to(ROOT)} names config key {key!r}, which does not exist"
                )


def snippets(text: str):
    """(line number, text) of every command-like piece of a Markdown page: the logical lines of fenced code blocks
    (backslash continuations joined) and the inline code spans outside them."""
    lines = text.splitlines()
    in_code, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            if not pending:
                start = number
            pending += line.rstrip("\\") + " "
            if not line.rstrip().endswith("\\"):
                yield start, pending
                pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def test_pages_name_only_real_commands_and_options():
    commands = command_options()
    roots = {path.split()[1] for path in commands if " " in path}
    for page in PAGES:
        for number, snippet in snippets(page.read_text()):
            where = f"{page.relative_to(ROOT)}:{number}"
            pieces = re.split(r"(?<![\w./-])(?=pv2tea )", snippet.split(" #", 1)[0])
            for piece in pieces:
                if not piece.startswith("pv2tea "):
                    continue
                words = re.match(r"pv2tea((?: [a-z][a-z-]*)*)", piece).group(1).split()
                if not words:
                    continue
                assert words[0] in roots, f"{where}: 'pv2tea {words[0]}' is not a pv2tea command"
                path = "pv2tea"
                for word in words:
                    if f"{path} {word}" not in commands:
                        break
                    path = f"{path} {word}"
                for option in re.findall(r"(?:^|\s)(--[a-z][a-z-]*)", piece):
                    assert option in commands[path] | {"--help"}, f"{where}: {path} has no option {option}"
