"""Label grounding: does a weak label occur in the text it was extracted from?

A text-established extractor that answers a value the product text does not contain has not read it there:
it fell back on what it learned about similar products (often the category's most frequent value). Those
are the labels the paper calls biased, wrong exactly when the value is visible only in the image.
``schemes.ungrounded_weight`` scales the sample weight of such rows (not in the paper; 1 = off).

A grounded label is the reliable kind, and its product looks, once the value's words are taken out of the
text, like a product whose value only the image shows. ``schemes.mention_dropout`` trains on such copies
(:func:`remove_mentions`), so the model learns to answer from the image when the text does not say it,
from labels that are right (not in the paper; 0 = off).

At inference the same test decides where a catalog's existing labels can be trusted: :func:`keep_grounded` keeps
a label its text states and lets the model answer the rest (``pv2tea predict --keep-grounded``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from pv2tea.data.schema import Record
from pv2tea.eval.normalize import normalize_value, occurs_in


def label_in_text(values: Sequence[str], text: str) -> bool:
    """True if every value occurs in the text as whole words, after normalization (case, punctuation)."""
    return bool(values) and all(occurs_in(v, text) for v in values)


def grounding_weights(records: Sequence[Record], ungrounded_weight: float) -> np.ndarray:
    """(N,) 1 for a row whose label occurs in its text, ``ungrounded_weight`` otherwise."""
    return np.array([1.0 if label_in_text(r.label, r.text) else ungrounded_weight for r in records])


def _mention_pattern(value: str) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive occurrences of a value in raw text, any non-word characters between its
    words (as :func:`occurs_in` sees them after normalization: "Navy-Blue" is a mention of "navy blue")."""
    words = normalize_value(value).split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"[\W_]+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def remove_mentions(text: str, values: Sequence[str]) -> str:
    """The text with every whole-word mention of the values deleted and the runs of spaces left behind collapsed.

    >>> remove_mentions("Color: Navy-Blue and white. A navy blue mug", ["navy blue", "white"])
    'Color: and . A mug'
    """
    for value in sorted(values, key=len, reverse=True):  # longest first: "navy blue" before "blue"
        pattern = _mention_pattern(value)
        if pattern is not None:
            text = pattern.sub("", text)
    return re.sub(r"[ \t]+(\n|$)", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()


def mention_free_texts(records: Sequence[Record]) -> list[str | None]:
    """Per row, its text without the mentions of its label (:func:`remove_mentions`) when the row has an image
    and its label occurs in its text; None otherwise (nothing to take out, or no image to answer from)."""
    return [remove_mentions(r.text, r.label) if r.images and label_in_text(r.label, r.text) else None
            for r in records]


def keep_grounded(records: Sequence[Record], predictions: Sequence[Sequence[str]],
                  kept: Sequence[bool] | None = None) -> list[list[str]]:
    """Per row, its existing label when the label occurs in its text (the extractor read it there), else the
    model's prediction: the model corrects only the labels the text does not support.

    ``kept``: the rows' :func:`label_in_text` flags when the caller already has them.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} rows")
    if kept is None:
        kept = [label_in_text(r.label, r.text) for r in records]
    return [list(r.label) if k else list(p) for r, p, k in zip(records, predictions, kept)]
