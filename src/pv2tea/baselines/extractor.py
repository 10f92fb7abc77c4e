"""The interface every text-only extractor shares, and what is done with one: weak labels and evaluation.

PV2TEA (ACL Findings 2023, §1, §2.2) assumes a catalog already runs a text-only extractor, trained on the
human/seller labels of a text-only training set, and takes its predictions as the weak labels of the multimodal
model. :class:`TextExtractor` (``fit`` on ``Record.label``, ``predict``, ``save``, ``load``) has two kinds:
:class:`~pv2tea.baselines.transformer.TransformerTextExtractor` (OpenTag_cls, paper §4.3) and
:class:`~pv2tea.baselines.tfidf.TfidfTextExtractor` (a fast classical anchor).

Decoding: single-value prediction is the most probable class; multi-value prediction is every value whose
(sigmoid / one-vs-rest) probability exceeds ``threshold`` (0.5), and at least the top one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pv2tea.baselines.labels import AttributeVocab, build_label_space
from pv2tea.baselines.storage import write_metadata
from pv2tea.data.dataset import crop_words
from pv2tea.data.schema import Record
from pv2tea.eval.metrics import Example, source_aware_report

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


@dataclass(frozen=True)
class ExtractorConfig:
    """Settings shared by every text extractor.

    Attributes:
        max_words: the text is cropped to its first ``max_words`` whitespace-separated words.
        threshold: a multi-value attribute predicts every value with probability above it.
        multi_value_attributes: attributes predicted as sets; None infers them from the
            training labels (multi-value iff a record carries several distinct values).
    """

    max_words: int = 100
    threshold: float = 0.5
    multi_value_attributes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def _check_attributes(space: Mapping[str, AttributeVocab], records: Iterable[Record]) -> None:
    """Raise a ValueError naming every attribute of ``records`` unseen in training."""
    unknown = sorted({record.attribute for record in records} - set(space))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise ValueError(f"attribute {names} was not seen in training; this extractor knows {sorted(space)}")


def _select(probabilities: np.ndarray, multi_value: bool, threshold: float) -> list[int]:
    """Chosen class indices, most probable first: the top one, plus (multi-value) all above threshold."""
    order = np.argsort(-probabilities, kind="stable")
    if not multi_value:
        return [int(order[0])]
    return [int(order[0])] + [int(k) for k in order[1:] if probabilities[k] > threshold]


def group_by_attribute(records: Sequence[Record]) -> dict[str, list[int]]:
    """Positions of the records of each attribute, in first-appearance order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        groups[record.attribute].append(position)
    return groups


