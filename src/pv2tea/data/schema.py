"""Record schema and validation errors for PV2TEA datasets (ACL Findings 2023, §2.1).

A dataset file holds one row per (product, attribute) pair: the product's text, its
images (zero, one or more), its category, the queried attribute, the weak training
label produced by a text-only extractor (optionally with a ``label_weight`` in [0, 1]: how far
to trust it, such as the extractor's confidence, and ``label_probs``: a soft label, the extractor's probability of
each value), and optionally the human gold value(s) with the
modality (``"text"`` or ``"image"``) the gold value can be read from, used by the
paper's source-aware evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "FIELDS",
    "LIST_FIELDS",
    "MAX_LISTED_ERRORS",
    "PARSE_ERROR_KEY",
    "REQUIRED_FIELDS",
    "SOURCES",
    "DataValidationError",
    "LoadResult",
    "Record",
    "RowError",
    "Unparsable",
]

# Every column of a dataset file, in the order writers emit them.
FIELDS: tuple[str, ...] = (
    "id",
    "text",
    "images",
    "category",
    "attribute",
    "label",
    "gold",
    "source",
    "label_weight",
    "label_probs",
)
# Columns that must be present in every row.
REQUIRED_FIELDS: tuple[str, ...] = ("id", "text", "category", "attribute", "label")
# Columns holding a list of strings.
LIST_FIELDS: tuple[str, ...] = ("images", "label", "gold")
# Allowed values of ``source`` (besides null / absent).
SOURCES: tuple[str, ...] = ("text", "image")
# How many errors a DataValidationError message lists before summarising the rest.
MAX_LISTED_ERRORS = 20
# Key under which a reader stores an Unparsable for a row it could not parse at all.
PARSE_ERROR_KEY = "__parse_error__"


@dataclass(frozen=True)
class Record:
    """One validated (product, attribute) example: a row of a dataset file as
    :func:`~pv2tea.data.validate.load_dataset` returns it.

    Attributes:
        id: Unique per file, e.g. ``"p00012-color"``.
        text: Title, bullets and description joined.
        images: Absolute image paths; empty for a text-only product.
        category: The product type, e.g. ``"mug"``.
        attribute: The queried attribute, e.g. ``"color"``.
        label: The weak value(s) trained on; empty only when loaded with ``require_label=False``.
        gold: Human gold value(s), if annotated (what evaluation scores against).
        source: Where the gold value shows: ``"text"``, ``"image"`` or None.
        label_weight: How far to trust ``label``, in [0, 1] (e.g. the extractor's confidence); None: fully.
            Training multiplies the row's generation-loss weight by it (``schemes.label_weights``).
        label_probs: A soft label, (value, probability) pairs over the attribute's values (a text extractor's
            class probabilities); trained on with ``loss.soft_label_weight`` (the classification head).
    """

    id: str  # unique per file, e.g. "p00012-color"
    text: str  # title, bullets and description joined
    images: tuple[str, ...]  # absolute image paths; empty for a text-only product
    category: str  # product type, e.g. "mug"
    attribute: str  # queried attribute, e.g. "color"
    label: tuple[str, ...]  # weak value(s); empty only when loaded with require_label=False
    gold: tuple[str, ...] | None = None  # human gold value(s), if annotated
    source: str | None = None  # modality of the gold value: "text", "image" or None
    # how far to trust ``label``, in [0, 1] (e.g. the extractor's confidence); None: fully. Training multiplies
    # the row's generation-loss weight by it (``schemes.label_weights``)
    label_weight: float | None = None
    # a soft label: (value, probability) pairs over the attribute's values, e.g. a text extractor's class
    # probabilities for this row; None: none. Trained on with loss.soft_label_weight (the classification head)
    label_probs: tuple[tuple[str, float], ...] | None = None


@dataclass(frozen=True)
class Unparsable:
    """A raw value a reader could not parse; validation reports it instead of crashing."""

    raw: str  # the offending text (a whole line, or one cell)
    reason: str  # why it could not be parsed


@dataclass(frozen=True)
class RowError:
    """One problem found in one row of a dataset file."""

    file: str  # the dataset file as given by the caller
    row: int  # 1-based data row (JSONL: line number; CSV: header excluded; Parquet: index + 1)
    field: str  # offending column, or "json" for an unparsable JSON line
    message: str  # what is wrong, in plain words

    def __str__(self) -> str:
        return f"{self.file} row {self.row}, field '{self.field}': {self.message}"


class DataValidationError(ValueError):
    """A dataset file has invalid rows; ``errors`` lists every problem found."""

    def __init__(self, errors: list[RowError]) -> None:
        self.errors = list(errors)
        lines = [f"  {error}" for error in self.errors[:MAX_LISTED_ERRORS]]
        hidden = len(self.errors) - MAX_LISTED_ERRORS
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        rows = len({(error.file, error.row) for error in self.errors})
        header = f"dataset validation failed: {len(self.errors)} error(s) in {rows} row(s)"
        super().__init__("\n".join([header, *lines]))


@dataclass
class LoadResult:
    """Records loaded from one dataset file, plus the rows dropped by ``skip_invalid``."""

    path: str  # the dataset file as given by the caller
    records: list[Record]  # valid rows, in file order
    skipped: list[RowError] = field(default_factory=list)  # first problem of each dropped row
    warnings: list[str] = field(default_factory=list)  # e.g. fields outside the schema, which are ignored

    @property
    def n_skipped(self) -> int:
        """Number of rows dropped because they were invalid."""
        return len(self.skipped)
