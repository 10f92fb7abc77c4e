"""Validation of PV2TEA dataset files into typed records (ACL Findings 2023, §2.1).

Every row is checked field by field and every problem is reported with its file, row
and field, so a bad dataset is fixed in one pass. Image files are decoded in full to
catch missing, non-image, corrupt and truncated files. A row without images is valid
(a text-only product). ``load_dataset`` either raises on the first invalid file with
all its errors, or, with ``skip_invalid=True``, drops bad rows and reports them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np

from pv2tea.data.images import check_image
from pv2tea.data.readers import read_table
from pv2tea.data.schema import (
    FIELDS,
    PARSE_ERROR_KEY,
    REQUIRED_FIELDS,
    SOURCES,
    DataValidationError,
    LoadResult,
    Record,
    RowError,
    Unparsable,
)

__all__ = ["load_dataset", "unknown_field_warnings", "validate_file", "validate_rows"]

# Each entry: (row number, every problem found in that row).
RowProblems = tuple[int, list[RowError]]


class _RowChecker:
    """Collects the errors of one row while converting its fields."""

    def __init__(self, file: str, row: int) -> None:
        self.file = file
        self.row = row
        self.errors: list[RowError] = []

    def fail(self, field: str, message: str) -> None:
        self.errors.append(RowError(self.file, self.row, field, message))

    def string(self, raw: Mapping[str, Any], field: str, *, required: bool) -> str | None:
        """A stripped non-empty string field, or None (with an error if required)."""
        value = raw.get(field)
        if value is None:
            if required:
                self.fail(field, f"missing required field '{field}'")
            return None
        if isinstance(value, Unparsable):
            self.fail(field, value.reason)
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {type(value).__name__}")
            return None
        if not value.strip():
            self.fail(field, f"'{field}' is empty or whitespace-only")
            return None
        return value

    def strings(self, raw: Mapping[str, Any], field: str) -> list[str] | None:
        """A list-of-strings field (a plain string is one value); None if absent or invalid."""
        value = raw.get(field)
        if value is None:
            return None
        if isinstance(value, Unparsable):
            self.fail(field, value.reason)
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple, np.ndarray)):
            self.fail(field, f"must be a list of strings, got {type(value).__name__}")
            return None
        values: list[str] = []
        for position, item in enumerate(value, start=1):
            if not isinstance(item, str):
                self.fail(field, f"value {position} must be a string, got {type(item).__name__}")
            elif not item.strip():
                self.fail(field, f"value {position} is an empty string")
            else:
                values.append(item.strip())
        return values if len(values) == len(value) else None

    def fraction(self, raw: Mapping[str, Any], field: str) -> float | None:
        """An optional number in [0, 1] (a CSV cell's text is read as one); None if absent or invalid."""
        value = raw.get(field)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                self.fail(field, f"must be a number in [0, 1], got {value!r}")
                return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            self.fail(field, f"must be a number in [0, 1], got {type(value).__name__}")
            return None
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = float("inf")
        if not 0.0 <= number <= 1.0:  # NaN fails too
            self.fail(field, f"must be a number in [0, 1], got {number:g}")
            return None
        return number


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    """Values without repeats, first occurrence kept."""
    return tuple(dict.fromkeys(values))


def _resolve(image: str, base_dir: str) -> str:
    """Absolute path of ``image``, relative paths being relative to ``base_dir``."""
    return os.path.abspath(os.path.join(base_dir, image))


def _validate_row(
    raw: Mapping[str, Any],
    checker: _RowChecker,
    base_dir: str,
    image_reasons: dict[str, str | None] | None,
    require_label: bool,
) -> Record | None:
    """Convert one raw row, recording every problem in ``checker``."""
    parse_error = raw.get(PARSE_ERROR_KEY)
    if isinstance(parse_error, Unparsable):
        checker.fail("json", f"{parse_error.reason}: {parse_error.raw[:80]!r}")
        return None

    scalars = [name for name in REQUIRED_FIELDS if name != "label"]
    values = {name: checker.string(raw, name, required=True) or "" for name in scalars}

    label = checker.strings(raw, "label")
    if require_label and raw.get("label") is None:
        checker.fail("label", "missing required field 'label'")
    elif require_label and label == []:
        checker.fail("label", "label is empty; at least one weak value is required")

    gold = checker.strings(raw, "gold")

    source = raw.get("source")
    if source is not None and source not in SOURCES:
        checker.fail("source", f"unknown source {source!r}; expected 'text', 'image' or null")

    label_weight = checker.fraction(raw, "label_weight")

    images = checker.strings(raw, "images")
    resolved: list[str] = []
    for image in images or []:
        path = _resolve(image, base_dir)
        resolved.append(path)
        if image_reasons is None:
            continue
        if path not in image_reasons:
            image_reasons[path] = check_image(path)
        reason = image_reasons[path]
        if reason is not None:
            checker.fail("images", f"image '{image}' {reason}")

    if checker.errors:
        return None
    return Record(
        id=values["id"].strip(),
        text=values["text"],
        images=tuple(resolved),
        category=values["category"].strip(),
        attribute=values["attribute"].strip(),
        label=_unique(label or []),
        gold=_unique(gold) if gold else None,
        source=source,
        label_weight=label_weight,
    )


def validate_rows(
    rows: Sequence[Mapping[str, Any]],
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
) -> tuple[list[Record], list[RowProblems]]:
    """Validate raw rows read from ``path`` (image paths are relative to its directory).

    Returns the valid records in order and, for each invalid row, its 1-based row number
    with all its errors. A repeated ``id`` makes the later row invalid.
    """
    file = str(path)
    base_dir = os.path.dirname(os.path.abspath(file))
    image_reasons: dict[str, str | None] | None = {} if check_images else None
    first_row_of_id: dict[str, int] = {}
    records: list[Record] = []
    problems: list[RowProblems] = []
    for row, raw in enumerate(rows, start=1):
        checker = _RowChecker(file, row)
        record = _validate_row(raw, checker, base_dir, image_reasons, require_label)
        row_id = raw.get("id")
        if isinstance(row_id, str) and row_id.strip():
            key = row_id.strip()
            if key in first_row_of_id:
                first = first_row_of_id[key]
                checker.fail("id", f"duplicate id '{key}' (first seen in row {first})")
                record = None
            else:
                first_row_of_id[key] = row
        if record is None:
            problems.append((row, checker.errors))
        else:
            records.append(record)
    return records, problems


def unknown_field_warnings(rows: Sequence[Mapping[str, Any]], path: str | PathLike[str]) -> list[str]:
    """One message per field that is not part of the schema (it is ignored), with its first row and count.

    A misspelt field (``"colour"``, ``"labels"``) would otherwise be dropped without a word.
    """
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    for row, raw in enumerate(rows, start=1):
        for name in raw:
            if name in FIELDS or name == PARSE_ERROR_KEY:
                continue
            first.setdefault(name, row)
            count[name] = count.get(name, 0) + 1
    return [
        f"{path}: field '{name}' is not part of the schema and is ignored (row {first[name]}"
        f"{f' and {count[name] - 1} more' if count[name] > 1 else ''}); known fields: {', '.join(FIELDS)}"
        for name in sorted(first, key=first.__getitem__)
    ]


def validate_file(
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
    warnings: list[str] | None = None,
) -> list[RowError]:
    """Every problem in the dataset file at ``path``, in row order (empty if valid).

    ``warnings``, when given, is extended with the messages about fields outside the schema.
    """
    rows = read_table(path)
    _, problems = validate_rows(rows, path, check_images=check_images, require_label=require_label)
    if warnings is not None:
        warnings.extend(unknown_field_warnings(rows, path))
    return [error for _, errors in problems for error in errors]


def load_dataset(
    path: str | PathLike[str],
    *,
    skip_invalid: bool = False,
    check_images: bool = True,
    require_label: bool = True,
) -> LoadResult:
    """Load and validate a dataset file.

    Raises:
        DataValidationError: if any row is invalid and ``skip_invalid`` is False; it lists
            every error found in the file.
        FileNotFoundError / ValueError: for a missing file or an unsupported extension.
    """
    rows = read_table(path)
    records, problems = validate_rows(rows, path, check_images=check_images, require_label=require_label)
    if problems and not skip_invalid:
        raise DataValidationError([error for _, errors in problems for error in errors])
    return LoadResult(
        path=str(path),
        records=records,
        skipped=[errors[0] for _, errors in problems],
        warnings=unknown_field_warnings(rows, path),
    )
