"""Turning records into model batches: text cropping, prompts, answers, image transforms.

Preprocessing lives outside the model (as in transformers): :class:`Preprocessor` is shared by
training, batch prediction and serving, and is saved with every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import timm.data
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from pv2tea.config import Config
from pv2tea.data.batch import Batch
from pv2tea.data.images import load_rgb
from pv2tea.data.products import product_key
from pv2tea.data.schema import Record
from pv2tea.eval.normalize import mention_position, normalize_value, split_answer


def crop_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` whitespace-separated words (paper: 100)."""
    return " ".join(text.split()[:max_words])


def answer_text(values: Sequence[str], delimiter: str, text: str | None = None) -> str:
    """The decoder target: the values joined by the delimiter, in a canonical order.

    Without ``text``: sorted. With it: the values the text mentions first, in the order of their first mention
    ("Available in yellow, green and white" → "yellow ; green ; white"), then the others sorted. A copying decoder
    then reads a stated list left to right instead of having to know the whole list before its first word.
    """
    unique = sorted(dict.fromkeys(v.strip() for v in values if v.strip()))
    if text is not None:
        where = {v: mention_position(v, text) for v in unique}
        unique.sort(key=lambda v: (where[v] is None, where[v] or 0))  # stable: ties and unmentioned stay sorted
    return f" {delimiter} ".join(unique)


# How much longer than the model input's aspect ratio asks an image may stay when it reaches the resize (center crop
# mode). The resize scales the shorter side to the input size and the center crop then keeps the middle, so cutting
# the longer side down to this ratio first (centred, keeping its parity so that the middle stays put) changes no pixel
# the crop keeps beyond resampling rounding, while it bounds the resize's output at (RESIZE_MARGIN + 1 / the shorter
# side) × the input's pixels. Unbounded, a 20,000 × 1 image became 2,560,000 × 128 (seconds of CPU, gigabytes of
# memory) to keep 128 × 128 of it.
RESIZE_MARGIN = 2.0


class BoundedResize:
    """An eval image transform (timm's resize, center crop, normalize) whose work is bounded by its output.

    A center-crop transform is given the image cut to at most :data:`RESIZE_MARGIN` times the input's aspect ratio;
    a squash or border transform (which never outgrows the input) gets it unchanged.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], size: tuple[int, int], crop_mode: str):
        self.transform, self.size, self.crop_mode = transform, size, crop_mode

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.crop_mode in ("", "center"):
            image = crop_to_aspect(image, self.size, RESIZE_MARGIN)
        return self.transform(image)

    def __repr__(self) -> str:
        return f"BoundedResize(margin={RESIZE_MARGIN:g}, {self.transform!r})"


def crop_to_aspect(image: Image.Image, size: tuple[int, int], margin: float) -> Image.Image:
    """``image`` cut (centred) so that it is at most ``margin`` times wider or taller than ``size`` (height, width).

    The kept length has the parity of the original so that the middle stays where it was.
    """
    width, height = image.size
    target_h, target_w = size
    max_w = max(1, math.ceil(height * margin * target_w / target_h))
    max_h = max(1, math.ceil(width * margin * target_h / target_w))
    if width > max_w:
        keep = max_w + (width - max_w) % 2
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > max_h:
        keep = max_h + (height - max_h) % 2
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def value_classes_of(values: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The (attribute, value) classes of a classification head, in its order, from an attribute → values map."""
    return [(a, v) for a in sorted(values) for v in values[a]]


class FeatureCache(Protocol):
    """Frozen backbones' outputs that :meth:`Preprocessor.collate` reads instead of pixels and tokens: in memory for
    one run (:class:`pv2tea.train.feature_cache.MemoryFeatureCache`) or in a folder on disk
    (:class:`pv2tea.cache.store.FeatureStore`). Images are looked up by path, texts by their cropped string."""

    @property
    def n_images(self) -> int:
        """The number of images cached."""
        ...

    @property
    def n_texts(self) -> int:
        """The number of texts cached."""
        ...

    def has_images(self, records: Sequence[Record], positions: int) -> bool:
        """Whether the first ``positions`` images of every record are cached."""
        ...

    def has_texts(self, texts: Sequence[str]) -> bool:
        """Whether the states of every (cropped) text are cached."""
        ...

    def image_tokens(self, paths: Sequence[str | None]) -> torch.Tensor:
        """(B, N, C) cached backbone tokens; zeros where the path is None (no image at that position)."""
        ...

    def text_states(self, texts: Sequence[str], mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) cached text states aligned with the batch's padded token mask (B, T)."""
        ...


