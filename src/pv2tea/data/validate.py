"""Validation of PV2TEA dataset files into typed records (ACL Findings 2023, §2.1).

Every row is checked field by field and every problem is reported with its file, row
and field, so a bad dataset is fixed in one pass. Image files are decoded in full to
catch missing, non-image, corrupt and truncated files. A row without images is valid
(a text-only product). ``load_dataset`` either raises on the first invalid file with
all its errors, or, with ``skip_invalid=True``, drops bad rows and reports them.

Rows are read and validated as a stream (:func:`iter_validated`): ``validate_file`` and ``scan_dataset`` keep the
problems and counts but no rows, and ``iter_records`` then yields the records of a scanned file one at a time, so
a file larger than memory is validated in full and used without being loaded (what crosses rows is one entry per
distinct id, to find repeats, and a bounded cache of image verdicts). ``load_dataset`` keeps the records in memory
(training).
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, NamedTuple

import numpy as np

from pv2tea.data.images import check_image
from pv2tea.data.readers import iter_table
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

__all__ = [
    "DatasetScan",
    "ValidatedRow",
    "iter_records",
    "iter_validated",
    "load_dataset",
    "scan_dataset",
    "unicode_problem",
    "unknown_field_warnings",
    "validate_file",
    "validate_rows",
]

# Each entry: (row number, every problem found in that row).
RowProblems = tuple[int, list[RowError]]
# How many image verdicts validation remembers (a product's images recur on the rows of its attributes, which
# are usually adjacent); the oldest is forgotten first, so memory does not grow with the file.
IMAGE_VERDICTS_KEPT = 65_536


# A UTF-16 surrogate code point: never a character of its own. JSON's "\ud800" escape yields one alone in a Python
# string, which cannot be encoded as UTF-8 (tokenizers and JSON writers fail on it).
_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(value: str) -> str | None:
    """Why ``value`` is not a sequence of Unicode scalar values (a lone surrogate), or None when it is one."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"is not valid Unicode: a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1} "
        f"(a broken \\u escape?), which cannot be encoded as UTF-8"
    )


class ValidatedRow(NamedTuple):
    """One validated row: its 1-based number, its record (None if invalid) and every problem found in it."""

    row: int
    record: Record | None
    errors: list[RowError]


