"""Training PV2TEA: L = L_sc + L_ct + L_r-mlm with S3 sample weights recomputed every epoch.

A run directory holds ``config.yaml`` (resolved), ``environment.json`` (package versions, CPU),
``data_report.json`` (counted skips), ``metrics.jsonl`` (one line per epoch), ``train.log``, ``checkpoint/`` (latest state, for
``--resume``) and ``final/`` (the model for inference) with ``val_report.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pv2tea.cache.build import training_cache
from pv2tea.cache.store import FeatureCacheError
from pv2tea.config import Config
from pv2tea.data.dataset import (
    Preprocessor,
    RecordDataset,
    distilled_value_counts,
    make_collate,
    value_counts,
    value_vocabulary,
)
from pv2tea.data.schema import Record
from pv2tea.decoding.generate import generate_values
from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.eval.normalize import normalize_values
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.build import build_for_training, preprocess_state
from pv2tea.models.pv2tea import PV2TEA
from pv2tea.regularize.grounding import grounding_weights, label_weights, mention_free_texts
from pv2tea.regularize.neighbors import (
    chance_corrected,
    combine,
    expected_agreement,
    expected_prediction_agreement,
    prediction_reliability,
    rescale_to_mean_one,
    visual_reliability,
)
from pv2tea.regularize.probe import cross_fitted_probe
from pv2tea.train import distributed as ddp
from pv2tea.train.anchor import WeightAnchor
from pv2tea.train.averaging import WeightAverage
from pv2tea.train.distill import TeacherError, WarmStartTeacher
from pv2tea.train.environment import record_environment
from pv2tea.train.feature_cache import build_feature_cache

log = logging.getLogger("pv2tea.train")


class TrainingError(RuntimeError):
    """A training run that cannot start or continue, with the reason in one message."""


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, groups: Sequence[int] | None = None
) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch) so resume replays them. With ``groups``
    (a group id per position, e.g. the product), each group's positions are kept together, in their order, the
    groups ordered by where their first member falls in the shuffle: one-member groups give the shuffle itself."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if groups is not None:
        members: dict[int, list[int]] = {}
        for i in range(n):
            members.setdefault(groups[i], []).append(i)
        placed: set[int] = set()
        grouped: list[int] = []
        for i in order:
            if groups[i] not in placed:
                placed.add(groups[i])
                grouped += members[groups[i]]
        order = grouped
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def epoch_rows(records: Sequence[Record], per_epoch: int | None, seed: int, epoch: int) -> list[int]:
    """The record indices trained on in one epoch: every row with an image, plus ``per_epoch`` of the rows
    without one (all of them when None), drawn afresh each epoch as a pure function of (seed, epoch), so that a
    large text-only training set is covered over the epochs at the cost of ``per_epoch`` rows, and resume
    replays the draw."""
    image_less = [i for i, r in enumerate(records) if not r.images]
    if per_epoch is None or per_epoch >= len(image_less):
        return list(range(len(records)))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 70_000)
    drawn = {image_less[j] for j in torch.randperm(len(image_less), generator=g)[:per_epoch].tolist()}
    return [i for i, r in enumerate(records) if r.images or i in drawn]


def mention_dropout_rows(free_texts: Sequence[str | None], p: float, seed: int, epoch: int) -> dict[int, str]:
    """Rows whose text loses its label's mentions this epoch (index → mention-free text): each row that has a
    mention-free text with probability p, a pure function of (seed, epoch) so resume replays it."""
    if p <= 0:
        return {}
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_000)
    draw = torch.rand(len(free_texts), generator=g).tolist()
    return {i: t for i, (t, u) in enumerate(zip(free_texts, draw)) if t is not None and u < p}


def build_optimizer(model: PV2TEA, cfg: Config, total_steps: int):
    """AdamW (no decay on biases/norms) + cosine schedule with warmup."""
    o = cfg.optim
    init_from = cfg.train.init_from
    warm = bool(init_from) and o.warm_start_lr == "lr"
    # whether the warm start carries a classification head over (its checkpoint read once)
    has_head = bool(init_from and model.value_head is not None and ckpt.warm_start_has_head(Path(init_from)))
    # a classification head warm-started from the warm start's own trains at the warm-started parts' rate
    pretrained, new = model.parameter_groups(warm_started=warm, warm_head=warm and has_head)
    # the parts the warm start filled (its classification head too, copied whatever the rate), at their rate times
    # optim.warm_start_lr_scale
    filled = model.warm_start_parameters(warm_head=has_head) if init_from and o.warm_start_lr_scale != 1 else set()
    rates = ((pretrained, o.lr), (new, o.head_lr or o.lr))
    parts = [  # the rest first, then what the warm start filled
        ([p for p in params if (id(p) in filled) == is_filled], lr * (o.warm_start_lr_scale if is_filled else 1.0))
        for is_filled in (False, True)
        for params, lr in rates
    ]
    groups = []
    for params, lr in parts:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": o.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    # fused: one kernel over all parameters per step (on a CPU a third of the time of foreach for the cpu preset,
    # bench train); a checkpoint saved with foreach resumes with the settings it was saved with
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], fused=True)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=max(total_steps, 1), min_lr_rate=o.min_lr_ratio
    )
    return optimizer, scheduler


def label_key(record: Record, values: Sequence[str]) -> tuple[str, frozenset[str]]:
    """(attribute, normalized values): two answers with the same key say the same thing."""
    return (record.attribute, normalize_values(values))


@torch.no_grad()
def _image(pre: Preprocessor, record: Record) -> torch.Tensor:
    """The (3, H, W) first image of a record that has one."""
    image = pre.image_tensor(record)
    if image is None:
        raise ValueError(f"record {record.id!r} has no image")
    return image


def _visual_level(
    model: PV2TEA, pre: Preprocessor, records: Sequence[Record], labels: Sequence[frozenset[str]], cfg: Config
) -> tuple[np.ndarray, dict[str, float]]:
    """S3's visual level s_v (N,) per attribute, chance-corrected as ``schemes.nr_chance`` says, and log stats.

    NaN where there is no visual evidence: a row without an image, or (``schemes.nr_visual=probe``) every row of
    an attribute whose cross-fitted probe explains the labels no better than their frequencies do.
    """
    s = cfg.schemes
    n = len(records)
    was_training = model.training
    model.eval()
    s_v = np.full(n, np.nan)
    stats: dict[str, float] = {}
    with_image = [i for i, r in enumerate(records) if r.images]
    features_of = {
        "backbone": model.backbone_features,
        "masked": model.masked_backbone_features,
        "levels": model.level_features,
    }.get(s.nr_features, lambda images=None, feats=None: model.image_features(images, feats)[0])  # (B, C) or (B, H)
    feats = []
    for start in range(0, len(with_image), cfg.train.eval_batch_size):
        rows = with_image[start : start + cfg.train.eval_batch_size]
        chunk = [records[i] for i in rows]
        if pre.cache is not None and pre.cache.has_images(chunk, 1):
            feats.append(features_of(feats=pre.cache.image_tokens([r.images[0] for r in chunk])))
        else:
            feats.append(features_of(torch.stack([_image(pre, r) for r in chunk])))
    model.train(was_training)
    if with_image:
        features = torch.cat(feats)
        if s.nr_features == "aligned":
            features = model.vision_proj(features)  # (N, D) S1's image-text space
        vectors = features.numpy()  # (N, C)
        for attribute in {records[i].attribute for i in with_image}:
            idx = [k for k, i in enumerate(with_image) if records[i].attribute == attribute]
            rows = [with_image[k] for k in idx]
            row_labels = [labels[i] for i in rows]
            if s.nr_visual == "probe":
                fit = cross_fitted_probe(vectors[idx], row_labels, seed=cfg.train.seed, fit_rows=s.probe_fit_rows)
                stats[f"probe_gain_{attribute}"] = fit.gain
                if fit.gain <= 0:  # the features do not tell this attribute's labels apart: no evidence
                    continue
                s_v[rows] = fit.reliability
            else:
                s_v[rows] = visual_reliability(
                    vectors[idx],
                    row_labels,
                    s.knn_k,
                    s.nr_label_match,
                    exact_below=s.knn_exact_below,
                    index=s.knn_index,
                    recall=s.knn_recall,
                    seed=cfg.train.seed,
                )
            if s.nr_chance != "none":  # chance level: agreement with a random sample of the same category
                expected = expected_agreement(row_labels, [records[i].category for i in rows], s.nr_label_match)
                s_v[rows] = chance_corrected(s_v[rows], expected, s.nr_chance)
    return s_v, stats


def weight_groups(
    records: Sequence[Record], within: str, judged: np.ndarray | None, use_pred: bool
) -> list[tuple[bool, str | None]]:
    """The groups S3 weights are rescaled to mean 1 in: ``within`` ("all" or "attribute"), and apart from each
    other the rows S3 judged and the rows it could not (``judged``: the visual level's verdicts, None when it is
    off; with the prediction level in use every row is judged). An unjudged row has s = 1 for lack of evidence,
    not for agreeing; rescaled together with judged rows (mean s about 0.5) it would count twice as much as they
    do, and image-less text rows would outweigh the products."""
    return [
        (use_pred or judged is None or bool(judged[i]), r.attribute if within == "attribute" else None)
        for i, r in enumerate(records)
    ]


@torch.no_grad()
def sample_weights(
    model: PV2TEA,
    pre: Preprocessor,
    records: Sequence[Record],
    epoch: int,
    cfg: Config,
    progress: bool = False,
    prediction_texts: Sequence[str | None] | None = None,
    visual_cache: dict[tuple[str, ...], tuple[np.ndarray, dict[str, float]]] | None = None,
) -> tuple[np.ndarray | None, dict[str, float]]:
    """S3 weights s(X_n) for this epoch (Eq. 10–15), computed per attribute, times the rows' own trust in their
    labels (``schemes.ungrounded_weight``, ``schemes.label_weights``); None when none of these re-weights the rows.

    ``prediction_texts`` (one per record, None: its own text): the texts the prediction level predicts from.
    ``visual_cache``: a dict kept across epochs, where s_v is kept while it cannot change.
    """
    s = cfg.schemes
    use_pred = s.prediction_nr and epoch >= s.prediction_nr_start_epoch
    given = label_weights(records) if s.label_weights else None  # the data's own trust in each label
    if not s.visual_nr and not use_pred and s.ungrounded_weight == 1.0 and given is None:
        return None, {}
    n = len(records)
    labels = [label_key(r, r.label) for r in records]
    s_v: np.ndarray | None = None
    judged: np.ndarray | None = None
    stats: dict[str, Any] = {}
    if s.visual_nr and model.visual is not None:
        # with a frozen backbone, features of the backbone's own tokens and the labels are the same every epoch,
        # and so is s_v: computed once per set of rows
        key = tuple(r.id for r in records)
        fixed = cfg.vision.freeze and s.nr_features in ("backbone", "levels")
        if fixed and visual_cache is not None and key in visual_cache:
            s_v, stats = visual_cache[key]
        else:
            s_v, stats = _visual_level(model, pre, records, [lbl for _, lbl in labels], cfg)
            if fixed and visual_cache is not None:
                visual_cache[key] = (s_v, stats)
        judged = ~np.isnan(s_v)
        s_v, stats = np.where(judged, s_v, 1.0), dict(stats)  # no evidence: 1, as Eq. 12 has nothing against it
    s_p = None
    if use_pred:
        shown = (
            records
            if prediction_texts is None
            else [r if t is None else replace(r, text=t) for r, t in zip(records, prediction_texts)]
        )
        preds = generate_values(model, pre, shown, cfg.train.eval_batch_size, progress=progress, desc="S3 predictions")
        pred_keys = [label_key(r, p) for r, p in zip(records, preds)]
        s_p = np.ones(n)
        for attribute in {r.attribute for r in records}:
            rows = [i for i, r in enumerate(records) if r.attribute == attribute]
            row_labels, row_preds = [labels[i][1] for i in rows], [pred_keys[i][1] for i in rows]
            s_p[rows] = prediction_reliability(row_labels, row_preds, s.nr_label_match)
            if s.nr_chance != "none":
                s_p[rows] = chance_corrected(
                    s_p[rows], expected_prediction_agreement(row_labels, row_preds, s.nr_label_match), s.nr_chance
                )
    weights = np.array(
        combine(s_v, s_p) if s_v is not None or s_p is not None else np.ones(n), dtype=float
    )  # a copy (combine may return s_v itself)
    if s.nr_sharpness != 1.0:
        weights = weights**s.nr_sharpness
    if s.ungrounded_weight != 1.0:
        weights *= grounding_weights(records, s.ungrounded_weight)
    if given is not None:
        weights *= given
    stats["weight_mean"] = float(weights.mean())
    for source in ("text", "image"):  # does S3 down-weight the rows whose label the text could not give?
        rows = [i for i, r in enumerate(records) if r.source == source]
        if rows:
            stats[f"weight_mean_source_{source}"] = float(weights[rows].mean())
    # where training rows carry gold values too: does S3 down-weight the wrong labels?
    right = {i: labels[i][1] == normalize_values(r.gold) for i, r in enumerate(records) if r.gold}
    for name, keep in (("right", True), ("wrong", False)):
        rows = [i for i, ok in right.items() if ok == keep]
        if rows:
            stats[f"weight_mean_label_{name}"] = float(weights[rows].mean())
    if not weights.any():  # no sample agrees above chance: no evidence either way, so do not stop learning
        weights = np.ones(n)
        stats["weights_all_zero"] = 1.0
    if s.normalize_weights:
        weights = rescale_to_mean_one(weights, weight_groups(records, s.normalize_within, judged, use_pred))
    if s_v is not None:
        stats["s_v_mean"] = float(s_v.mean())
    if s_p is not None:
        stats["s_p_mean"] = float(s_p.mean())
    return weights, stats


def evaluate_records(
    model: PV2TEA,
    pre: Preprocessor,
    records: Sequence[Record],
    batch_size: int,
    multi_value: dict[str, bool],
    synonyms: dict[str, str] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[list[str]]]:
    """Generate on records and score against gold (or against the label when no gold is given)."""
    preds = generate_values(model, pre, records, batch_size, progress=progress, desc="evaluate")
    examples = [
        Example(
            gold=tuple(r.gold if r.gold else r.label),
            pred=tuple(p),
            source=r.source,
            attribute=r.attribute,
            multi_value=multi_value.get(r.attribute, False),
        )
        for r, p in zip(records, preds)
    ]
    return source_aware_report(examples, synonyms), preds


def multi_value_attributes(records: Sequence[Record]) -> dict[str, bool]:
    """An attribute is multi-value when any of its labels or gold values has several values."""
    out: dict[str, bool] = {}
    for r in records:
        several = len(r.label) > 1 or (r.gold is not None and len(r.gold) > 1)
        out[r.attribute] = out.get(r.attribute, False) or several
    return out


def _scatter(values: np.ndarray, rows: Sequence[int], n: int) -> np.ndarray:
    """A length-n array of ones holding ``values`` at ``rows``."""
    out = np.ones(n)
    out[list(rows)] = values
    return out


def _cut_metrics(path: Path, length: int) -> None:
    """Cut ``metrics.jsonl`` back to ``length`` bytes: the lines a stopped run wrote after its last checkpoint, for
    epochs that the resumed run trains (and writes) again."""
    if path.is_file() and path.stat().st_size > length:
        with open(path, "r+b") as f:
            f.truncate(length)


def _set_schedule_position(scheduler, step: int) -> None:
    """Move a LambdaLR schedule (and its optimizer's learning rates) to ``step``."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@dataclass
class TrainResult:
    """Where a training run wrote its outputs and how it scored.

    Attributes:
        run_dir: The run folder (``config.yaml``, ``metrics.jsonl``, ``train.log``, checkpoints).
        final_dir: The model folder to predict with (``run_dir/final``).
        val_report: The source-aware report of the validation rows (None without them).
        seconds: Wall-clock time of the run.
    """

    run_dir: Path
    final_dir: Path
    val_report: dict[str, Any] | None
    seconds: float


def _setup_logging(run_dir: Path, main: bool = True) -> logging.Handler:
    """The run's ``train.log`` (rank 0 writes it; the other ranks log nowhere)."""
    if not main:
        handler: logging.Handler = logging.NullHandler()
        logging.getLogger("pv2tea").addHandler(handler)
        return handler
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("pv2tea").addHandler(handler)
    logging.getLogger("pv2tea").setLevel(logging.INFO)
    return handler


def train(
    cfg: Config,
    train_records: Sequence[Record],
    run_dir: Path,
    val_records: Sequence[Record] = (),
    resume: bool = False,
    progress: bool = True,
    data_report: dict | None = None,
) -> TrainResult:
    """Train PV2TEA on validated records; resumable from ``run_dir/checkpoint``.

    Under a launcher (``torchrun``, ``accelerate launch``) every process calls this with the same arguments and
    trains its shard of each epoch (train/distributed.py); rank 0 alone writes ``run_dir``.

    Args:
        cfg: The configuration (:func:`pv2tea.config.load_config`).
        train_records: The training rows, weakly labelled (their ``label``).
        run_dir: The run folder; created.
        val_records: Rows with ``gold`` values, scored after each epoch (logged in ``metrics.jsonl``) and on the
            final model (``val_report.json``); they select nothing: the final model is the last epoch's, or the
            average of the last ``train.average_epochs``.
        resume: Continue from ``run_dir/checkpoint`` with the same config and data.
        progress: Show progress bars.
        data_report: What validation of the data found (counts, skipped rows), saved with the run.

    Returns:
        The run folder, its model folder ``final``, the validation report and the time taken.

    Raises:
        TrainingError: The run cannot start or continue (such as a resume whose config or data differ), said in
            one message.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    try:
        accelerator = ddp.make_accelerator(cfg)
    except ddp.DistributedError as err:
        raise TrainingError(str(err)) from err
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(run_dir, accelerator.is_main_process)
    try:
        return _train(
            cfg, list(train_records), run_dir, list(val_records), resume, progress, data_report, t0, accelerator
        )
    finally:
        logging.getLogger("pv2tea").removeHandler(handler)
        handler.close()


def _train(
    cfg: Config,
    records: list[Record],
    run_dir: Path,
    val_records: list[Record],
    resume: bool,
    progress: bool,
    data_report: dict | None,
    t0: float,
    accelerator,
) -> TrainResult:
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    progress = progress and main
    if not records:
        raise TrainingError("no training rows left (all rows were invalid or the file is empty)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = copy.deepcopy(cfg)
    n_products = len({(r.images, r.text) for r in records if r.images})
    cfg.schemes.queue_size = max(1, min(cfg.schemes.queue_size, n_products))  # M capped at the training set
    ckpt_dir, final_dir, metrics_path = run_dir / "checkpoint", run_dir / "final", run_dir / "metrics.jsonl"
    if resume and not ckpt.checkpoint_exists(ckpt_dir) and not final_dir.exists():
        resume = False  # stopped before its first checkpoint: nothing to continue from, so the run starts again
        log.info("no checkpoint in %s yet: the run starts again from the beginning", run_dir)
        if main:
            print(f"note: no checkpoint in {run_dir} yet: the run starts again from the beginning", file=sys.stderr)
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        record_environment(run_dir, resume, world)
        if data_report is not None:
            (run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
        if not resume:  # this run's epochs only, not those of an attempt stopped before its first checkpoint
            metrics_path.unlink(missing_ok=True)
    seed_everything(cfg.train.seed)
    categories = sorted({r.category for r in records})
    multi = multi_value_attributes(records + val_records)
    model, pre = build_for_training(
        cfg, categories, value_vocabulary(records), multi, value_counts(records, cfg.loss.soft_label_weight)
    )
    if cfg.train.init_from and not resume:
        n = ckpt.load_warm_start(model, Path(cfg.train.init_from))
        n_classes = ckpt.load_warm_start_head(model, pre.value_classes, Path(cfg.train.init_from))
        if n_classes:
            log.info(
                "warm start: the classification head's rows of %d of %d value classes",
                n_classes,
                len(pre.value_classes),
            )
        model.sync_momentum()  # the momentum text encoder starts equal to the warm-started one
        # by content too, so the run is still recognized as the same after the warm start's folder has moved
        if main:
            (run_dir / ckpt.WARM_START_FILE).write_text(
                json.dumps(
                    {"init_from": cfg.train.init_from, "sha256": ckpt.warm_start_fingerprint(Path(cfg.train.init_from))}
                )
            )
        log.info("warm start: %d text-encoder, fusion and decoder tensors from %s", n, cfg.train.init_from)
    teacher = None
    if cfg.loss.distill_weight > 0:
        if not cfg.train.init_from:
            raise TrainingError(
                "loss.distill_weight > 0 distils the warm start into the run: set train.init_from to its model folder"
            )
        try:
            teacher = WarmStartTeacher(Path(cfg.train.init_from), model, accelerator.device, pre)
        except TeacherError as err:
            raise TrainingError(str(err)) from err
        log.info("distilling the warm start %s with weight %g", cfg.train.init_from, cfg.loss.distill_weight)
        # the prior the run learns, which candidate ranking divides out: its labels' mixed with the teacher's
        pre.value_counts = distilled_value_counts(pre.value_counts, teacher.value_counts, cfg.loss.distill_weight)
    anchor = None
    if cfg.train.init_from and cfg.optim.anchor_decay:
        start = None
        if resume:  # the model holds the checkpoint's weights below; the anchor is the warm start's
            start = copy.deepcopy(model)
            ckpt.load_warm_start(start, Path(cfg.train.init_from))
        anchor = WeightAnchor(model, model.warm_start_keys(), cfg.optim.anchor_decay, start)
        del start
        log.info("anchored %d warm-started tensor(s) with lambda %g", len(anchor), cfg.optim.anchor_decay)
    free_texts: list[str | None] = [None] * len(records)
    mention_free_predictions = cfg.schemes.prediction_nr_text == "mention_free" and cfg.schemes.prediction_nr
    if (cfg.schemes.mention_dropout > 0 or mention_free_predictions) and model.visual is not None:
        free_texts = mention_free_texts(records, cfg.schemes.mention_removal)
        log.info(
            "mention-free texts: %d of %d rows have an image and their label in their text",
            sum(t is not None for t in free_texts),
            len(records),
        )
    frozen = (cfg.vision.enabled and cfg.vision.freeze) or model.text_cached
    if cfg.train.cache_features and frozen:
        cache_t0 = time.time()
        mention_free = [replace(r, text=t) for r, t in zip(records, free_texts) if t is not None]
        if cfg.train.feature_cache_dir:  # on disk, read lazily (pv2tea/cache)
            try:
                pre.cache = training_cache(
                    cfg.train.feature_cache_dir,
                    model,
                    pre,
                    records + val_records + mention_free,
                    main=main,
                    wait=accelerator.wait_for_everyone,
                    batch_size=cfg.train.eval_batch_size,
                    workers=cfg.train.num_workers,
                    progress=progress,
                    notify=lambda m: print(f"warning: {m}", file=sys.stderr) if main else None,
                )
            except FeatureCacheError as err:
                raise TrainingError(str(err)) from err
            n_images, n_texts = pre.cache.n_images, pre.cache.n_texts
        else:
            pre.cache = build_feature_cache(
                model, pre, records + val_records + mention_free, cfg.train.eval_batch_size, progress
            )
            n_images, n_texts = len(pre.cache.images), len(pre.cache.texts)
        log.info(
            "cached %d image and %d text feature(s) of the frozen backbone(s) in %.1f s",
            n_images,
            n_texts,
            time.time() - cache_t0,
        )
    dataset = RecordDataset(records)
    collate = make_collate(pre, dataset, with_answers=True)
    per_epoch = len(epoch_rows(records, cfg.train.image_less_per_epoch, cfg.train.seed, 0))  # same every epoch
    if per_epoch < len(records):
        n_image = sum(bool(r.images) for r in records)
        log.info(
            "each epoch trains on the %d row(s) with an image and %d of the %d without one, drawn afresh",
            n_image,
            per_epoch - n_image,
            len(records) - n_image,
        )
    rows_per_rank = ddp.rows_per_rank_step(cfg)  # a rank's rows of one optimizer step
    global_batch = rows_per_rank * world
    steps_per_epoch = ddp.steps_per_epoch(per_epoch, cfg, world)
    total_steps = steps_per_epoch * cfg.train.epochs
    if world > 1:
        log.info(
            "%d processes: a step takes %d rows (%d per process), %d steps an epoch",
            world,
            global_batch,
            rows_per_rank,
            steps_per_epoch,
        )
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    bert_config = model.bert_config.to_dict()

    step, epoch, step_in_epoch = 0, 0, 0
    rows_done = 0  # of this epoch's rows in training order, taken by the steps done
    weights: np.ndarray | None = None
    visual_cache: dict[tuple[str, ...], tuple[np.ndarray, dict[str, float]]] = {}  # S3: s_v (+ its log) while frozen
    average = WeightAverage(model) if cfg.train.average_epochs else None
    carried: tuple[dict[str, float], dict[str, float]] | None = None  # an unfinished epoch's loss sums and S3 stats
    if resume:
        state, tensors = ckpt.load_training_state(ckpt_dir)
        ckpt.load_weights(model, ckpt_dir)
        optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        saved_world = state.get("world_size", 1)  # checkpoints from before several processes: one
        saved_batch = state.get("global_batch", cfg.train.batch_size)
        rows_done = state.get("rows_done", step_in_epoch * saved_batch)
        own = rank == 0 or (saved_world == world and f"rng.torch.rank{rank}" in tensors)
        ckpt.set_rng_state(
            {"rng.torch": tensors["rng.torch" if rank == 0 or not own else f"rng.torch.rank{rank}"]},
            state["rng"] if rank == 0 or not own else state["rng_ranks"][rank - 1],
        )
        if saved_batch != global_batch:
            saved_steps = math.ceil(per_epoch / saved_batch)
            step, message = ddp.world_size_change(
                saved_world, world, step, rows_done, saved_steps, steps_per_epoch, epoch, saved_batch, global_batch
            )
            step_in_epoch = rows_done // global_batch
            _set_schedule_position(scheduler, step)
            log.warning(message)
            if main:
                print(f"warning: {message}", file=sys.stderr)
        weights = tensors["sample_weights"].numpy().astype(np.float64) if "sample_weights" in tensors else None
        if average is not None:
            average.load(tensors, state.get("averaged_epochs", 0))
        if state["step_in_epoch"]:
            carried = state.get("epoch_sums", {}), state.get("epoch_stats", {})
        if main and "metrics_bytes" in state:
            _cut_metrics(metrics_path, state["metrics_bytes"])
        log.info("resumed from %s at epoch %d step %d", ckpt_dir, epoch, step)

    def save(target: Path, with_state: bool) -> None:
        """Rank 0 writes ``target``; with the training state every rank must call it (each rank's RNG is kept)."""
        training = tensors_out = None
        if with_state:
            rngs = ddp.gather(ckpt.rng_state(), accelerator)  # [(tensors, meta)] in rank order
            if not main:
                return
            optim_tensors, optim_meta = ckpt.flatten_optimizer(optimizer)
            rng_tensors, rng_meta = rngs[0]
            tensors_out = {**optim_tensors, **rng_tensors}
            if weights is not None:
                tensors_out["sample_weights"] = torch.as_tensor(weights)
            training = {
                "step": step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "optimizer": optim_meta,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                "total_steps": total_steps,
            }
            if world > 1:
                for r, (rank_tensors, _) in enumerate(rngs[1:], start=1):
                    tensors_out[f"rng.torch.rank{r}"] = rank_tensors["rng.torch"]
                training["rng_ranks"] = [meta for _, meta in rngs[1:]]
            training.update(rows_done=rows_done, world_size=world, global_batch=global_batch)
            # for metrics.jsonl to end as an uninterrupted run's: its length now (a resume cuts what a killed run
            # wrote after this save, and writes it again) and the running sums of an unfinished epoch
            training["metrics_bytes"] = metrics_path.stat().st_size if metrics_path.is_file() else 0
            if step_in_epoch:
                training["epoch_sums"], training["epoch_stats"] = sums, weight_stats
            if average is not None:
                average_tensors, training["averaged_epochs"] = average.state()
                tensors_out.update(average_tensors)
        if main:
            ckpt.save_checkpoint(
                target, model, cfg, bert_config, preprocess_state(pre), pre.tokenizer, training, tensors_out
            )

    net = ddp.prepare_model(accelerator, model)  # DDP over the ranks (the model itself in one process)

    model.train()
    stop = False
    val_report = None
    while epoch < cfg.train.epochs and not stop:
        epoch_t0 = time.time()
        weight_stats: dict[str, float] = {}
        rows = epoch_rows(records, cfg.train.image_less_per_epoch, cfg.train.seed, epoch)
        if step_in_epoch == 0:
            if main:  # S3 over the whole training set, once, the same weights on every rank
                weights, weight_stats = sample_weights(
                    model,
                    pre,
                    [records[i] for i in rows],
                    epoch,
                    cfg,
                    progress,
                    [free_texts[i] for i in rows] if mention_free_predictions else None,
                    visual_cache,
                )
                if weights is not None and len(rows) < len(records):  # S3 over this epoch's rows; the others unused
                    weights = _scatter(weights, rows, len(records))
            weights, weight_stats = ddp.broadcast((weights, weight_stats) if main else None, accelerator)
        groups = [dataset.pair_ids[i] for i in rows] if cfg.train.product_batches else None
        batches = epoch_batches(len(rows), cfg.train.batch_size, cfg.train.seed, epoch, groups)
        order = [rows[j] for b in batches for j in b]
        steps = ddp.step_rows(order, rows_done, rows_per_rank, world)  # the epoch's remaining global batches
        swapped = mention_dropout_rows(free_texts, cfg.schemes.mention_dropout, cfg.train.seed, epoch)
        sums: dict[str, float] = {}
        if carried is not None:  # resumed inside this epoch: its record covers the steps taken before the resume
            sums, weight_stats = dict(carried[0]), dict(carried[1])
            carried = None
        bar = tqdm(
            total=step_in_epoch + len(steps),
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not progress,
            leave=False,
        )
        for global_rows in steps:
            mine = ddp.rank_part(global_rows, world, rank)
            micro = ddp.micro_batches(mine, cfg.train.batch_size)
            model.momentum_update()
            optimizer.zero_grad(set_to_none=True)
            values: dict[str, float] = {}
            for j, indices in enumerate(micro):
                batch = collate(indices, swapped)
                w = torch.as_tensor(weights[indices], dtype=torch.float32) if weights is not None else None
                if accelerator.device.type != "cpu":
                    batch, w = batch.to(accelerator.device), None if w is None else w.to(accelerator.device)
                last = j == len(micro) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(net):  # DDP syncs the last one
                    out = net(batch, w) if teacher is None else net(batch, w, teacher.logits(batch))
                    if not torch.isfinite(out.loss):
                        raise TrainingError(
                            f"non-finite loss at epoch {epoch + 1} step {step}: "
                            f"{ {k: float(v.detach()) for k, v in out.terms.items()} }"
                        )
                    share = 1.0 if len(micro) == 1 else len(indices) / len(mine)  # the step's loss: a row mean
                    accelerator.backward(out.loss if share == 1.0 else out.loss * share)
                model.enqueue(out)
                for k, v in {"loss": out.loss, **out.terms}.items():
                    values[k] = values.get(k, 0.0) + share * v.item()
            scaler = accelerator.scaler  # fp16 only
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if anchor is not None:
                anchor.pull(optimizer)  # with this step's lr, before the schedule moves on
            scheduler.step()
            step += 1
            step_in_epoch += 1
            rows_done = min(rows_done + len(global_rows), len(order))
            values = ddp.mean_over_ranks(values, accelerator)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
            if step % cfg.train.log_every_steps == 0:
                log.info(
                    "epoch %d step %d %s lr %.2e",
                    epoch + 1,
                    step,
                    " ".join(f"{k}={v:.4f}" for k, v in values.items()),
                    scheduler.get_last_lr()[0],
                )
            if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0:
                save(ckpt_dir, True)
            if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                stop = True
                break
        bar.close()
        done_steps = max(step_in_epoch, 1)
        finished_epoch = rows_done == len(order)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "finished": finished_epoch,
            "seconds": round(time.time() - epoch_t0, 2),
            **{k: v / done_steps for k, v in sums.items()},
            **weight_stats,
        }
        if model.fusion.gated:
            record["visual_gate"] = model.fusion.gate_openings()  # per fusion layer: how far the image is let in
        if finished_epoch:
            epoch, step_in_epoch, rows_done = epoch + 1, 0, 0
            if average is not None and epoch > cfg.train.epochs - cfg.train.average_epochs:
                average.update(model)
                record["averaged_epochs"] = average.count
            if val_records and main:
                report, _ = evaluate_records(
                    model, pre, val_records, cfg.train.eval_batch_size, multi, progress=progress
                )
                record["val"] = {"overall": report["overall"], "gap": report["gap"]}
                val_report = report
                log.info("epoch %d validation F1 %s", epoch, report["overall"]["f1"])
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        save(ckpt_dir, True)
        log.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "val"})

    if epoch >= cfg.train.epochs:
        if average is not None and average.count > 1:
            average.copy_to(model)
            log.info("final weights: the average of the last %d epochs", average.count)
            val_report = None  # the epoch's validation scored the last weights, not the average
        save(final_dir, False)
        if val_records and main:
            if val_report is None:  # resumed after the last epoch had been evaluated, or weights averaged
                val_report, _ = evaluate_records(model, pre, val_records, cfg.train.eval_batch_size, multi)
            (run_dir / "val_report.json").write_text(json.dumps(val_report, indent=2, allow_nan=False))
    accelerator.wait_for_everyone()  # the other ranks return once the run folder is complete
    return TrainResult(run_dir, final_dir, val_report, time.time() - t0)
