"""Tests for the plain-text report tables and the atomic JSON writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.eval.report import compare_table, format_report_table, write_report

COLOR = {"attribute": "color", "multi_value": True}
PATTERN = {"attribute": "pattern", "multi_value": False}


def _report() -> dict:
    """color: text {red ok, red empty}, image {blue+white half, blue ok}; pattern: text only.

    all:   red (1, 1/2), blue (1/2, 1/2), white (0, 0), solid (1, 1) -> P 62.50, R 50.00,
           F1 55.56, acc 3/5 = 60.00
    text:  red (1, 1/2), solid (1, 1) -> P 100.00, R 75.00, F1 85.71, acc 66.67
    image: blue (1/2, 1/2), white (0, 0) -> P = R = F1 = 25.00, acc 50.00
    gap:   P 75.00, R 50.00, F1 60.71, acc 16.67
    """
    return source_aware_report(
        [
            Example(("red",), ("red",), "text", **COLOR),
            Example(("red",), (), "text", **COLOR),
            Example(("blue", "white"), ("blue",), "image", **COLOR),
            Example(("blue",), ("blue",), "image", **COLOR),
            Example(("solid",), ("Solid",), "text", **PATTERN),
        ]
    )


def _row(table: str, label: str, occurrence: int = 0) -> list[str]:
    """Cells (split on whitespace) after ``label`` on the ``occurrence``-th line with it."""
    lines = [line for line in table.splitlines() if label in line]
    return lines[occurrence].split(label, 1)[1].split()


def test_format_report_table_rows_and_numbers() -> None:
    table = format_report_table(_report(), title="PV2TEA on test")
    assert table.splitlines()[0].strip() == "PV2TEA on test"
    for header in ("P", "R", "F1", "Acc", "n"):
        assert header in table.splitlines()[1].split()
    assert _row(table, "all attributes   overall") == ["62.50", "50.00", "55.56", "60.00", "5"]
    assert _row(table, "source: text") == ["100.00", "75.00", "85.71", "66.67", "3"]
    assert _row(table, "source: image") == ["25.00", "25.00", "25.00", "50.00", "2"]
    assert _row(table, "GAP (text - image)") == ["75.00", "50.00", "60.71", "16.67", "–"]


def test_format_report_table_per_attribute_and_nulls() -> None:
    table = format_report_table(_report())
    # color: red (1, 1/2), blue (1/2, 1/2), white (0, 0) -> P 50, R 33.33, F1 40, acc 2/4
    assert _row(table, "color            overall") == ["50.00", "33.33", "40.00", "50.00", "4"]
    # pattern has no image examples: null metrics, n 0, null gap
    assert _row(table, "pattern          overall") == ["100.00"] * 4 + ["1"]
    assert _row(table, "source: image", occurrence=2) == ["–", "–", "–", "–", "0"]
    assert _row(table, "GAP (text - image)", occurrence=2) == ["–"] * 5


def test_format_report_table_of_empty_report() -> None:
    table = format_report_table(source_aware_report([]))
    assert _row(table, "overall") == ["–", "–", "–", "–", "0"]
    assert "color" not in table


def test_compare_table_side_by_side() -> None:
    full = _report()
    color_only = source_aware_report([Example(("red",), ("red",), "text", **COLOR)])
    table = compare_table({"weak": color_only, "PV2TEA": full}, title="weak labels vs model")
    assert table.splitlines()[0].strip() == "weak labels vs model"
    header = table.splitlines()[1]
    assert header.index("weak P") < header.index("weak F1") < header.index("PV2TEA P")
    # columns: weak P, R, F1, PV2TEA P, R, F1
    assert _row(table, "all attributes   overall") == ["100.00"] * 3 + ["62.50", "50.00", "55.56"]
    assert _row(table, "GAP (text - image)") == ["–"] * 3 + ["75.00", "50.00", "60.71"]
    # an attribute only one method was evaluated on
    assert _row(table, "pattern          overall") == ["–"] * 3 + ["100.00"] * 3
    chosen = compare_table({"weak": color_only, "PV2TEA": full}, metrics=("f1", "accuracy"))
    assert "weak Acc" in chosen.splitlines()[0] and "weak P" not in chosen.splitlines()[0]
    assert _row(chosen, "all attributes   overall")[2] == "55.56"
    with pytest.raises(ValueError, match="unknown metric"):
        compare_table({"weak": color_only}, metrics=("f2",))


def test_write_report_roundtrip_and_atomic(tmp_path: Path) -> None:
    report = _report()
    path = tmp_path / "out" / "report.json"
    write_report(report, path)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == report
    assert text.startswith('{\n  "overall": {\n    "precision": ')
    assert "null" in text and "NaN" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_write_report_rejects_nan_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError):
        write_report({"overall": {"f1": math.nan}}, path)
    assert path.read_text(encoding="utf-8") == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