@dataclass
class Preprocessor:
    """Turns records into a model's :class:`~pv2tea.data.batch.Batch`: text crop and tokens, question prompt, answer
    tokens or value classes, image transform.

    Saved with every model folder (``preprocess.json`` and the tokenizer files) and read back with the model by
    :func:`pv2tea.models.build.load_from_checkpoint`, so a model always sees its inputs as it was trained on them.

    Attributes:
        cfg: The run's configuration (``text``, ``fusion``, ``decoder`` and ``vision`` settings are read).
        tokenizer: The text checkpoint's tokenizer.
        data_config: timm's data config of the image backbone: input size, mean, std, interpolation, crop.
        categories: The product categories the model knows (S2's category head), in class order.
        values: Attribute -> its normalized value vocabulary (the classes of the classification head).
        multi_value: Attribute -> whether it admits several values.
        value_counts: Attribute -> normalized value -> training rows carrying it: the label prior of candidate
            ranking (``decoder.prior_correction``).
        cache: Cached frozen-backbone outputs used instead of pixels or tokens; not saved with the model.
    """

    cfg: Config
    tokenizer: PreTrainedTokenizerBase
    data_config: dict  # timm data config: input_size, mean, std, interpolation, crop
    categories: list[str]
    values: dict[str, list[str]] = field(default_factory=dict)  # attribute → value vocabulary (normalized)
    multi_value: dict[str, bool] = field(default_factory=dict)  # attribute → multi-value?
    # attribute → normalized value → training rows carrying it: the label prior π of candidate ranking
    # (decoder.prior_correction); a distilled run's mixes in its teacher's (distilled_value_counts); empty for models
    # trained before it was recorded
    value_counts: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    cache: FeatureCache | None = None  # cached frozen-backbone outputs; not saved with checkpoints

    def __post_init__(self) -> None:
        self.transform = BoundedResize(
            timm.data.create_transform(**{**self.data_config, "crop_pct": 1.0}, is_training=False),
            self.image_size,
            self.data_config.get("crop_mode") or "center",
        )
        self.category_index = {c: i for i, c in enumerate(self.categories)}
        self.attributes = sorted(self.values)
        self.attribute_index = {a: i for i, a in enumerate(self.attributes)}
        self.value_classes = value_classes_of(self.values)
        self.value_index = {c: i for i, c in enumerate(self.value_classes)}

    @property
    def value_attributes(self) -> list[int]:
        """Attribute index of every value class (for the classification head)."""
        return [self.attribute_index[a] for a, _ in self.value_classes]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image tensors."""
        _, height, width = self.data_config["input_size"]
        return int(height), int(width)

    def question(self, attribute: str, category: str) -> str:
        """The question prompt of a row (``fusion.question_template`` filled in)."""
        return self.cfg.fusion.question_template.format(attribute=attribute, category=category)

    def crop(self, text: str) -> str:
        """The product text cut to its first ``text.max_words`` words."""
        return crop_words(text, self.cfg.text.max_words)

    def tokenize_texts(self, texts: Sequence[str]):
        """Product texts (already cropped) → padded input_ids/attention_mask."""
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.cfg.text.max_tokens, return_tensors="pt"
        )

    def image_tensor(self, record: Record, position: int = 0) -> torch.Tensor | None:
        """The transformed image (3, H, W) at ``position`` of a record's images; None without one or without vision.

        Raises:
            pv2tea.data.images.ImageLoadError: The image file cannot be read.
        """
        if not self.cfg.vision.enabled or len(record.images) <= position:
            return None
        return self.transform(load_rgb(record.images[position]))

    def collate(
        self, records: Sequence[Record], pair_ids: Sequence[int], indices: Sequence[int], with_answers: bool
    ) -> Batch:
        """The batch of ``records``.

        Args:
            records: The rows, in batch order.
            pair_ids: Per row, the id its product shares with the product's other rows (S1's positives).
            indices: Per row, its index in the dataset (the key of cached features and S3 weights).
            with_answers: Tokenize the labels as answers (training) or not (inference).

        Returns:
            The batch; images are loaded from disk unless the cache holds their backbone states.
        """
        tok = self.tokenizer
        cropped = [self.crop(r.text) for r in records]
        texts = self.tokenize_texts(cropped)
        questions = tok(
            [self.question(r.attribute, r.category) for r in records],
            padding=True,
            truncation=True,
            max_length=self.cfg.fusion.max_question_tokens,
            return_tensors="pt",
        )
        extra = self.cfg.vision.max_images - 1
        vision = self.cfg.vision.enabled
        cache = self.cache
        # where the cache holds every row's images, their backbone tokens are read from it instead of the pixels
        image_cache = cache if vision and cache is not None and cache.has_images(records, extra + 1) else None
        if image_cache is not None:
            images, has_image = None, torch.tensor([len(r.images) > 0 for r in records])
        else:
            tensors = [self.image_tensor(r) for r in records]
            h, w = self.image_size
            images = torch.stack([t if t is not None else torch.zeros(3, h, w) for t in tensors])  # (B, 3, H, W)
            has_image = torch.tensor([t is not None for t in tensors])
        batch = Batch(
            images=images,
            has_image=has_image,
            text_ids=texts["input_ids"],
            text_mask=texts["attention_mask"],
            question_ids=questions["input_ids"],
            question_mask=questions["attention_mask"],
            category=torch.tensor([self.category_index.get(r.category, -1) for r in records]),
            pair_id=torch.tensor(list(pair_ids)),
            index=torch.tensor(list(indices)),
            multi_value=torch.tensor([self.multi_value.get(r.attribute, False) for r in records]),
        )
        if cache is not None and cache.has_texts(cropped):
            batch.text_hidden = cache.text_states(cropped, batch.text_mask)
        if image_cache is not None:
            batch.image_feats = image_cache.image_tokens([r.images[0] if r.images else None for r in records])
            if extra > 0 and any(len(r.images) > 1 for r in records):
                batch.extra_mask = torch.tensor([[len(r.images) > k for k in range(1, extra + 1)] for r in records])
                batch.extra_feats = torch.stack(
                    [
                        image_cache.image_tokens(
                            [r.images[k] if len(r.images) > k else None for k in range(1, extra + 1)]
                        )
                        for r in records
                    ]
                )  # (B, K-1, N, C)
        elif extra > 0 and vision and any(len(r.images) > 1 for r in records):
            slots = [[self.image_tensor(r, k) for k in range(1, extra + 1)] for r in records]
            batch.extra_mask = torch.tensor([[t is not None for t in row] for row in slots])  # (B, K-1)
            batch.extra_images = torch.stack(
                [torch.stack([t if t is not None else torch.zeros(3, h, w) for t in row]) for row in slots]
            )  # (B, K-1, 3, H, W)
        if self.values:
            batch.attribute_id = torch.tensor([self.attribute_index.get(r.attribute, -1) for r in records])
        if with_answers and self.values:
            batch.value_targets = torch.stack(
                [self.value_target(r, self.cfg.loss.soft_label_weight) for r in records]
            )  # (B, V)
        if with_answers:
            order = self.cfg.decoder.value_order == "text"
            answers = tok(
                [answer_text(r.label, self.cfg.decoder.value_delimiter, r.text if order else None) for r in records],
                padding=True,
                truncation=True,
                max_length=self.cfg.decoder.max_answer_tokens,
                return_tensors="pt",
            )
            batch.answer_ids, batch.answer_mask = answers["input_ids"], answers["attention_mask"]
        return batch

    def value_target(self, record: Record, soft_weight: float = 0.0) -> torch.Tensor:
        """A row's (V,) target over the value classes: its label's values (multi-hot), or with ``soft_weight`` = β
        and a soft label (``Record.label_probs``) the distribution (1 − β)·label/|label| + β·soft label (the soft
        label renormalized over the classes the run has)."""
        target = torch.zeros(len(self.value_classes))
        for v in record.label:
            j = self.value_index.get((record.attribute, normalize_value(v)))
            if j is not None:
                target[j] = 1.0
        if soft_weight <= 0 or not record.label_probs:
            return target
        known = soft_label_over(record, lambda v: (record.attribute, v) in self.value_index)
        soft = torch.zeros_like(target)
        for v, p in known.items():
            soft[self.value_index[(record.attribute, v)]] = p
        if soft.sum() <= 0:
            return target
        hard = target / target.sum().clamp_min(1)
        return (1 - soft_weight) * hard + soft_weight * soft / soft.sum()

    def decode_answers(self, ids: torch.Tensor) -> list[list[str]]:
        """Generated ids → list of values per row (split on the delimiter)."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [split_answer(t, self.cfg.decoder.value_delimiter) for t in texts]


