"""A self-contained HTML page gathering the figures, tables and notes of PV2TEA runs.

:func:`write_html_report` writes one ``index.html`` with inline CSS, no scripts and no
external resources: figures are linked by paths relative to the output folder (so a folder
holding its figures can be moved or archived whole) and every piece of text is HTML-escaped.
Tables are preformatted plain text, e.g. from :func:`pv2tea.eval.report.format_report_table`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from urllib.parse import quote

__all__ = ["Section", "write_html_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #4C72B0; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
nav ol { padding-left: 1.4em; }
.notes { white-space: pre-line; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
""".strip()


@dataclass(frozen=True)
class Section:
    """One part of the report page.

    Attributes:
        heading: section title.
        figures: image files (usually PNGs of :mod:`pv2tea.viz.figures`); relative paths are
            relative to the current directory, like any :class:`~pathlib.Path`.
        tables: preformatted plain-text tables, shown verbatim in monospace.
        notes: free text shown above the figures; line breaks are kept.
    """

    heading: str
    figures: list[Path]
    tables: list[str]
    notes: str = ""


def _figure_src(figure: Path, out_dir: Path) -> str:
    """URL of ``figure`` relative to ``out_dir``; the file must exist."""
    if not figure.is_file():
        raise FileNotFoundError(f"figure {figure} does not exist")
    relative = os.path.relpath(figure.resolve(), out_dir.resolve())
    return quote(Path(relative).as_posix())


def _section_html(anchor: str, section: Section, out_dir: Path) -> str:
    """The ``<section>`` element of one section."""
    parts = [f'<section id="{anchor}">', f"<h2>{html.escape(section.heading)}</h2>"]
    if section.notes:
        parts.append(f'<p class="notes">{html.escape(section.notes)}</p>')
    for figure in map(Path, section.figures):
        src = html.escape(_figure_src(figure, out_dir))
        name = html.escape(figure.name)
        parts.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{name}"></a><figcaption>{name}</figcaption></figure>'
        )
    parts.extend(f"<pre>{html.escape(table)}</pre>" for table in section.tables)
    parts.append("</section>")
    return "\n".join(parts)


def write_html_report(out_dir: str | PathLike[str], title: str, sections: Sequence[Section]) -> Path:
    """Write ``out_dir/index.html`` with a table of contents and one part per section.

    Raises:
        FileNotFoundError: when a section lists a figure file that does not exist.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anchors = [f"section-{i}" for i in range(1, len(sections) + 1)]
    toc = "\n".join(
        f'<li><a href="#{anchor}">{html.escape(section.heading)}</a></li>' for anchor, section in zip(anchors, sections)
    )
    body = "\n".join(_section_html(anchor, section, out) for anchor, section in zip(anchors, sections))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
{_CSS}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<nav><h2>Contents</h2>
<ol>
{toc}
</ol>
</nav>
{body}
</body>
</html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
