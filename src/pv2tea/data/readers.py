"""Reading and writing PV2TEA dataset files: JSON Lines, CSV and Parquet.

``read_table`` returns raw rows (dicts) without validating them: anything a reader
cannot parse is kept as an ``Unparsable`` value so that validation can report it with
its file, row and field. In CSV cells and Parquet string columns, the list columns
(``images``, ``label``, ``gold``) are either a JSON list (``["red", "blue"]``) or
``|``-separated values (``red|blue``); an empty cell is an empty list (absent ``gold``).

``write_records`` writes image paths relative to the output file's directory when the
image lies inside it, so a catalog directory can be moved as a whole.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pv2tea.data.schema import FIELDS, LIST_FIELDS, PARSE_ERROR_KEY, Record, Unparsable

__all__ = ["SUPPORTED_SUFFIXES", "parse_list_cell", "read_table", "write_records"]

# File suffixes each format is recognised by.
_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES: tuple[str, ...] = _JSONL_SUFFIXES + _CSV_SUFFIXES + _PARQUET_SUFFIXES

# Columns whose empty CSV cell means "absent" rather than an empty string.
_NULLABLE_SCALARS = ("source", "label_weight")

_PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("images", pa.list_(pa.string())),
        ("category", pa.string()),
        ("attribute", pa.string()),
        ("label", pa.list_(pa.string())),
        ("gold", pa.list_(pa.string())),
        ("source", pa.string()),
        ("label_weight", pa.float64()),
    ]
)


def _suffix(path: Path) -> str:
    """Return the lower-cased suffix of ``path``, or raise if no format handles it."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"unsupported dataset file '{path}': expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return suffix


def parse_list_cell(cell: str) -> list[str] | Unparsable:
    """Parse a CSV / Parquet string cell holding a list: JSON list, ``a|b`` or empty."""
    text = cell.strip()
    if not text:
        return []
    if not text.startswith("["):
        return [part.strip() for part in text.split("|")]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Unparsable(cell, f"not a valid JSON list ({exc})")
    if not isinstance(value, list):
        return Unparsable(cell, f"expected a JSON list, got {type(value).__name__}")
    return value


def _parse_cells(row: dict[str, Any]) -> dict[str, Any]:
    """Apply the string-cell conventions to the list and nullable columns of ``row``."""
    parsed = dict(row)
    for name in LIST_FIELDS:
        value = parsed.get(name)
        if isinstance(value, str):
            parsed[name] = parse_list_cell(value)
    if parsed.get("gold") == []:
        parsed["gold"] = None
    for name in _NULLABLE_SCALARS:
        if parsed.get(name) == "":
            parsed[name] = None
    return parsed


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # JSON Lines are separated by "\n" (or "\r\n") only: str.splitlines would also split a row at the U+2028, U+0085,
    # \x1c-\x1e ... that JSON strings may hold raw
    lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            rows.append({PARSE_ERROR_KEY: Unparsable(line, "blank line")})
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append({PARSE_ERROR_KEY: Unparsable(line, f"invalid JSON ({exc})")})
            continue
        if isinstance(value, dict):
            rows.append(value)
        else:
            reason = f"expected a JSON object, got {type(value).__name__}"
            rows.append({PARSE_ERROR_KEY: Unparsable(line, reason)})
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        # Cells beyond the header land under the key None; short rows give None values.
        return [_parse_cells({key: value for key, value in row.items() if key is not None}) for row in reader]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    return [_parse_cells(row) for row in pq.read_table(path).to_pylist()]


def read_table(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Read the raw rows of a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` dataset file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the extension is not a supported format.
    """
    file = Path(path)
    suffix = _suffix(file)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: '{file}'")
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(file)
    if suffix in _CSV_SUFFIXES:
        return _read_csv(file)
    return _read_parquet(file)


def _relative_image(image: str, out_dir: str) -> str:
    """Express an absolute image path relative to ``out_dir`` if it lies inside it."""
    if not os.path.isabs(image):
        return image
    absolute = os.path.abspath(image)
    if os.path.commonpath([absolute, out_dir]) != out_dir:
        return absolute
    return PurePath(os.path.relpath(absolute, out_dir)).as_posix()


def _as_list(value: Any) -> list[str] | None:
    """A list column value as a list (a plain string is one value); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _output_row(item: Record | Mapping[str, Any], out_dir: str) -> dict[str, Any]:
    """The JSON-ready row written for one record or record-like mapping."""
    if isinstance(item, Record):
        values: Mapping[str, Any] = {name: getattr(item, name) for name in FIELDS}
    else:
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise ValueError(f"cannot write unknown field(s) {unknown}; expected {list(FIELDS)}")
        values = item
    row = {name: values.get(name) for name in FIELDS}
    for name in LIST_FIELDS:
        row[name] = _as_list(row[name])
    row["images"] = [_relative_image(image, out_dir) for image in row["images"] or []]
    row["label"] = row["label"] or []
    weight = row["label_weight"]
    if weight is not None:
        try:
            row["label_weight"] = float(weight)  # a numpy number or a numeric string is written as a number
        except (TypeError, ValueError, OverflowError):
            row["label_weight"] = float("nan")
        if not 0.0 <= row["label_weight"] <= 1.0:
            raise ValueError(f"cannot write label_weight {weight!r} of row '{row['id']}': expected a number in [0, 1]")
    return row


def _write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FIELDS))
        writer.writeheader()
        for row in rows:
            cells = {name: "" if value is None else value for name, value in row.items()}
            for name in LIST_FIELDS:
                if row[name] is not None:
                    cells[name] = json.dumps(row[name], ensure_ascii=False)
            writer.writerow(cells)


def _write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(list(rows), schema=_PARQUET_SCHEMA), path)


def write_records(records: Sequence[Record] | Sequence[Mapping[str, Any]], path: str | PathLike[str]) -> Path:
    """Write records (or record-like dicts) to ``path``; the format follows the extension.

    Parent directories are created. Returns the written path.

    Raises:
        ValueError: if the extension is unsupported or a dict has unknown fields.
    """
    file = Path(path)
    suffix = _suffix(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    out_dir = os.path.abspath(file.parent)
    rows = [_output_row(item, out_dir) for item in records]
    if suffix in _JSONL_SUFFIXES:
        _write_jsonl(rows, file)
    elif suffix in _CSV_SUFFIXES:
        _write_csv(rows, file)
    else:
        _write_parquet(rows, file)
    return file
