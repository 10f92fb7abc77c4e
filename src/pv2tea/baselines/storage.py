"""The saved-folder format of a text extractor: ``extractor.json`` (kind, format version, config, value classes)
next to each kind's own files; nothing is pickled.

The transformer kind (:mod:`pv2tea.baselines.transformer`) adds JSON + safetensors + tokenizer files, the TF-IDF kind
(:mod:`pv2tea.baselines.tfidf`) JSON vocabularies and an ``.npz`` read with ``allow_pickle=False``.
:func:`pv2tea.baselines.kinds.load_extractor` picks the class by the ``kind`` in ``extractor.json``.

This module sits below the extractor interface and its kinds (they import it, it imports none of them), so it
knows a config only as a dataclass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pv2tea.baselines.labels import AttributeVocab

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: File holding an extractor's kind, config and value vocabularies.
METADATA_FILE = "extractor.json"
#: Version of the saved-folder layout; bumped on incompatible changes.
FORMAT_VERSION = 1

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def config_from_json(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Rebuild a config saved with ``asdict`` (JSON lists become tuples again)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"saved {cls.__name__} has unknown fields {unknown}")
    values: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    return cls(**values)


def read_metadata(directory: str | PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """The ``extractor.json`` of a saved extractor, checked for format (and ``kind`` if given)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved text extractor: {METADATA_FILE} is missing")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})"
        )
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: holds a {meta.get('kind')!r} extractor, not {kind!r}")
    return meta


def write_metadata(
    root: Path, kind: str, config: DataclassInstance, vocabularies: Mapping[str, AttributeVocab], **extra: Any
) -> None:
    """Write ``extractor.json`` (last, so that a folder with it is complete)."""
    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "attributes": [vocab.to_json() for vocab in vocabularies.values()],
        **extra,
    }
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def space_from_meta(meta: Mapping[str, Any]) -> dict[str, AttributeVocab]:
    """The value classes saved in ``extractor.json``, keyed by attribute."""
    vocabs = [AttributeVocab.from_json(item) for item in meta["attributes"]]
    return {vocab.name: vocab for vocab in vocabs}
