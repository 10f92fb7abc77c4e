"""Synonym-normalized value strings for PV2TEA evaluation (ACL Findings 2023, §4.2).

The paper scores extractions by "synonym normalized exact string matching". This module
defines that normalization: Unicode NFKC, case folding, every character that is not a
letter, combining mark or digit (of any script) turned into a space, whitespace collapsed,
and finally a lookup in a variant -> canonical synonym map whose keys and values are
normalized the same way (so ``{"Grey": "Gray"}`` maps ``"grey!"`` to ``"gray"``).

It also splits generated multi-value answers into values and loads synonym files.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SynonymFileError",
    "canonical_synonyms",
    "load_synonyms",
    "normalize_value",
    "normalize_values",
    "normalize_with",
    "mention_position",
    "split_answer",
]

# Unicode general-category prefixes that survive normalization: letters, marks, numbers.
_KEPT_CATEGORIES = ("L", "M", "N")


class SynonymFileError(ValueError):
    """A synonym file that cannot be read as a variant -> canonical mapping."""


def _basic_normalize(value: str) -> str:
    """Case-fold, replace non-alphanumerics with spaces, collapse whitespace, strip."""
    folded = unicodedata.normalize("NFKC", value).casefold()
    chars = (ch if unicodedata.category(ch)[0] in _KEPT_CATEGORIES else " " for ch in folded)
    return " ".join("".join(chars).split())


def canonical_synonyms(synonyms: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``synonyms`` with keys and values normalized, ready for lookup.

    Raises:
        ValueError: if two variants that normalize to the same key map to different values.
    """
    canon: dict[str, str] = {}
    for variant, canonical in (synonyms or {}).items():
        key, target = _basic_normalize(variant), _basic_normalize(canonical)
        if not key:
            continue
        if canon.get(key, target) != target:
            raise ValueError(
                f"synonym variant {variant!r} normalizes to {key!r}, which is already "
                f"mapped to {canon[key]!r}; cannot also map it to {target!r}"
            )
        canon[key] = target
    return canon


def normalize_with(value: str, canon: Mapping[str, str]) -> str:
    """Normalize ``value`` and map it through a map built by :func:`canonical_synonyms`.

    Use this in loops to normalize the synonym map once instead of once per value.
    """
    normalized = _basic_normalize(value)
    return canon.get(normalized, normalized)


def normalize_value(value: str, synonyms: Mapping[str, str] | None = None) -> str:
    """Normalize one value string and map it to its canonical synonym.

    >>> normalize_value("  Navy-Blue!! ", {"navy blue": "Blue"})
    'blue'
    """
    return normalize_with(value, canonical_synonyms(synonyms))


def occurs_in(value: str, text: str) -> bool:
    """True if the normalized value occurs in the normalized text as whole words (an empty value never does)."""
    return mention_position(value, text) is not None


def mention_position(value: str, text: str) -> int | None:
    """Where the normalized value first occurs in the normalized text as whole words (a character offset into
    the normalized text), or None when it does not occur."""
    needle = normalize_value(value)
    if not needle:
        return None
    at = f" {normalize_value(text)} ".find(f" {needle} ")
    return None if at < 0 else at


def normalize_values(values: Iterable[str], synonyms: Mapping[str, str] | None = None) -> frozenset[str]:
    """Normalize several values into a set, dropping those that normalize to ``""``."""
    canon = canonical_synonyms(synonyms)
    return frozenset(v for v in (normalize_with(value, canon) for value in values) if v)


def split_answer(text: str, delimiter: str = ";") -> list[str]:
    """Split a generated multi-value answer into stripped, non-empty, de-duplicated values.

    >>> split_answer(" red; yellow ;; red ")
    ['red', 'yellow']
    """
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    parts = (part.strip() for part in text.split(delimiter))
    return list(dict.fromkeys(part for part in parts if part))


def drop_attribute_name(values: Iterable[str], attribute: str) -> list[str]:
    """The generated values without the attribute's own name: copying "Color" out of "Color: Brown" is a decoding
    slip, never a value of ``color``.

    >>> drop_attribute_name(["Brown", "color"], "color")
    ['Brown']
    """
    name = normalize_value(attribute.replace("_", " "))
    return [v for v in values if normalize_value(v) != name]


def _parse_file(path: Path) -> Any:
    """Parse ``path`` as JSON (``.json``) or YAML (anything else; YAML is a JSON superset)."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SynonymFileError(f"{path}: not valid JSON/YAML: {err}") from err


def load_synonyms(path: str | PathLike[str]) -> dict[str, str]:
    """Load a variant -> canonical synonym map from a JSON or YAML file.

    Two entry forms are accepted, and may be mixed in one file:

    * ``variant: canonical`` (string value), e.g. ``{"Grey": "gray"}``;
    * ``canonical: [variant, ...]`` (list value), e.g. ``{"gray": ["grey", "Gray"]}``.

    Returns the raw (un-normalized) variant -> canonical mapping.

    Raises:
        SynonymFileError: naming the file, if it is not a mapping of strings to strings or
            string lists, or if a variant is mapped to two different canonical values.
    """
    file = Path(path)
    data = _parse_file(file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SynonymFileError(
            f"{file}: expected a mapping of variant -> canonical or canonical -> [variants], got {type(data).__name__}"
        )
    pairs: list[tuple[str, str]] = []
    for key, entry in data.items():
        if not isinstance(key, str):
            raise SynonymFileError(f"{file}: key {key!r} is not a string (quote it)")
        if isinstance(entry, str):
            pairs.append((key, entry))
        elif isinstance(entry, list) and all(isinstance(v, str) for v in entry):
            pairs.extend((variant, key) for variant in entry)
        else:
            raise SynonymFileError(f"{file}: value of {key!r} must be a string or a list of strings, got {entry!r}")
    synonyms: dict[str, str] = {}
    for variant, canonical in pairs:
        if synonyms.get(variant, canonical) != canonical:
            raise SynonymFileError(
                f"{file}: variant {variant!r} is mapped to both {synonyms[variant]!r} and {canonical!r}"
            )
        synonyms[variant] = canonical
    try:
        canonical_synonyms(synonyms)
    except ValueError as err:
        raise SynonymFileError(f"{file}: {err}") from err
    return synonyms