def value_vocabulary(records: Sequence[Record]) -> dict[str, list[str]]:
    """attribute → sorted normalized training values."""
    vocab: dict[str, set[str]] = {}
    for r in records:
        vocab.setdefault(r.attribute, set()).update(normalize_value(v) for v in r.label)
    return {a: sorted(v - {""}) for a, v in sorted(vocab.items())}


def soft_label_over(record: Record, known: Callable[[str], bool]) -> dict[str, float]:
    """A row's soft label (``Record.label_probs``) summed per normalized value, kept to the values ``known`` accepts."""
    out: dict[str, float] = {}
    for v, p in record.label_probs or ():
        key = normalize_value(v)
        if known(key):
            out[key] = out.get(key, 0.0) + p
    return out


def value_counts(records: Sequence[Record], soft_weight: float = 0.0) -> dict[str, dict[str, float]]:
    """attribute → normalized training value → how many training rows carry it.

    With ``soft_weight`` = β, the prior a run is trained towards (:meth:`Preprocessor.value_target`): a row with k label
    values and a soft label (``Record.label_probs``) counts (1 − β) for each label value and β · k · p for each value
    of its soft label, p renormalized over the attribute's training values; a soft label without any of them counts
    as none (the row trains on its label alone).
    """
    known = {a: set(vs) for a, vs in value_vocabulary(records).items()} if soft_weight > 0 else {}
    counts: dict[str, dict[str, float]] = {}
    for r in records:
        per = counts.setdefault(r.attribute, {})
        label = {normalize_value(v) for v in r.label} - {""}
        soft = soft_label_over(r, known[r.attribute].__contains__) if soft_weight > 0 else {}
        total = sum(soft.values())
        share = soft_weight if total > 0 else 0.0
        for v in label:
            per[v] = per.get(v, 0) + (1 - share)
        if share:
            for v, p in soft.items():
                per[v] = per.get(v, 0) + share * len(label) * p / total
    return {a: dict(sorted(c.items())) for a, c in sorted(counts.items())}


