"""Reading and writing PV2TEA dataset files: JSON Lines, CSV and Parquet.

``iter_table`` yields raw rows (dicts) one at a time without validating them, so a file larger than
memory is read as a stream (Parquet one record batch at a time); ``read_table`` reads them all. Anything a
reader cannot parse is kept as an ``Unparsable`` value so that validation can report it with its file, row
and field. In CSV cells and Parquet string columns, the list columns
(``images``, ``label``, ``gold``) are either a JSON list (``["red", "blue"]``) or
``|``-separated values (``red|blue``); an empty cell is an empty list (absent ``gold``).

``write_records`` (or a :class:`RecordWriter`, a chunk at a time) writes image paths relative to the output file's directory when the
image lies inside it, so a catalog directory can be moved as a whole.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pv2tea.data.schema import FIELDS, LIST_FIELDS, PARSE_ERROR_KEY, Record, Unparsable

__all__ = [
    "PARQUET_BATCH_ROWS",
    "SUPPORTED_SUFFIXES",
    "RecordWriter",
    "check_table",
    "iter_table",
    "parse_list_cell",
    "read_table",
    "write_records",
]

# File suffixes each format is recognised by.
_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES: tuple[str, ...] = _JSONL_SUFFIXES + _CSV_SUFFIXES + _PARQUET_SUFFIXES

# Rows of a Parquet file decoded at a time by iter_table (a batch never spans two row groups).
PARQUET_BATCH_ROWS = 4096

# Columns whose empty CSV cell means "absent" rather than an empty string.
_NULLABLE_SCALARS = ("source", "label_weight", "label_probs")

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
        ("label_probs", pa.map_(pa.string(), pa.float64())),
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


def _jsonl_row(line: str) -> dict[str, Any]:
    """One JSON Lines row: the object, or an Unparsable saying why the line is not one."""
    if not line.strip():
        return {PARSE_ERROR_KEY: Unparsable(line, "blank line")}
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return {PARSE_ERROR_KEY: Unparsable(line, f"invalid JSON ({exc})")}
    if isinstance(value, dict):
        return value
    return {PARSE_ERROR_KEY: Unparsable(line, f"expected a JSON object, got {type(value).__name__}")}


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    # JSON Lines are separated by "\n" (or "\r\n") only: str.splitlines would also split a row at the U+2028, U+0085,
    # \x1c-\x1e ... that JSON strings may hold raw, so the file is read as bytes, which iterate at b"\n" alone.
    # Blank lines are held back until a non-blank line follows: trailing blank lines end the file, other ones are rows
    blanks: list[str] = []
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield from (_jsonl_row(blank) for blank in blanks)
                blanks.clear()
                text = data.decode("utf-8", "replace").rstrip("\r\n")
                yield {PARSE_ERROR_KEY: Unparsable(text, f"not UTF-8 text ({exc.reason} at byte {exc.start})")}
                continue
            line = line.removesuffix("\n").removesuffix("\r")
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                blanks.append(line)
                continue
            yield from (_jsonl_row(blank) for blank in blanks)
            blanks.clear()
            yield _jsonl_row(line)


def _first_undecodable_line(path: Path) -> int:
    """The 1-based number of the first line of ``path`` that is not UTF-8 (0: none)."""
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _iter_csv(path: Path) -> Iterator[dict[str, Any]]:
    # the csv module reads one record at a time (a quoted cell may span lines); row numbers exclude the header
    row = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            for cells in reader:
                row += 1
                # Cells beyond the header land under the key None; short rows give None values.
                yield _parse_cells({key: value for key, value in cells.items() if key is not None})
    except UnicodeDecodeError as exc:  # text is decoded a block ahead of the rows: find the line
        where = _first_undecodable_line(path)
        raise ValueError(f"{path} line {where}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path} row {row + 1}: unreadable CSV ({exc})") from None


def _iter_parquet(path: Path, batch_rows: int) -> Iterator[dict[str, Any]]:
    # one record batch (within one row group) is decoded at a time
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    row = 0
    with parquet:
        batches = parquet.iter_batches(batch_size=batch_rows)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"{path} row {row + 1}: unreadable Parquet data ({exc})") from None
            if batch is None:
                return
            for values in batch.to_pylist():
                row += 1
                yield _parse_cells(values)


def iter_table(path: str | PathLike[str], *, batch_rows: int | None = None) -> Iterator[dict[str, Any]]:
    """The raw rows of a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` dataset file, read one at a time.

    Only the row being read is held in memory (for Parquet, one batch of ``batch_rows`` rows, default :data:`PARQUET_BATCH_ROWS`): a caller that
    consumes the rows one by one reads a file of any size. The n-th row yielded is data row n of
    :class:`~pv2tea.data.schema.RowError` (JSONL: line n; CSV: header excluded; Parquet: index + 1).

    Raises:
        FileNotFoundError: if ``path`` does not exist (when called, not at the first row).
        ValueError: if the extension is not a supported format, or the file cannot be read as one (a Parquet
            file that is not one, a CSV file that is not UTF-8; the message names the file and row).
    """
    file = Path(path)
    suffix = _suffix(file)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: '{file}'")
    if suffix in _JSONL_SUFFIXES:
        return _iter_jsonl(file)
    if suffix in _CSV_SUFFIXES:
        return _iter_csv(file)
    return _iter_parquet(file, batch_rows or PARQUET_BATCH_ROWS)


def check_table(path: str | PathLike[str]) -> None:
    """Check, before any costly work (such as loading a model), that ``path`` is a dataset file with at least one row.

    Only the first row is read.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the extension is not a supported format, the file cannot be read as one, or it has no rows.
    """
    rows = iter_table(path)
    try:
        if next(iter(rows), None) is None:
            raise ValueError(
                f"{path}: no rows (the file is empty{' but for its header' if Path(path).suffix.lower() in _CSV_SUFFIXES else ''})"
            )
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def read_table(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Every raw row of a dataset file in memory (:func:`iter_table` read to the end).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the extension is not a supported format.
    """
    return list(iter_table(path))


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
    row: dict[str, Any] = {name: values.get(name) for name in FIELDS}
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
    probs = row["label_probs"]
    if probs is not None:  # a soft label: written as an object from value to probability (a repeated value summed)
        pairs = list(probs.items()) if isinstance(probs, Mapping) else list(probs)
        merged: dict[str, float] = {}
        for value, p in pairs:
            try:
                merged[str(value)] = merged.get(str(value), 0.0) + float(p)
            except (TypeError, ValueError, OverflowError):
                merged[str(value)] = float("nan")
        bad = [v for v, p in merged.items() if not 0.0 <= p <= 1.0]
        if bad:
            raise ValueError(
                f"cannot write label_probs of row '{row['id']}': the probability of {bad[0]!r} is not in [0, 1]"
            )
        row["label_probs"] = merged or None
    return row


class RecordWriter:
    """Writes records (or record-like dicts) to a dataset file a chunk at a time; the format follows the extension.

    Rows go to ``<name>.writing`` beside ``path``, which becomes ``path`` when the writer is closed; if the writer
    is left by an exception (a row that cannot be written), the half-written file is removed and ``path`` is left as
    it was. Parent directories are created. Use as a context manager::

        with RecordWriter(out) as writer:
            for chunk in chunks:
                writer.write(chunk)
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self._suffix = _suffix(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out_dir = os.path.abspath(self.path.parent)
        self._temp = self.path.with_name(self.path.name + ".writing")
        self.written = 0  # rows written so far
        self._pending: list[dict[str, Any]] = []  # Parquet rows not yet in a row group
        self._parquet: pq.ParquetWriter | None = None
        self._handle = None
        self._csv: csv.DictWriter | None = None
        if self._suffix in _PARQUET_SUFFIXES:
            self._parquet = pq.ParquetWriter(self._temp, _PARQUET_SCHEMA)
        elif self._suffix in _CSV_SUFFIXES:
            self._handle = self._temp.open("w", encoding="utf-8", newline="")
            self._csv = csv.DictWriter(self._handle, fieldnames=list(FIELDS))
            self._csv.writeheader()
        else:
            self._handle = self._temp.open("w", encoding="utf-8", newline="\n")

    def write(self, records: Iterable[Record] | Iterable[Mapping[str, Any]]) -> None:
        """Append rows (checked one by one: a dict with unknown fields or a bad ``label_weight`` raises)."""
        for item in records:
            row = _output_row(item, self._out_dir)
            if self._parquet is not None:
                self._pending.append(row)
                if len(self._pending) >= PARQUET_BATCH_ROWS:
                    self._flush_parquet()
            elif self._csv is not None:
                cells = {name: "" if value is None else value for name, value in row.items()}
                for name in (*LIST_FIELDS, "label_probs"):
                    if row[name] is not None:
                        cells[name] = json.dumps(row[name], ensure_ascii=False)
                self._csv.writerow(cells)
            elif self._handle is not None:
                self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                raise ValueError(f"{self.path}: the writer is closed")
            self.written += 1

    def _flush_parquet(self) -> None:
        if self._pending and self._parquet is not None:
            rows = [
                {**row, "label_probs": list(row["label_probs"].items())} if row["label_probs"] else row
                for row in self._pending
            ]  # a map column takes (key, value) pairs
            self._parquet.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA))
            self._pending = []

    def _close_files(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._handle is not None:
            self._handle.close()

    def close(self) -> Path:
        """Finish the file and move it to ``path``; returns ``path``."""
        if self._parquet is not None:
            self._flush_parquet()
        self._close_files()
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the half-written file; ``path`` is left as it was."""
        self._close_files()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_records(records: Iterable[Record] | Iterable[Mapping[str, Any]], path: str | PathLike[str]) -> Path:
    """Write records (or record-like dicts) to ``path``; the format follows the extension (:class:`RecordWriter`).

    Parent directories are created. Returns the written path.

    Raises:
        ValueError: if the extension is unsupported or a dict has unknown fields (``path`` is then left as it was).
    """
    with RecordWriter(path) as writer:
        writer.write(records)
    return writer.path