class _ImageVerdicts(OrderedDict):
    """The last ``size`` image paths checked and their verdicts (None: a readable image)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __getitem__(self, key: str) -> str | None:
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: str | None) -> None:
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


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
        if problem := unicode_problem(value):
            self.fail(field, f"'{field}' {problem}")
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
            elif problem := unicode_problem(item):
                self.fail(field, f"value {position} {problem}")
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

    def probabilities(self, raw: Mapping[str, Any], field: str) -> tuple[tuple[str, float], ...] | None:
        """An optional soft label: a JSON object (or a CSV cell / Parquet map holding one) from value to a number in
        [0, 1]; None if absent, empty or invalid."""
        value = raw.get(field)
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except ValueError as exc:
                self.fail(field, f"must be a JSON object from value to probability ({exc})")
                return None
        if value is None:
            return None
        if isinstance(value, Mapping):
            pairs = list(value.items())
        elif isinstance(value, (list, tuple, np.ndarray)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value
        ):
            pairs = [tuple(p) for p in value]  # a Parquet map column reads as (key, value) pairs
        else:
            self.fail(field, f"must be an object from value to probability, got {type(value).__name__}")
            return None
        out: list[tuple[str, float]] = []
        for key, number in pairs:
            if not isinstance(key, str) or not key.strip():
                self.fail(field, f"value {key!r} must be a non-empty string")
                return None
            if problem := unicode_problem(key):
                self.fail(field, f"value {key!r} {problem}")
                return None
            if isinstance(number, bool) or not isinstance(number, (int, float, np.integer, np.floating)):
                self.fail(field, f"the probability of '{key}' must be a number in [0, 1], got {number!r}")
                return None
            if not 0.0 <= float(number) <= 1.0:  # NaN fails too
                self.fail(field, f"the probability of '{key}' must be a number in [0, 1], got {float(number):g}")
                return None
            out.append((key.strip(), float(number)))
        return tuple(out) or None


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
    label_probs = checker.probabilities(raw, "label_probs")

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
        label_probs=label_probs,
    )


class _Validator:
    """Validates the rows of one file in order, keeping only what spans rows: the first row of each id (to find
    repeats; one entry per distinct id) and the verdicts of the most recently checked images (bounded)."""

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        check_images: bool,
        require_label: bool,
        check_duplicates: bool = True,
        check_images_of: Callable[[int], bool] | None = None,
    ) -> None:
        self.file = str(path)
        self.base_dir = os.path.dirname(os.path.abspath(self.file))
        self.check_images = check_images
        self.check_images_of = check_images_of
        self.require_label = require_label
        self.check_duplicates = check_duplicates
        self.first_row_of_id: dict[str, int] = {}
        self.image_reasons: _ImageVerdicts = _ImageVerdicts(IMAGE_VERDICTS_KEPT)

    def __call__(self, row: int, raw: Mapping[str, Any]) -> ValidatedRow:
        checker = _RowChecker(self.file, row)
        images = self.check_images and (self.check_images_of is None or self.check_images_of(row))
        record = _validate_row(raw, checker, self.base_dir, self.image_reasons if images else None, self.require_label)
        row_id = raw.get("id")
        if self.check_duplicates and isinstance(row_id, str) and row_id.strip() and not unicode_problem(row_id):
            key = row_id.strip()
            first = self.first_row_of_id.setdefault(key, row)
            if first != row:
                checker.fail("id", f"duplicate id '{key}' (first seen in row {first})")
                record = None
        return ValidatedRow(row, record, checker.errors)


def iter_validated(
    rows: Iterable[Mapping[str, Any]],
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
    check_images_of: Callable[[int], bool] | None = None,
) -> Iterator[ValidatedRow]:
    """Validate raw rows read from ``path`` one at a time, as they are consumed (image paths are relative to its
    directory): for each row, its 1-based number and either its record or every problem found in it. A repeated
    ``id`` makes the later row invalid. ``check_images_of(row)`` limits the image checks to the rows it accepts
    (e.g. one process's share of the rows); the other rows' images are not opened."""
    validator = _Validator(
        path, check_images=check_images, require_label=require_label, check_images_of=check_images_of
    )
    for row, raw in enumerate(rows, start=1):
        yield validator(row, raw)


def validate_rows(
    rows: Iterable[Mapping[str, Any]],
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
) -> tuple[list[Record], list[RowProblems]]:
    """Validate raw rows read from ``path`` (image paths are relative to its directory).

    Returns the valid records in order and, for each invalid row, its 1-based row number
    with all its errors. A repeated ``id`` makes the later row invalid.
    """
    records: list[Record] = []
    problems: list[RowProblems] = []
    for result in iter_validated(rows, path, check_images=check_images, require_label=require_label):
        if result.record is None:
            problems.append((result.row, result.errors))
        else:
            records.append(result.record)
    return records, problems


class _FieldTally:
    """The fields outside the schema seen in rows passing through :meth:`observe`: first row and count of each."""

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def observe(self, rows: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """``rows`` unchanged, noting each row's unknown fields as it passes."""
        for row, raw in enumerate(rows, start=1):
            for name in raw:
                if name in FIELDS or name == PARSE_ERROR_KEY:
                    continue
                self.first.setdefault(name, row)
                self.count[name] = self.count.get(name, 0) + 1
            yield raw

    def warnings(self, path: str | PathLike[str]) -> list[str]:
        count = self.count
        return [
            f"{path}: field '{name}' is not part of the schema and is ignored (row {self.first[name]}"
            f"{f' and {count[name] - 1} more' if count[name] > 1 else ''}); known fields: {', '.join(FIELDS)}"
            for name in sorted(self.first, key=self.first.__getitem__)
        ]


def unknown_field_warnings(rows: Iterable[Mapping[str, Any]], path: str | PathLike[str]) -> list[str]:
    """One message per field that is not part of the schema (it is ignored), with its first row and count.

    A misspelt field (``"colour"``, ``"labels"``) would otherwise be dropped without a word.
    """
    tally = _FieldTally()
    for _ in tally.observe(rows):
        pass
    return tally.warnings(path)


def validate_file(
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
    warnings: list[str] | None = None,
) -> list[RowError]:
    """Every problem in the dataset file at ``path``, in row order (empty if valid); the file is read as a stream.

    ``warnings``, when given, is extended with the messages about fields outside the schema.
    """
    scan = scan_dataset(path, check_images=check_images, require_label=require_label)
    if warnings is not None:
        warnings.extend(scan.warnings)
    return scan.errors


def load_dataset(
    path: str | PathLike[str],
    *,
    skip_invalid: bool = False,
    check_images: bool = True,
    require_label: bool = True,
) -> LoadResult:
    """Load and validate a dataset file into memory (the records; the raw rows are streamed).

    Args:
        path: A JSONL, CSV or Parquet file of product rows (``pv2tea data validate`` checks one from the shell).
        skip_invalid: Skip an invalid row and count it (in ``skipped``) instead of raising.
        check_images: Open every image (a missing or unreadable one makes the row invalid).
        require_label: Every row needs a ``label``; False for rows to predict.

    Returns:
        The records, the skipped rows (file, row, field, message) and warnings (such as fields no reader knows).

    Raises:
        DataValidationError: if any row is invalid and ``skip_invalid`` is False; it lists
            every error found in the file.
        FileNotFoundError / ValueError: for a missing file or an unsupported extension.
    """
    tally = _FieldTally()
    records: list[Record] = []
    errors: list[RowError] = []
    skipped: list[RowError] = []
    for result in iter_validated(
        tally.observe(iter_table(path)), path, check_images=check_images, require_label=require_label
    ):
        if result.record is not None:
            records.append(result.record)
        else:
            errors.extend(result.errors)
            skipped.append(result.errors[0])
    if errors and not skip_invalid:
        raise DataValidationError(errors)
    return LoadResult(path=str(path), records=records, skipped=skipped, warnings=tally.warnings(path))


@dataclass
class DatasetScan:
    """What one validating pass over a dataset file found, without keeping its records (:func:`scan_dataset`)."""

    path: str  # the dataset file as given by the caller
    n_rows: int  # data rows read
    n_valid: int  # rows that are records
    n_labelled: int  # valid rows with a non-empty label
    errors: list[RowError] = field(default_factory=list)  # every problem, in row order
    bad_rows: set[int] = field(default_factory=set)  # 1-based numbers of the invalid rows
    warnings: list[str] = field(default_factory=list)  # fields outside the schema, which are ignored
    ids: set[str] | None = None  # the valid rows' ids (keep_ids=True)

    @property
    def skipped(self) -> list[RowError]:
        """The first problem of each invalid row (what ``skip_invalid`` drops)."""
        first: dict[int, RowError] = {}
        for error in self.errors:
            first.setdefault(error.row, error)
        return list(first.values())


def scan_dataset(
    path: str | PathLike[str],
    *,
    check_images: bool = True,
    require_label: bool = True,
    rows: Callable[[int], bool] | None = None,
    keep_ids: bool = False,
) -> DatasetScan:
    """Validate a dataset file in one streaming pass, keeping the problems and counts but not the records; with
    :func:`iter_records` after it, a file of any size is validated in full before its records are used one at a
    time.

    ``rows`` (a row number → bool) restricts the scan to one process's share of the rows: every row is read and
    its id noted (a repeat is found across shares), but only the accepted rows' images are opened, and the
    counts, ids and problems are theirs; the scans of all shares together are the scan of the file.
    """
    tally = _FieldTally()
    scan = DatasetScan(path=str(path), n_rows=0, n_valid=0, n_labelled=0, ids=set() if keep_ids else None)
    for result in iter_validated(
        tally.observe(iter_table(path)),
        path,
        check_images=check_images,
        require_label=require_label,
        check_images_of=rows,
    ):
        scan.n_rows = result.row
        if rows is not None and not rows(result.row):
            continue
        if result.record is None:
            scan.errors.extend(result.errors)
            scan.bad_rows.add(result.row)
            continue
        scan.n_valid += 1
        scan.n_labelled += bool(result.record.label)
        if scan.ids is not None:
            scan.ids.add(result.record.id)
    scan.warnings = tally.warnings(path)
    return scan


def iter_records(
    path: str | PathLike[str],
    *,
    skip_rows: Container[int] = (),
    require_label: bool = True,
    rows: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, Record]]:
    """The records of a dataset file as a stream of (row number, record), read as they are consumed, after a
    :func:`scan_dataset` of the same file found its problems: the rows in ``skip_rows`` (the scan's
    ``bad_rows``) are passed over, and with ``rows`` only the rows it accepts are validated and yielded (e.g. one
    process's share). Images and repeated ids were checked by the scan and are not checked again.

    Raises:
        DataValidationError: a row outside ``skip_rows`` is invalid (the file changed since the scan).
    """
    validator = _Validator(path, check_images=False, require_label=require_label, check_duplicates=False)
    for row, raw in enumerate(iter_table(path), start=1):
        if row in skip_rows or (rows is not None and not rows(row)):
            continue
        result = validator(row, raw)
        if result.record is None:
            raise DataValidationError(result.errors)
        yield row, result.record