def distilled_value_counts(
    own: Mapping[str, Mapping[str, float]], teacher: Mapping[str, Mapping[str, float]], weight: float
) -> dict[str, dict[str, float]]:
    """The label prior of a run distilled from a teacher with ``loss.distill_weight = weight``, as counts.

    Such a run learns (1 − w) · its labels + w · the teacher's distribution, and the teacher's answers follow the
    prior of *its* training labels, so the prior the run learns is the same mixture of the two priors. Per attribute,
    the two label distributions are mixed with weights 1 − w and w and expressed as counts over (1 − w) · the run's
    rows + w · the teacher's, so that w = 0 gives the run's own counts and w = 1 the teacher's exactly (the add-one
    smoothing of :func:`pv2tea.decoding.generate.label_log_prior` then acts as it does for each model alone).
    Candidate ranking divides it out (``decoder.prior_correction``). An attribute the teacher has no counts of keeps
    the run's own.
    """
    out: dict[str, dict[str, float]] = {}
    for attribute, counts in own.items():
        theirs = teacher.get(attribute) or {}
        rows, total = sum(counts.values()), sum(theirs.values())
        if not total or not rows:
            out[attribute] = {v: float(c) for v, c in counts.items()}
            continue
        scale = (1 - weight) * rows + weight * total
        out[attribute] = {
            v: scale * ((1 - weight) * counts.get(v, 0) / rows + weight * theirs.get(v, 0) / total)
            for v in sorted(set(counts) | set(theirs))
        }
    return out


def candidate_lookup(candidates: Mapping, record: Record) -> list[str] | None:
    """Candidates for a record from ``{category: {attribute: [...]}}`` or ``{attribute: [...]}``."""
    by_category = candidates.get(record.category)
    if isinstance(by_category, Mapping) and record.attribute in by_category:
        return list(by_category[record.attribute])
    value = candidates.get(record.attribute)
    return list(value) if isinstance(value, (list, tuple)) else None


class RecordDataset(Dataset):
    """Indexable records with a pair id per product (same :func:`~pv2tea.data.products.product_key`, same id)."""

    def __init__(self, records: Sequence[Record]):
        self.records = list(records)
        keys: dict[tuple, int] = {}
        self.pair_ids = [keys.setdefault(product_key(r), len(keys)) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> int:
        return i


def make_collate(pre: Preprocessor, dataset: RecordDataset, with_answers: bool):
    """Batch of dataset rows by index; ``texts`` replaces the text of some rows (index → text)."""

    def collate(indices: list[int], texts: Mapping[int, str] | None = None) -> Batch:
        texts = texts or {}
        records = [replace(dataset.records[i], text=texts[i]) if i in texts else dataset.records[i] for i in indices]
        return pre.collate(records, [dataset.pair_ids[i] for i in indices], indices, with_answers)

    return collate
