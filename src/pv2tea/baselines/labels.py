"""The value classes of a text extractor: per attribute, the normalized values seen in training.

Label strings are grouped by :func:`pv2tea.eval.normalize.normalize_value` (so "Red" and "red" are one class) and
predicted in their most frequent original spelling. An attribute is multi-value if the config lists it or, by
default, if some training record labels it with several distinct values; a single-value attribute trains on each
record's first label only.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pv2tea.data.schema import Record
from pv2tea.eval.normalize import normalize_value


@dataclass(frozen=True)
class AttributeVocab:
    """The value classes of one attribute; a class index is a position in ``keys``."""

    name: str
    keys: tuple[str, ...]  # normalized values, sorted
    surfaces: tuple[str, ...]  # most frequent original spelling of each key
    multi_value: bool

    def targets(self, labels: Iterable[str]) -> list[int]:
        """Class indices of the known ``labels``, without repeats (single-value: the first)."""
        index = {key: i for i, key in enumerate(self.keys)}
        found = dict.fromkeys(index[key] for key in map(normalize_value, labels) if key in index)
        return list(found) if self.multi_value else list(found)[:1]

    def to_json(self) -> dict[str, Any]:
        """The vocabulary as saved in ``extractor.json``."""
        return {
            "name": self.name,
            "keys": list(self.keys),
            "surfaces": list(self.surfaces),
            "multi_value": self.multi_value,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttributeVocab:
        """The vocabulary saved by :meth:`to_json`."""
        return cls(data["name"], tuple(data["keys"]), tuple(data["surfaces"]), bool(data["multi_value"]))


def _label_pairs(record: Record) -> list[tuple[str, str]]:
    """(normalized key, stripped original) of each distinct label value, in label order."""
    pairs: dict[str, str] = {}
    for value in record.label:
        key = normalize_value(value)
        if key:
            pairs.setdefault(key, value.strip())
    if not pairs:
        raise ValueError(f"record {record.id!r} (attribute {record.attribute!r}) has no usable label: {record.label!r}")
    return list(pairs.items())


def build_label_space(
    records: Iterable[Record], multi_value_attributes: Collection[str] | None = None
) -> dict[str, AttributeVocab]:
    """The value vocabulary of every attribute of ``records``, keyed (and ordered) by name.

    ``multi_value_attributes=None`` makes an attribute multi-value iff some record labels it
    with several distinct normalized values. A single-value attribute only counts each
    record's first label. Ties between spellings go to the one seen first.

    Raises:
        ValueError: if a record has no label value that normalizes to a non-empty string.
    """
    rows: dict[str, list[list[tuple[str, str]]]] = defaultdict(list)
    for record in records:
        rows[record.attribute].append(_label_pairs(record))
    space: dict[str, AttributeVocab] = {}
    for name in sorted(rows):
        if multi_value_attributes is None:
            multi = any(len(pairs) > 1 for pairs in rows[name])
        else:
            multi = name in multi_value_attributes
        spellings: dict[str, Counter[str]] = defaultdict(Counter)
        for pairs in rows[name]:
            for key, surface in pairs if multi else pairs[:1]:
                spellings[key][surface] += 1
        keys = tuple(sorted(spellings))
        surfaces = tuple(spellings[key].most_common(1)[0][0] for key in keys)
        space[name] = AttributeVocab(name, keys, surfaces, multi)
    return space
