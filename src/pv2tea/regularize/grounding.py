"""Label grounding: does a weak label occur in the text it was extracted from?

A text-established extractor that answers a value the product text does not contain has not read it there:
it fell back on what it learned about similar products (often the category's most frequent value). Those
are the labels the paper calls biased, wrong exactly when the value is visible only in the image.
``schemes.ungrounded_weight`` scales the sample weight of such rows (not in the paper; 1 = off).

A grounded label is the reliable kind, and its product looks, once the value's words are taken out of the
text, like a product whose value only the image shows. ``schemes.mention_dropout`` trains on such copies
(:func:`remove_mentions`), so the model learns to answer from the image when the text does not say it,
from labels that are right (not in the paper; 0 = off).

At inference the same test decides where a catalog's existing labels can be trusted: :func:`keep_labels` keeps
a label its text states and lets the model answer the rest (kept labels, ``pv2tea predict --keep-labels``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from pv2tea.config import MENTION_REMOVALS
from pv2tea.data.schema import Record
from pv2tea.eval.normalize import normalize_value, occurs_in
from pv2tea.renamed import warn_renamed


def label_in_text(values: Sequence[str], text: str) -> bool:
    """True if every value occurs in the text as whole words, after normalization (case, punctuation)."""
    return bool(values) and all(occurs_in(v, text) for v in values)


def grounding_weights(records: Sequence[Record], ungrounded_weight: float) -> np.ndarray:
    """(N,) 1 for a row whose label occurs in its text, ``ungrounded_weight`` otherwise."""
    return np.array([1.0 if label_in_text(r.label, r.text) else ungrounded_weight for r in records])


def label_weights(records: Sequence[Record]) -> np.ndarray | None:
    """(N,) each row's ``label_weight`` relative to the other weighted rows of its attribute (rescaled to mean 1
    over them), 1 where it has none; None when no row has one.

    An extractor's confidence is lower for an attribute with many values than for one with two, so raw
    confidences would also move whole attributes against each other; within an attribute they only order
    its rows. An attribute whose weighted rows are all 0 keeps its zeros."""
    if all(r.label_weight is None for r in records):
        return None
    out = np.ones(len(records))
    for attribute in {r.attribute for r in records}:
        rows = [i for i, r in enumerate(records) if r.attribute == attribute and r.label_weight is not None]
        if rows:
            given = np.array([records[i].label_weight for i in rows], dtype=float)
            out[rows] = given / given.mean() if given.mean() > 0 else given
    return out


def _mention_pattern(value: str) -> str | None:
    """Regex source for whole-word, case-insensitive occurrences of a value in raw text, any non-word characters
    between its words (as :func:`occurs_in` sees them after normalization: "Navy-Blue" is a mention of "navy blue")."""
    words = normalize_value(value).split()
    if not words:
        return None
    return r"(?<!\w)" + r"[\W_]+".join(map(re.escape, words)) + r"(?!\w)"


# what joins the values of a list: "A, B and C", "A/B", "A & B", "A or B"
_LIST_GLUE = r"(?:\s*[,/&+]\s*(?:(?:and|or)\s+)?|\s+(?:and|or)\s+)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]\s*)?$")


def _mentions(values: Sequence[str]) -> re.Pattern[str] | None:
    """A list of mentions of the values with the glue between them, as one match ("Yellow, Green and Pink")."""
    alternatives = [p for p in map(_mention_pattern, sorted(values, key=len, reverse=True)) if p]  # longest first
    if not alternatives:
        return None
    one = "(?:" + "|".join(alternatives) + ")"
    return re.compile(f"{one}(?:{_LIST_GLUE}{one})*", re.IGNORECASE)


def _collapse_spaces(text: str) -> str:
    """Collapse the runs of spaces a deletion leaves, and the spaces at line ends."""
    return re.sub(r"[ \t]+(\n|$)", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()


def _tidy(text: str) -> str:
    """:func:`_collapse_spaces`, and no space left before punctuation."""
    return _collapse_spaces(re.sub(r" +([,.;:!?)])", r"\1", text))


def remove_mentions(text: str, values: Sequence[str], mode: str = "words") -> str:
    r"""The text without its mentions of the values.

    ``mode="words"`` (the default) deletes the mentions and keeps everything else, list glue included.
    ``mode="sentence"`` makes the text look like one that never stated the value, not like one with a hole in it:
    a sentence or bullet line that mentions a value is dropped whole ("Color: Brown", "Available in red and
    blue."), and only in the first sentence (the title) are the words deleted. A text is never emptied: when every
    sentence mentions a value, the words are deleted instead.

    >>> remove_mentions("Color: Navy-Blue and white. A navy blue mug", ["navy blue", "white"])
    'Color: and . A mug'
    >>> remove_mentions("Navy-Blue and White Mug\n- Color: Navy Blue and white\n- 12 oz", ["navy blue", "white"],
    ...                 mode="sentence")
    'Mug\n- 12 oz'
    """
    if mode not in MENTION_REMOVALS:
        raise ValueError(f"mention removal mode must be 'sentence' or 'words', got '{mode}'")
    return _delete_words(text, values) if mode == "words" else _drop_statements(text, values)


def _delete_words(text: str, values: Sequence[str]) -> str:
    for value in sorted(values, key=len, reverse=True):  # longest first: "navy blue" before "blue"
        one = _mention_pattern(value)
        if one is not None:
            text = re.sub(one, "", text, flags=re.IGNORECASE)
    return _collapse_spaces(text)


def _drop_statements(text: str, values: Sequence[str]) -> str:
    pattern = _mentions(values)
    if pattern is None:
        return text
    lines, first = [], True
    for line in text.split("\n"):
        kept = []
        for sentence in _SENTENCE_END.split(line):
            if not sentence.strip():
                continue
            if first:  # the title: keep it, without the values
                kept.append(pattern.sub("", sentence))
                first = False
            elif not pattern.search(sentence):
                kept.append(sentence)
        joined = _tidy(" ".join(kept))
        if joined and not _BULLET.match(joined):
            lines.append(joined)
    out = "\n".join(lines)
    return out if out.strip() else _tidy(pattern.sub("", text))


def mention_free_texts(records: Sequence[Record], mode: str = "words") -> list[str | None]:
    """Per row, its text without the mentions of its label (:func:`remove_mentions`) when the row has an image
    and its label occurs in its text; None otherwise (nothing to take out, or no image to answer from)."""
    return [
        remove_mentions(r.text, r.label, mode) if r.images and label_in_text(r.label, r.text) else None for r in records
    ]


def keep_labels(
    records: Sequence[Record], predictions: Sequence[Sequence[str]], kept: Sequence[bool] | None = None
) -> list[list[str]]:
    """Per row, its existing label when the label occurs in its text (the extractor read it there), else the
    model's prediction: the model corrects only the labels the text does not support.

    ``kept``: the rows' :func:`label_in_text` flags when the caller already has them.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} rows")
    if kept is None:
        kept = [label_in_text(r.label, r.text) for r in records]
    return [list(r.label) if k else list(p) for r, p, k in zip(records, predictions, kept)]


def __getattr__(name: str) -> Any:
    """Old names of this module's functions, which still import (and warn once): ``keep_grounded``."""
    if name == "keep_grounded":
        warn_renamed("pv2tea.regularize.grounding.keep_grounded", "keep_labels")
        return keep_labels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
