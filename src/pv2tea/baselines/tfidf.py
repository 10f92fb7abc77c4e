"""A TF-IDF + logistic-regression text extractor: the fast classical anchor.

TF-IDF over word 1-2-grams and char_wb 3-5-grams (sublinear tf; one vectorizer pair shared by all attributes) and,
per attribute, a multinomial logistic regression (single-value) or one binary logistic regression per value
(multi-value, one-vs-rest). Saved as JSON (vocabularies, config) + ``.npz`` (idf, coefficients, intercepts, classes;
read with ``allow_pickle=False``); the scikit-learn objects are rebuilt on load (:mod:`pv2tea.baselines.storage`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from pv2tea.baselines.extractor import ExtractorConfig, TextExtractor, group_by_attribute
from pv2tea.baselines.labels import AttributeVocab
from pv2tea.baselines.storage import config_from_json, read_metadata, space_from_meta
from pv2tea.data.schema import Record

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

_TFIDF_ARRAYS = "tfidf.npz"
_TFIDF_VOCABULARY = "vocabulary.json"


@dataclass(frozen=True)
class TfidfExtractorConfig(ExtractorConfig):
    """TF-IDF + logistic-regression extractor.

    Attributes:
        word_ngrams: n-gram range of the word vectorizer.
        char_ngrams: n-gram range of the char_wb vectorizer.
        min_df: minimum document frequency of a kept n-gram.
        C: inverse L2 regularization strength of the logistic regressions.
        max_iter: lbfgs iteration limit.
    """

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    min_df: int = 1
    C: float = 10.0
    max_iter: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("word_ngrams", "char_ngrams"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must satisfy 1 <= low <= high, got {(low, high)}")
        if self.min_df < 1:
            raise ValueError(f"min_df must be >= 1, got {self.min_df}")
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")


# Per attribute: single-value -> [one multinomial model]; multi-value -> one binary model per
# value. None stands for a constant probability 1 (a single-value attribute with one class,
# or a value every training record of a multi-value attribute carries).
_AttributeModels = list[LogisticRegression | None]


def _vectorizers(config: TfidfExtractorConfig) -> tuple[TfidfVectorizer, TfidfVectorizer]:
    """Unfitted word and char_wb TF-IDF vectorizers (sublinear tf)."""
    common: dict[str, Any] = {"sublinear_tf": True, "min_df": config.min_df, "dtype": np.float64}
    return (
        TfidfVectorizer(analyzer="word", ngram_range=config.word_ngrams, **common),
        TfidfVectorizer(analyzer="char_wb", ngram_range=config.char_ngrams, **common),
    )


def _features(vectorizers: Sequence[TfidfVectorizer], texts: list[str]) -> sp.csr_matrix:
    return sp.hstack([vectorizer.transform(texts) for vectorizer in vectorizers], format="csr")


def _logistic(config: TfidfExtractorConfig) -> LogisticRegression:
    return LogisticRegression(C=config.C, max_iter=config.max_iter)


def _fit_attribute(
    features: sp.csr_matrix, targets: list[list[int]], vocab: AttributeVocab, config: TfidfExtractorConfig
) -> _AttributeModels:
    if not vocab.multi_value:
        if len(vocab.keys) == 1:
            return [None]
        return [_logistic(config).fit(features, np.array([classes[0] for classes in targets]))]
    models: _AttributeModels = []
    for k in range(len(vocab.keys)):
        positive = np.array([k in classes for classes in targets], dtype=np.int64)
        models.append(None if positive.all() else _logistic(config).fit(features, positive))
    return models


def _rebuild_logistic(
    config: TfidfExtractorConfig, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray
) -> LogisticRegression:
    """A fitted LogisticRegression from stored parameters."""
    model = _logistic(config)
    model.coef_, model.intercept_, model.classes_ = coef, intercept, classes
    model.n_features_in_ = coef.shape[1]
    return model


class TfidfTextExtractor(TextExtractor):
    """TF-IDF (word 1-2-grams + char_wb 3-5-grams) + logistic regression per attribute."""

    kind: ClassVar[str] = "tfidf"
    config: TfidfExtractorConfig

    def __init__(self, config: TfidfExtractorConfig | None = None) -> None:
        super().__init__(config or TfidfExtractorConfig())
        self._vectorizers: tuple[TfidfVectorizer, TfidfVectorizer] | None = None
        self._models: dict[str, _AttributeModels] = {}

    def _fit(self, records: list[Record], space: dict[str, AttributeVocab]) -> None:
        texts = self._texts(records)
        vectorizers = _vectorizers(self.config)
        documents = list(dict.fromkeys(texts))  # a product's text counts once for idf
        for vectorizer in vectorizers:
            vectorizer.fit(documents)
        features = _features(vectorizers, texts)
        groups = group_by_attribute(records)
        self._models = {
            name: _fit_attribute(
                features[groups[name]], [vocab.targets(records[i].label) for i in groups[name]], vocab, self.config
            )
            for name, vocab in space.items()
        }
        self._vectorizers = vectorizers

    def _probabilities(self, records: list[Record], vocab: AttributeVocab) -> np.ndarray:
        self._require_fitted()
        assert self._vectorizers is not None
        features = _features(self._vectorizers, self._texts(records))
        ones = np.ones(features.shape[0])
        models = self._models[vocab.name]
        if not vocab.multi_value:
            return ones[:, None] if models[0] is None else models[0].predict_proba(features)
        return np.column_stack([ones if m is None else m.predict_proba(features)[:, 1] for m in models])

    def save(self, directory: str | PathLike[str]) -> Path:
        """Write the fitted extractor to ``directory`` (created), ``extractor.json`` last; returns the folder."""
        self._require_fitted()
        assert self._vectorizers is not None
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        word, char = self._vectorizers
        arrays: dict[str, Any] = {"idf_word": word.idf_, "idf_char": char.idf_}
        constant: dict[str, list[bool]] = {}
        for a, name in enumerate(self.vocabularies):
            constant[name] = [model is None for model in self._models[name]]
            for k, model in enumerate(self._models[name]):
                if model is not None:
                    arrays[f"coef_{a}_{k}"] = model.coef_
                    arrays[f"intercept_{a}_{k}"] = model.intercept_
                    arrays[f"classes_{a}_{k}"] = model.classes_
        np.savez(root / _TFIDF_ARRAYS, **arrays)
        terms = {
            "word": sorted(word.vocabulary_, key=word.vocabulary_.__getitem__),
            "char": sorted(char.vocabulary_, key=char.vocabulary_.__getitem__),
        }
        (root / _TFIDF_VOCABULARY).write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8")
        self._write_metadata(root, constant=constant)
        return root

    @classmethod
    def load(cls, directory: str | PathLike[str]) -> Self:
        """Rebuild a TF-IDF extractor written by :meth:`save` (any kind: :func:`~pv2tea.baselines.load_extractor`)."""
        root = Path(directory)
        meta = read_metadata(root, cls.kind)
        extractor = cls(config_from_json(TfidfExtractorConfig, meta["config"]))
        space = space_from_meta(meta)
        terms = json.loads((root / _TFIDF_VOCABULARY).read_text(encoding="utf-8"))
        with np.load(root / _TFIDF_ARRAYS, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        vectorizers = _vectorizers(extractor.config)
        for vectorizer, part in zip(vectorizers, ("word", "char")):
            vectorizer.vocabulary_ = {term: i for i, term in enumerate(terms[part])}
            vectorizer.idf_ = arrays[f"idf_{part}"]
        extractor._models = {
            name: [
                None
                if is_constant
                else _rebuild_logistic(
                    extractor.config, arrays[f"coef_{a}_{k}"], arrays[f"intercept_{a}_{k}"], arrays[f"classes_{a}_{k}"]
                )
                for k, is_constant in enumerate(meta["constant"][name])
            ]
            for a, name in enumerate(space)
        }
        extractor._vectorizers = vectorizers
        extractor.vocabularies = space
        return extractor
