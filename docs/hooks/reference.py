"""Reference pages generated at build time, so they cannot drift from the code.

* ``reference/configuration.md`` from the config dataclasses of :mod:`pv2tea.config`: every field with its type,
  default, the value each preset sets and its help text (field metadata ``help``, else the comments written
  above and beside the field in ``config.py``);
* ``reference/cli.md`` from the Typer app :data:`pv2tea.cli.app`, through its click command tree;
* ``reference/api/*.md``: one mkdocstrings page per subpackage of ``pv2tea``, discovered from the source tree (the
  command line, :mod:`pv2tea.cli`, is documented by its own page, not as Python API).

mkdocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``); ``tests/unit/test_docs_reference.py`` calls the
generators directly.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "pv2tea"
CONFIG_PAGE = "reference/configuration.md"
CLI_PAGE = "reference/cli.md"
API_DIR = "reference/api"
API_NAV_TITLE = "API"  # the nav section the generated API pages are appended to
API_EXCLUDED = ("cli",)  # top-level modules or subpackages left out of the API pages: the CLI page documents them
GROUP_MARK = "---"  # a comment line "# --- S1: ... ---" above a field starts a group of fields


# --------------------------------------------------------------------------------------------- text helpers


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _code(value: str) -> str:
    value = str(value).replace("|", "\\|")
    return f"`{value}`" if "`" not in value else f"``{value}``"


def format_value(value: Any) -> str:
    """A config value as it is written in YAML or after ``--set``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)


# --------------------------------------------------------------------------------------- configuration page


