"""Label grounding: does a weak label occur in the text it was extracted from?

A text-established extractor that answers a value the product text does not contain has not read it there:
it fell back on what it learned about similar products (often the category's most frequent value). Those
are the labels the paper calls biased, wrong exactly when the value is visible only in the image.
``schemes.ungrounded_weight`` scales the sample weight of such rows (not in the paper; 1 = off).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pv2tea.data.schema import Record
from pv2tea.eval.normalize import occurs_in


def label_in_text(values: Sequence[str], text: str) -> bool:
    """True if every value occurs in the text as whole words, after normalization (case, punctuation)."""
    return bool(values) and all(occurs_in(v, text) for v in values)


def grounding_weights(records: Sequence[Record], ungrounded_weight: float) -> np.ndarray:
    """(N,) 1 for a row whose label occurs in its text, ``ungrounded_weight`` otherwise."""
    return np.array([1.0 if label_in_text(r.label, r.text) else ungrounded_weight for r in records])
