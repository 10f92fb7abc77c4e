"""Plain-text tables and JSON files for PV2TEA source-aware reports (paper Tables 3 and 8).

Reports are the dicts of :func:`pv2tea.eval.metrics.source_aware_report`. Tables follow the
layout of the paper's Table 3: for all attributes and then for each attribute, the rows
``overall``, ``source: text`` (gold value contained in the text), ``source: image`` (gold
value absent from the text, inferable from the image) and the text - image ``GAP``.
Numbers have two decimals; undefined values (``None``) are shown as ``–``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pv2tea.eval.metrics import SOURCES

__all__ = ["compare_table", "format_report_table", "write_report"]

ALL_ATTRIBUTES = "all attributes"
NULL = "–"
_GAP_LABEL = "GAP (text - image)"
_METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("P", "precision"),
    ("R", "recall"),
    ("F1", "f1"),
    ("Acc", "accuracy"),
)
# Method columns of compare_table wrap long method names onto several header lines.
_COMPARE_COLUMN_WIDTH = 10
# Wide enough that rich never wraps or truncates a row; trailing spaces are stripped.
_RENDER_WIDTH = 400

# (scope, row label) -> the metric mapping of that row
_Rows = dict[tuple[str, str], Mapping[str, Any]]


def _block_rows(scope: str, block: Mapping[str, Any]) -> _Rows:
    """The overall / per-source / GAP rows of one ``{"overall", "by_source", "gap"}`` block."""
    rows: _Rows = {(scope, "overall"): block["overall"]}
    for source in SOURCES:
        rows[(scope, f"source: {source}")] = block["by_source"][source]
    rows[(scope, _GAP_LABEL)] = block["gap"]
    return rows


def _report_rows(report: Mapping[str, Any]) -> _Rows:
    """All rows of a report: the all-attributes block, then one block per attribute."""
    rows = _block_rows(ALL_ATTRIBUTES, report)
    for attribute, block in report["by_attribute"].items():
        rows |= _block_rows(attribute, block)
    return rows


def _cell(value: float | int | None) -> str:
    """Format a metric (two decimals) or count; ``None`` and missing values become ``–``."""
    if value is None:
        return NULL
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def _render(table: Table) -> str:
    """Render a rich table to plain text without colors or trailing spaces."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=_RENDER_WIDTH, color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    lines = (line.rstrip() for line in buffer.getvalue().splitlines())
    return "\n".join(lines).strip("\n") + "\n"


def _new_table(title: str) -> Table:
    """An empty table with the two row-label columns."""
    table = Table(title=title or None, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column("scope")
    table.add_column("subset")
    return table


def _add_rows(table: Table, keys: list[tuple[str, str]], cells: list[list[str]]) -> None:
    """Add rows, printing the scope once per block and a blank line between blocks."""
    previous_scope: str | None = None
    for (scope, label), row in zip(keys, cells, strict=True):
        if previous_scope is not None and scope != previous_scope:
            table.add_section()
        table.add_row(scope if scope != previous_scope else "", label, *row)
        previous_scope = scope


def format_report_table(report: Mapping[str, Any], title: str = "") -> str:
    """Render one source-aware report as a plain-text table (columns P, R, F1, Acc, n)."""
    table = _new_table(title)
    for header, _ in _METRIC_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("n", justify="right")
    rows = _report_rows(report)
    cells = [
        [_cell(metrics.get(key)) for _, key in _METRIC_COLUMNS] + [_cell(metrics.get("n"))] for metrics in rows.values()
    ]
    _add_rows(table, list(rows), cells)
    return _render(table)


def compare_table(
    reports: Mapping[str, Mapping[str, Any]], title: str = "", metrics: Sequence[str] = ("precision", "recall", "f1")
) -> str:
    """Render several methods' reports side by side (``metrics`` per method: P, R, F1 by default).

    ``reports`` maps a method name (e.g. ``"weak text labels"``, ``"PV2TEA"``) to its
    source-aware report. Rows are the union over reports, in first-seen order; a row a
    method lacks (an attribute it was not evaluated on) is shown as ``–``.
    """
    headers = {metric: header for header, metric in _METRIC_COLUMNS}
    unknown = [m for m in metrics if m not in headers]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(headers)}")
    table = _new_table(title)
    method_rows = {method: _report_rows(report) for method, report in reports.items()}
    for method in method_rows:
        for metric in metrics:
            table.add_column(f"{method} {headers[metric]}", justify="right", max_width=_COMPARE_COLUMN_WIDTH)
    keys = list(dict.fromkeys(key for rows in method_rows.values() for key in rows))
    cells = [
        [_cell(rows.get(key, {}).get(metric)) for rows in method_rows.values() for metric in metrics] for key in keys
    ]
    _add_rows(table, keys, cells)
    return _render(table)


def write_report(report: Mapping[str, Any], path: str | PathLike[str]) -> None:
    """Write a report as JSON (indent 2, NaN rejected) atomically, creating parent dirs.

    The JSON is serialized first, so an unserializable report leaves no file behind; it is
    then written to a temporary file in the target directory and moved into place with
    :func:`os.replace`, so readers never see a partial file.
    """
    target = Path(path)
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