class TextExtractor(ABC):
    """A text-only attribute value extractor trained on ``Record.label``.

    Subclasses implement ``_fit`` (train on records with a built label space),
    ``_probabilities`` (class probabilities of records of one attribute), ``save`` and
    ``load``; fitting, decoding and the unknown-attribute check live here.
    """

    kind: ClassVar[str]
    config: ExtractorConfig

    def __init__(self, config: ExtractorConfig) -> None:
        self.config = config
        self.vocabularies: dict[str, AttributeVocab] = {}  # empty until fit / load

    def fit(self, records: Sequence[Record]) -> Self:
        """Train on ``records`` with their ``label`` as targets; returns ``self``."""
        records = list(records)
        if not records:
            raise ValueError("cannot fit a text extractor on zero records")
        space = build_label_space(records, self.config.multi_value_attributes)
        self._fit(records, space)
        self.vocabularies = space
        return self

    def predict(self, records: Sequence[Record]) -> list[list[str]]:
        """Predicted values of each record (training spellings), never empty.

        Raises:
            ValueError: naming any attribute not seen in training.
            RuntimeError: if the extractor is neither fitted nor loaded.
        """
        return [values for values, _ in self.predict_with_confidence(records)]

    def predict_with_confidence(self, records: Sequence[Record]) -> list[tuple[list[str], float]]:
        """:meth:`predict`'s values of each record with the extractor's confidence in them: the probability of
        the chosen value (multi-value: the least probable chosen value, as all of them must be right).

        Raises:
            ValueError: naming any attribute not seen in training.
            RuntimeError: if the extractor is neither fitted nor loaded.
        """
        records = list(records)
        self._require_fitted()
        _check_attributes(self.vocabularies, records)
        predictions: list[tuple[list[str], float]] = [([], 0.0) for _ in records]
        for attribute, positions in group_by_attribute(records).items():
            vocab = self.vocabularies[attribute]
            probabilities = self._probabilities([records[i] for i in positions], vocab)
            for position, row in zip(positions, probabilities):
                chosen = _select(row, vocab.multi_value, self.config.threshold)
                predictions[position] = ([vocab.surfaces[k] for k in chosen], float(min(row[k] for k in chosen)))
        return predictions

    def value_probabilities(self, records: Sequence[Record]) -> list[dict[str, float]]:
        """Each record's class probabilities, keyed by normalized value (the prior of late fusion,
        :mod:`pv2tea.decoding.fusion`). Single-value attributes sum to 1; a multi-value attribute gives
        each value its own probability.

        Raises:
            ValueError: naming any attribute not seen in training.
        """
        records = list(records)
        self._require_fitted()
        _check_attributes(self.vocabularies, records)
        out: list[dict[str, float]] = [{} for _ in records]
        for attribute, positions in group_by_attribute(records).items():
            vocab = self.vocabularies[attribute]
            probabilities = self._probabilities([records[i] for i in positions], vocab)  # (n, classes)
            for position, row in zip(positions, probabilities):
                out[position] = {key: float(p) for key, p in zip(vocab.keys, row)}
        return out

    def _texts(self, records: Iterable[Record]) -> list[str]:
        return [crop_words(record.text, self.config.max_words) for record in records]

    def _require_fitted(self) -> None:
        if not self.vocabularies:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load() first")

    def _write_metadata(self, root: Path, **extra: Any) -> None:
        """Write ``extractor.json`` (last, so that a folder with it is complete)."""
        write_metadata(root, self.kind, self.config, self.vocabularies, **extra)

    @abstractmethod
    def _fit(self, records: list[Record], space: dict[str, AttributeVocab]) -> None:
        """Train the model for the value classes of ``space``."""

    @abstractmethod
    def _probabilities(self, records: list[Record], vocab: AttributeVocab) -> np.ndarray:
        """``(len(records), len(vocab.keys))`` class probabilities of records of ``vocab.name``."""

    @abstractmethod
    def save(self, directory: str | PathLike[str]) -> Path:
        """Write the fitted extractor to ``directory`` (created); returns it."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | PathLike[str]) -> Self:
        """Rebuild an extractor written by :meth:`save`."""


def weak_label(extractor: TextExtractor, records: Sequence[Record]) -> list[Record]:
    """Copies of ``records`` whose ``label`` is the extractor's prediction and ``label_weight`` its confidence
    in it (:meth:`TextExtractor.predict_with_confidence`, rounded to 4 decimals); all else kept."""
    records = list(records)
    return [
        replace(record, label=tuple(values), label_weight=round(confidence, 4))
        for record, (values, confidence) in zip(records, extractor.predict_with_confidence(records))
    ]


def soft_labelled(
    make: Callable[[], TextExtractor], records: Sequence[Record], folds: Sequence[Sequence[int]]
) -> list[Record]:
    """Copies of ``records`` whose ``label_probs`` are an extractor's class probabilities, out of fold: each fold's
    rows scored by an extractor (``make()``) fitted on the other folds (cross-fitting; an extractor scoring its own
    training rows gives almost their labels back). A value class missing from the other folds gets no probability.

    Raises:
        ValueError: if ``folds`` is not a partition of the rows, or a fold holds all of them.
    """
    records = list(records)
    seen = sorted(i for fold in folds for i in fold)
    if seen != list(range(len(records))):
        raise ValueError(f"soft_labelled: the folds must hold each of the {len(records)} rows exactly once")
    out = list(records)
    for fold in folds:
        held = set(fold)
        if len(held) == len(records):
            raise ValueError("soft_labelled: a fold holds every row, leaving none to fit on")
        if not held:
            continue
        fitted = make().fit([r for i, r in enumerate(records) if i not in held])
        rows = [i for i in sorted(held) if records[i].attribute in fitted.vocabularies]
        for i, probs in zip(rows, fitted.value_probabilities([records[i] for i in rows])):
            out[i] = replace(records[i], label_probs=tuple((v, round(p, 6)) for v, p in probs.items()))
    return out


def evaluate_extractor(
    extractor: TextExtractor,
    records: Sequence[Record],
    multi_value: Mapping[str, bool],
    synonyms: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Source-aware report (:func:`pv2tea.eval.metrics.source_aware_report`) of the
    extractor's predictions against ``gold``; records without gold are not scored.

    Raises:
        ValueError: if no record has gold values, or ``multi_value`` lacks a scored attribute.
    """
    scored = [record for record in records if record.gold]
    if not scored:
        raise ValueError("no record has gold values to evaluate against")
    missing = sorted({record.attribute for record in scored} - set(multi_value))
    if missing:
        raise ValueError(f"multi_value has no entry for attribute(s) {missing}")
    examples = [
        Example(
            gold=record.gold or (),  # every scored record has gold
            pred=tuple(values),
            source=record.source,
            attribute=record.attribute,
            multi_value=multi_value[record.attribute],
        )
        for record, values in zip(scored, extractor.predict(scored))
    ]
    return source_aware_report(examples, synonyms)