@dataclasses.dataclass
class FieldDoc:
    section: str
    name: str
    type: str
    default: Any
    help: str
    group: str | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_comments(source: str) -> dict[tuple[str, str], tuple[str | None, str]]:
    """(class name, field name) -> (group heading or None, help text) from docstrings and comments in ``source``."""
    lines = source.splitlines()
    comments = _comments(source)
    out: dict[tuple[str, str], tuple[str | None, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            group = None
            if above and above[0].startswith(GROUP_MARK):
                group = above.pop(0).strip("- ").strip()
            parts = [*above]
            trailing = comments.get(stmt.end_lineno or stmt.lineno)
            if trailing and not lines[(stmt.end_lineno or stmt.lineno) - 1].strip().startswith("#"):
                parts.append(trailing)
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                parts = [nxt.value.value]  # an attribute docstring wins over comments
            out[(node.name, stmt.target.id)] = (group, " ".join(" ".join(parts).split()))
    return out


def config_fields() -> list[FieldDoc]:
    """Every field of every section of :class:`pv2tea.config.Config`, in source order, with its help text."""
    import pv2tea.config as config_module
    from pv2tea.config import Config

    source = Path(config_module.__file__).read_text()
    helps = _field_comments(source)
    out = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:  # pragma: no cover - every config field has a default
                default = None
            group, text = helps.get((cls.__name__, f.name), (None, ""))
            text = str(f.metadata.get("help", text))
            out.append(FieldDoc(section.name, f.name, _type_name(hints[f.name], str(f.type)), default, text, group))
    return out


def _type_name(hint: Any, written: str) -> str:
    """A field's type as the reference shows it: a ``Literal`` as its choices (``"a" / "b"``), else as written."""
    if typing.get_origin(hint) is typing.Literal:
        return " / ".join(f'"{c}"' for c in typing.get_args(hint))
    return written


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def preset_values() -> dict[str, dict[str, Any]]:
    """Preset name -> {dotted key: the value the preset file sets} (keys it leaves at the default are absent)."""
    from pv2tea.config import preset_names, read_yaml

    return {name: dict(_flatten(read_yaml(name))) for name in preset_names()}


def config_reference_markdown() -> str:
    """The configuration reference page."""
    from pv2tea.config import Config

    fields = config_fields()
    presets = preset_values()
    known = {f.key for f in fields}
    for name, values in presets.items():
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"preset '{name}' sets unknown config keys: {', '.join(unknown)}")
    sections = {s.name: s.default_factory for s in dataclasses.fields(Config)}  # type: ignore[misc]
    names = list(presets)
    out = [
        "# Configuration reference",
        "",
        "<!-- generated at build time by docs/hooks/reference.py from src/pv2tea/config.py and "
        "src/pv2tea/presets/*.yaml; do not edit -->",
        "",
        "Every setting of a run, generated from the typed dataclasses in `src/pv2tea/config.py` and the preset "
        "files in `src/pv2tea/presets/`. A run resolves its config as: the dataclass defaults, then the preset or "
        "YAML file given with `--config` (`cpu` when none is given), then each `--set section.key=value` in order "
        "(the value is parsed as YAML: `true`, `null`, `[2]`, `1e-4`). The resolved config is saved as the run's "
        "`config.yaml`. An unknown key or a value of the wrong type is refused with the key named.",
        "",
        "The preset columns show the value a preset sets; `·` means it keeps the default. "
        "See [Training and configuration](../guides/training.md) for how the settings fit together.",
        "",
        "Sections: " + ", ".join(f"[`{name}`](#{name})" for name in sections) + ".",
        "",
    ]
    for section, cls in sections.items():
        out += [f"## {section}", ""]
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
            out += [" ".join(doc.split()), ""]
        header = "| key | type | default | " + " | ".join(f"`{n}`" for n in names) + " | description |"
        rule = "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |"
        out += [header, rule]
        group = None
        for f in (f for f in fields if f.section == section):
            if f.group and f.group != group:
                group = f.group
                out.append(f"| **{_cell(group)}** | | | " + " | ".join("" for _ in names) + " | |")
            cells = [
                _code(f.key),
                _code(f.type),
                _code(format_value(f.default)),
                *(_code(format_value(presets[n][f.key])) if f.key in presets[n] else "·" for n in names),
                _cell(f.help),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI page


@dataclasses.dataclass
class CommandDoc:
    path: str  # "pv2tea data validate"
    help: str
    usage: str
    params: list[tuple[str, str]]  # (declaration, help)
    subcommands: list[str]


def cli_commands() -> list[CommandDoc]:
    """Every command and command group of the ``pv2tea`` Typer app, depth first in registration order."""
    import typer.main

    from pv2tea.cli import app

    root = typer.main.get_command(app)
    out: list[CommandDoc] = []

    def walk(cmd: Any, name: str, parent: Any) -> None:
        ctx = cmd.context_class(cmd, info_name=name, parent=parent)
        params = []
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            record = p.get_help_record(ctx) if hasattr(p, "get_help_record") else None
            params.append(record if record else (p.name, ""))
        subs = list(getattr(cmd, "commands", {}) or {})
        out.append(
            CommandDoc(
                path=ctx.command_path,
                help=(cmd.help or "").strip(),
                usage=f"{ctx.command_path} " + " ".join(cmd.collect_usage_pieces(ctx)),
                params=params,
                subcommands=subs,
            )
        )
        for sub in subs:
            walk(cmd.commands[sub], sub, ctx)

    walk(root, "pv2tea", None)
    return out


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def cli_reference_markdown() -> str:
    """The command-line reference page."""
    commands = cli_commands()
    out = [
        "# Command-line reference",
        "",
        "<!-- generated at build time by docs/hooks/reference.py from pv2tea.cli:app; do not edit -->",
        "",
        "Generated from the Typer app `pv2tea.cli:app`: every command with its options, as `pv2tea COMMAND "
        "--help` prints them. Options that take a list (such as `--set`) may be repeated.",
        "",
    ]
    index = [f"- [`{c.path}`](#{_anchor(c.path)}): {_cell(c.help)}" for c in commands]
    out += index + [""]
    for c in commands:
        level = "#" * min(2 + c.path.count(" ") - 1, 4) if c.path != "pv2tea" else "##"
        out += [f"{level} `{c.path}` {{#{_anchor(c.path)}}}", ""]
        if c.help:
            out += [c.help, ""]
        out += ["```text", c.usage, "```", ""]
        if c.subcommands:
            out += ["Commands: " + ", ".join(f"[`{s}`](#{_anchor(c.path + ' ' + s)})" for s in c.subcommands), ""]
        if c.params:
            out += ["| option | description |", "| --- | --- |"]
            out += [f"| {_code(decl)} | {_cell(text)} |" for decl, text in c.params]
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ API pages


def api_modules() -> dict[str, list[str]]:
    """Page name -> the public modules it documents: one page per subpackage of pv2tea, and one for the package
    itself (its facade) with its top-level modules; the modules of ``API_EXCLUDED`` are on none."""
    pages: dict[str, list[str]] = {"pv2tea": ["pv2tea"]}
    for path in sorted(SRC.iterdir()):
        if path.name.startswith("_") or path.stem in API_EXCLUDED:
            continue
        if path.suffix == ".py":
            pages["pv2tea"].append(f"pv2tea.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").is_file():
            mods = [f"pv2tea.{path.name}"]
            mods += [f"pv2tea.{path.name}.{m.stem}" for m in sorted(path.glob("*.py")) if not m.name.startswith("_")]
            pages[f"pv2tea.{path.name}"] = mods
    return pages


def api_page_markdown(page: str, modules: list[str]) -> str:
    out = [f"# `{page}`", "", "<!-- generated at build time by docs/hooks/reference.py; do not edit -->", ""]
    for mod in modules:
        # the package's own page shows its facade as a list (each name is documented in its home module)
        options = ["    options:", "      members: false"] if mod == "pv2tea" else []
        out += [f"::: {mod}", *options, ""]
    return "\n".join(out)


# a Sphinx role left in a rendered docstring: ":class:<code>~pkg.mod.Name</code>", ":meth:<code>title &lt;target&gt;</code>"
_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj):\s*<code>(~?)([^<]*?)(?:\s*&lt;[^<]*?&gt;)?</code>")


def strip_roles(html: str) -> str:
    """The rendered API page with each Sphinx role of the docstrings written as the code it names (``~`` keeps the
    last dotted part, an explicit title replaces the target), as Sphinx would show it."""

    def code(match: re.Match[str]) -> str:
        text = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
        return f"<code>{text}</code>"

    return _ROLE.sub(code, html)


def api_nav() -> list[dict[str, str]]:
    return [{page: f"{API_DIR}/{page}.md"} for page in api_modules()]


# -------------------------------------------------------------------------------------------- mkdocs hooks


def generated_pages() -> dict[str, str]:
    pages = {CONFIG_PAGE: config_reference_markdown(), CLI_PAGE: cli_reference_markdown()}
    for page, modules in api_modules().items():
        pages[f"{API_DIR}/{page}.md"] = api_page_markdown(page, modules)
    return pages


def _fill_nav(nav: list[Any]) -> bool:
    for item in nav:
        if isinstance(item, dict):
            for title, value in item.items():
                if title == API_NAV_TITLE and isinstance(value, list):
                    value.extend(api_nav())
                    return True
                if isinstance(value, list) and _fill_nav(value):
                    return True
    return False


def on_config(config: Any) -> Any:
    """Append one nav entry per generated API page to the nav section titled ``API``."""
    if config.get("nav") and not _fill_nav(config["nav"]):
        raise ValueError(f"mkdocs.yml: no nav section titled '{API_NAV_TITLE}' to list the API pages under")
    return config


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Write the docstrings' Sphinx roles on the API pages as code (mkdocstrings leaves them as text)."""
    return strip_roles(html) if page.file.src_uri.startswith(f"{API_DIR}/") else html


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the build (they never exist on disk)."""
    from mkdocs.structure.files import File

    for src_uri, content in generated_pages().items():
        existing = files.get_file_from_path(src_uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, src_uri, content=content))
    return files
