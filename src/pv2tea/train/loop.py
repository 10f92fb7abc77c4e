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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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
from pv2tea.data.attributes import multi_value_attributes as multi_value_attributes  # re-exported
from pv2tea.data.dataset import (
    FeatureCache,
    Preprocessor,
    RecordDataset,
    distilled_value_counts,
    make_collate,
    value_counts,
    value_vocabulary,
)
from pv2tea.data.products import product_key
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
    warm_from = cfg.train.warm_start
    warm = bool(warm_from) and o.warm_start_lr == "lr"
    # whether the warm start carries a classification head over (its checkpoint read once)
    has_head = bool(warm_from and model.value_head is not None and ckpt.warm_start_has_head(Path(warm_from)))
    # a classification head warm-started from the warm start's own trains at the warm-started parts' rate
    pretrained, new = model.parameter_groups(warm_started=warm, warm_head=warm and has_head)
    # the parts the warm start filled (its classification head too, copied whatever the rate), at their rate times
    # optim.warm_start_lr_scale
    filled = model.warm_start_parameters(warm_head=has_head) if warm_from and o.warm_start_lr_scale != 1 else set()
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
        # (the extra levels lie below vision.train_blocks' trained top, so they stay fixed with it too)
        fixed = (cfg.vision.freeze and s.nr_features == "backbone") or (
            model.visual_cached and s.nr_features == "levels"
        )
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
    resume_requested: bool,
    progress: bool,
    data_report: dict | None,
    t0: float,
    accelerator: Any,
) -> TrainResult:
    """The run behind :func:`train`: set up, resume, the epochs, then the final model and its validation."""
    run = setup(cfg, records, run_dir, val_records, resume_requested, progress, data_report, accelerator)
    state = resume(run) if run.resume else TrainState()
    net = ddp.prepare_model(accelerator, run.model)  # DDP over the ranks (the model itself in one process)

    run.model.train()
    stop = False
    val_report = None
    while state.epoch < run.cfg.train.epochs and not stop:
        stop, report = train_one_epoch(run, state, net)
        if report is not None:
            val_report = report

    if state.epoch >= run.cfg.train.epochs:
        if run.average is not None and run.average.count > 1:
            run.average.copy_to(run.model)
            log.info("final weights: the average of the last %d epochs", run.average.count)
            val_report = None  # the epoch's validation scored the last weights, not the average
        save_checkpoint(run, state, run.final_dir, with_state=False)
        if run.val_records and run.main:
            if val_report is None:  # resumed after the last epoch had been evaluated, or weights averaged
                val_report = validate(run)
            (run_dir / "val_report.json").write_text(json.dumps(val_report, indent=2, allow_nan=False))
    accelerator.wait_for_everyone()  # the other ranks return once the run folder is complete
    return TrainResult(run_dir, run.final_dir, val_report, time.time() - t0)


@dataclass
class TrainingRun:
    """What :func:`setup` builds once for a run and every later step reads.

    Attributes:
        cfg: The run's own copy of the configuration (``schemes.queue_size`` capped at the training set).
        accelerator: The Accelerate handle (one process, or this rank of several).
        run_dir: The run folder.
        records: The training rows.
        val_records: The validation rows (may be empty).
        multi: Per attribute, whether it is multi-value (over training and validation rows).
        resume: Whether the run continues from ``run_dir/checkpoint``.
        progress: Show progress bars (rank 0 only).
        model: The model being trained.
        pre: Its preprocessor (with the feature cache of frozen backbones, if any).
        bert_config: The text encoder's config, saved with every checkpoint.
        teacher: The warm start distilled into the run (``loss.distill_weight > 0``), else None.
        anchor: The pull of warm-started tensors back to their start (``optim.anchor_decay``), else None.
        average: The running average of the last epochs' weights (``train.average_epochs``), else None.
        dataset: The training rows as a dataset (with their product ids).
        collate: Batch of dataset rows by index, some texts replaced (mention dropout).
        free_texts: Per training row, its text without its label's mentions (None: none to remove).
        mention_free_predictions: S3's prediction level predicts from the mention-free texts.
        optimizer: AdamW over the model's parameter groups.
        scheduler: The learning-rate schedule of ``optimizer``.
        per_epoch: The rows trained on in one epoch (the same every epoch).
        rows_per_rank: A rank's rows of one optimizer step.
        global_batch: All ranks' rows of one optimizer step.
        steps_per_epoch: Optimizer steps of one epoch.
        total_steps: Optimizer steps of the run.
    """

    cfg: Config
    accelerator: Any
    run_dir: Path
    records: list[Record]
    val_records: list[Record]
    multi: dict[str, bool]
    resume: bool
    progress: bool
    model: PV2TEA
    pre: Preprocessor
    bert_config: dict[str, Any]
    teacher: WarmStartTeacher | None
    anchor: WeightAnchor | None
    average: WeightAverage | None
    dataset: RecordDataset
    collate: Callable[..., Any]
    free_texts: list[str | None]
    mention_free_predictions: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_epoch: int
    rows_per_rank: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int

    @property
    def world(self) -> int:
        """The number of processes."""
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        """This process's rank."""
        return int(self.accelerator.process_index)

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return bool(self.accelerator.is_main_process)

    @property
    def ckpt_dir(self) -> Path:
        """The latest training state, for ``--resume``."""
        return self.run_dir / "checkpoint"

    @property
    def final_dir(self) -> Path:
        """The model for inference."""
        return self.run_dir / "final"

    @property
    def metrics_path(self) -> Path:
        """One JSON line per epoch."""
        return self.run_dir / "metrics.jsonl"


@dataclass
class TrainState:
    """Where training stands; saved in (and restored from) the checkpoint.

    Attributes:
        step: Optimizer steps taken.
        epoch: The current epoch, from 0.
        step_in_epoch: Steps taken in the current epoch.
        rows_done: Of this epoch's rows in training order, those taken by the steps done.
        weights: The S3 sample weights of the current epoch, one per training row (None: unweighted).
        carried: An unfinished epoch's loss sums and S3 stats, restored on resume.
        visual_cache: S3's visual level (and its log) while it cannot change, per set of rows.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    rows_done: int = 0
    weights: np.ndarray | None = None
    carried: tuple[dict[str, float], dict[str, float]] | None = None
    visual_cache: dict[tuple[str, ...], tuple[np.ndarray, dict[str, float]]] = field(default_factory=dict)


def setup(
    cfg: Config,
    records: list[Record],
    run_dir: Path,
    val_records: list[Record],
    resume: bool,
    progress: bool,
    data_report: dict | None,
    accelerator: Any,
) -> TrainingRun:
    """Everything a run needs before its first step: the run folder's files, the model (warm-started), the
    teacher and anchor, the feature cache, the optimizer and its schedule.

    Args:
        cfg: The configuration; copied, not changed.
        records: The training rows.
        run_dir: The run folder (created by rank 0).
        val_records: The validation rows.
        resume: Continue from ``run_dir/checkpoint``; ignored when the run stopped before its first checkpoint.
        progress: Show progress bars (on rank 0).
        data_report: What validation of the data found, written to ``data_report.json``.
        accelerator: The Accelerate handle.

    Returns:
        The run, with ``resume`` as it will be done.

    Raises:
        TrainingError: No training rows, a distillation without a warm start, or a feature cache that cannot be
            used.
    """
    main = accelerator.is_main_process
    world = accelerator.num_processes
    progress = progress and main
    if not records:
        raise TrainingError("no training rows left (all rows were invalid or the file is empty)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = _run_config(cfg, records)
    resume = resume and _can_resume(run_dir, main)
    if main:
        _write_run_files(run_dir, cfg, resume, world, data_report)
    seed_everything(cfg.train.seed)
    categories = sorted({r.category for r in records})
    multi = multi_value_attributes(records + val_records)
    model, pre = build_for_training(
        cfg, categories, value_vocabulary(records), multi, value_counts(records, cfg.loss.soft_label_weight)
    )
    if cfg.train.warm_start and not resume:
        _warm_start(model, pre, cfg, run_dir, main)
    teacher = _teacher(model, pre, cfg, accelerator)
    anchor = _anchor(model, cfg, resume)
    mention_free_predictions = cfg.schemes.prediction_nr_text == "mention_free" and cfg.schemes.prediction_nr
    free_texts = _free_texts(records, cfg, model, mention_free_predictions)
    frozen = model.visual_cached or model.text_cached
    if cfg.train.cache_features and frozen:
        mention_free = [replace(r, text=t) for r, t in zip(records, free_texts) if t is not None]
        _cache_features(model, pre, cfg, records + val_records + mention_free, accelerator, progress)
    dataset = RecordDataset(records)
    collate = make_collate(pre, dataset, with_answers=True)
    per_epoch = _rows_per_epoch(records, cfg)
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
    return TrainingRun(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=run_dir,
        records=records,
        val_records=val_records,
        multi=multi,
        resume=resume,
        progress=progress,
        model=model,
        pre=pre,
        bert_config=model.bert_config.to_dict(),
        teacher=teacher,
        anchor=anchor,
        average=WeightAverage(model) if cfg.train.average_epochs else None,
        dataset=dataset,
        collate=collate,
        free_texts=free_texts,
        mention_free_predictions=mention_free_predictions,
        optimizer=optimizer,
        scheduler=scheduler,
        per_epoch=per_epoch,
        rows_per_rank=rows_per_rank,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _run_config(cfg: Config, records: list[Record]) -> Config:
    """A copy of ``cfg`` for this training set: the queue size M capped at the number of products with an image."""
    cfg = copy.deepcopy(cfg)
    n_products = len({product_key(r) for r in records if r.images})
    cfg.schemes.queue_size = max(1, min(cfg.schemes.queue_size, n_products))  # M capped at the training set
    return cfg


def _can_resume(run_dir: Path, main: bool) -> bool:
    """Whether ``run_dir`` holds something to resume from; when not (the run stopped before its first checkpoint),
    say that the run starts again."""
    if ckpt.checkpoint_exists(run_dir / "checkpoint") or (run_dir / "final").exists():
        return True
    log.info("no checkpoint in %s yet: the run starts again from the beginning", run_dir)
    if main:
        print(f"note: no checkpoint in {run_dir} yet: the run starts again from the beginning", file=sys.stderr)
    return False


def _write_run_files(run_dir: Path, cfg: Config, resume: bool, world: int, data_report: dict | None) -> None:
    """The run folder's configuration, environment and data report (rank 0); a new run's metrics start empty."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    record_environment(run_dir, resume, world)
    if data_report is not None:
        (run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
    if not resume:  # this run's epochs only, not those of an attempt stopped before its first checkpoint
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def _free_texts(records: list[Record], cfg: Config, model: PV2TEA, mention_free_predictions: bool) -> list[str | None]:
    """Each row's text with its label's mentions removed, where mention dropout or S3's mention-free predictions
    use them and the model sees images (None: a row without one, or not needed)."""
    if not ((cfg.schemes.mention_dropout > 0 or mention_free_predictions) and model.visual is not None):
        return [None] * len(records)
    free_texts = mention_free_texts(records, cfg.schemes.mention_removal)
    log.info(
        "mention-free texts: %d of %d rows have an image and their label in their text",
        sum(t is not None for t in free_texts),
        len(records),
    )
    return free_texts


def _rows_per_epoch(records: list[Record], cfg: Config) -> int:
    """The rows one epoch trains on (the same number every epoch), logged when not all of them."""
    per_epoch = len(epoch_rows(records, cfg.train.image_less_per_epoch, cfg.train.seed, 0))
    if per_epoch < len(records):
        n_image = sum(bool(r.images) for r in records)
        log.info(
            "each epoch trains on the %d row(s) with an image and %d of the %d without one, drawn afresh",
            n_image,
            per_epoch - n_image,
            len(records) - n_image,
        )
    return per_epoch


def _warm_start(model: PV2TEA, pre: Preprocessor, cfg: Config, run_dir: Path, main: bool) -> None:
    """Load ``train.warm_start`` into a new run's model and record its fingerprint in the run folder."""
    warm_from = Path(cfg.train.warm_start or "")
    n = ckpt.load_warm_start(model, warm_from)
    n_classes = ckpt.load_warm_start_head(model, pre.value_classes, warm_from)
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
            json.dumps({"warm_start": cfg.train.warm_start, "sha256": ckpt.warm_start_fingerprint(warm_from)})
        )
    log.info("warm start: %d text-encoder, fusion and decoder tensors from %s", n, cfg.train.warm_start)


def _teacher(model: PV2TEA, pre: Preprocessor, cfg: Config, accelerator: Any) -> WarmStartTeacher | None:
    """The warm start as the teacher distilled into the run (``loss.distill_weight > 0``), its prior mixed into
    ``pre.value_counts``; None without distillation."""
    if cfg.loss.distill_weight <= 0:
        return None
    if not cfg.train.warm_start:
        raise TrainingError(
            "loss.distill_weight > 0 distils the warm start into the run: set train.warm_start to its model folder "
            "(pv2tea train --warm-start RUN/final)"
        )
    try:
        teacher = WarmStartTeacher(Path(cfg.train.warm_start), model, accelerator.device, pre)
    except TeacherError as err:
        raise TrainingError(str(err)) from err
    log.info("distilling the warm start %s with weight %g", cfg.train.warm_start, cfg.loss.distill_weight)
    # the prior the run learns, which candidate ranking divides out: its labels' mixed with the teacher's
    pre.value_counts = distilled_value_counts(pre.value_counts, teacher.value_counts, cfg.loss.distill_weight)
    return teacher


def _anchor(model: PV2TEA, cfg: Config, resume: bool) -> WeightAnchor | None:
    """The pull of the warm-started tensors back to the warm start (``optim.anchor_decay``); None without it."""
    if not (cfg.train.warm_start and cfg.optim.anchor_decay):
        return None
    start = None
    if resume:  # the model holds the checkpoint's weights later; the anchor is the warm start's
        start = copy.deepcopy(model)
        ckpt.load_warm_start(start, Path(cfg.train.warm_start))
    anchor = WeightAnchor(model, model.warm_start_keys(), cfg.optim.anchor_decay, start)
    del start
    log.info("anchored %d warm-started tensor(s) with lambda %g", len(anchor), cfg.optim.anchor_decay)
    return anchor


def _cache_features(
    model: PV2TEA, pre: Preprocessor, cfg: Config, records: list[Record], accelerator: Any, progress: bool
) -> None:
    """Set ``pre.cache`` to the frozen backbones' features of ``records``: on disk (``train.feature_cache_dir``,
    read lazily) or in memory."""
    main = accelerator.is_main_process
    cache_t0 = time.time()
    cache: FeatureCache
    if cfg.train.feature_cache_dir:  # on disk, read lazily (pv2tea/cache)
        try:
            cache = training_cache(
                cfg.train.feature_cache_dir,
                model,
                pre,
                records,
                main=main,
                wait=accelerator.wait_for_everyone,
                batch_size=cfg.train.eval_batch_size,
                workers=cfg.train.num_workers,
                progress=progress,
                notify=lambda m: print(f"warning: {m}", file=sys.stderr) if main else None,
            )
        except FeatureCacheError as err:
            raise TrainingError(str(err)) from err
    else:
        cache = build_feature_cache(model, pre, records, cfg.train.eval_batch_size, progress)
    pre.cache = cache
    log.info(
        "cached %d image and %d text feature(s) of the frozen backbone(s) in %.1f s",
        cache.n_images,
        cache.n_texts,
        time.time() - cache_t0,
    )


def resume(run: TrainingRun) -> TrainState:
    """Load ``run_dir/checkpoint`` into the run (weights, optimizer, schedule, weight average, this rank's RNG)
    and return where training stands; a changed number of processes moves to the step that covers the same rows.

    Args:
        run: The run, set up with the same config and data as the checkpoint's.

    Returns:
        The step, epoch and rows done, the epoch's S3 weights and, inside an epoch, its running sums.
    """
    world, rank, main = run.world, run.rank, run.main
    saved, tensors = ckpt.load_training_state(run.ckpt_dir)
    ckpt.load_weights(run.model, run.ckpt_dir)
    run.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, saved["optimizer"]))
    run.scheduler.load_state_dict(saved["scheduler"])
    step, epoch, step_in_epoch = saved["step"], saved["epoch"], saved["step_in_epoch"]
    # an older folder's state arrives upgraded (models/checkpoint.py, MIGRATIONS): every field below is there
    saved_world, saved_batch, rows_done = saved["world_size"], saved["global_batch"], saved["rows_done"]
    own = rank == 0 or (saved_world == world and f"rng.torch.rank{rank}" in tensors)
    ckpt.set_rng_state(
        {"rng.torch": tensors["rng.torch" if rank == 0 or not own else f"rng.torch.rank{rank}"]},
        saved["rng"] if rank == 0 or not own else saved["rng_ranks"][rank - 1],
    )
    if saved_batch != run.global_batch:
        saved_steps = math.ceil(run.per_epoch / saved_batch)
        step, message = ddp.world_size_change(
            saved_world,
            world,
            step,
            rows_done,
            saved_steps,
            run.steps_per_epoch,
            epoch,
            saved_batch,
            run.global_batch,
        )
        step_in_epoch = rows_done // run.global_batch
        _set_schedule_position(run.scheduler, step)
        log.warning(message)
        if main:
            print(f"warning: {message}", file=sys.stderr)
    weights = tensors["sample_weights"].numpy().astype(np.float64) if "sample_weights" in tensors else None
    if run.average is not None:
        run.average.load(tensors, saved["averaged_epochs"])
    carried = None
    if saved["step_in_epoch"]:
        carried = saved["epoch_sums"], saved["epoch_stats"]
    if main and saved["metrics_bytes"] is not None:
        _cut_metrics(run.metrics_path, saved["metrics_bytes"])
    log.info("resumed from %s at epoch %d step %d", run.ckpt_dir, epoch, step)
    return TrainState(step, epoch, step_in_epoch, rows_done, weights, carried)


def save_checkpoint(
    run: TrainingRun,
    state: TrainState,
    target: Path,
    with_state: bool,
    epoch_sums: dict[str, float] | None = None,
    epoch_stats: dict[str, float] | None = None,
) -> None:
    """Write the model to ``target`` (rank 0), with the training state for ``--resume`` when ``with_state``.

    With the training state every rank must call it: each rank's RNG state is gathered and kept.

    Args:
        run: The run.
        state: Where training stands.
        target: The folder written.
        with_state: Also save the optimizer, schedule, RNGs, S3 weights and position.
        epoch_sums: The current epoch's loss sums, kept when the checkpoint falls inside an epoch.
        epoch_stats: The current epoch's S3 stats, kept likewise.
    """
    main = run.main
    training = tensors_out = None
    if with_state:
        rngs = ddp.gather(ckpt.rng_state(), run.accelerator)  # [(tensors, meta)] in rank order
        if not main:
            return
        optim_tensors, optim_meta = ckpt.flatten_optimizer(run.optimizer)
        rng_tensors, rng_meta = rngs[0]
        tensors_out = {**optim_tensors, **rng_tensors}
        if state.weights is not None:
            tensors_out["sample_weights"] = torch.as_tensor(state.weights)  # (N,)
        training = {
            "step": state.step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "optimizer": optim_meta,
            "scheduler": run.scheduler.state_dict(),
            "rng": rng_meta,
            "total_steps": run.total_steps,
        }
        if run.world > 1:
            for r, (rank_tensors, _) in enumerate(rngs[1:], start=1):
                tensors_out[f"rng.torch.rank{r}"] = rank_tensors["rng.torch"]
            training["rng_ranks"] = [meta for _, meta in rngs[1:]]
        training.update(rows_done=state.rows_done, world_size=run.world, global_batch=run.global_batch)
        # for metrics.jsonl to end as an uninterrupted run's: its length now (a resume cuts what a killed run
        # wrote after this save, and writes it again) and the running sums of an unfinished epoch
        metrics_path = run.metrics_path
        training["metrics_bytes"] = metrics_path.stat().st_size if metrics_path.is_file() else 0
        if state.step_in_epoch:
            training["epoch_sums"], training["epoch_stats"] = epoch_sums, epoch_stats
        if run.average is not None:
            average_tensors, training["averaged_epochs"] = run.average.state()
            tensors_out.update(average_tensors)
    if main:
        ckpt.save_checkpoint(
            target,
            run.model,
            run.cfg,
            run.bert_config,
            preprocess_state(run.pre),
            run.pre.tokenizer,
            training,
            tensors_out,
        )


def validate(run: TrainingRun, progress: bool = False) -> dict[str, Any]:
    """Score the model on the run's validation rows.

    Args:
        run: The run (with validation rows).
        progress: Show a progress bar.

    Returns:
        The source-aware report (:func:`pv2tea.eval.metrics.source_aware_report`).
    """
    report, _ = evaluate_records(
        run.model, run.pre, run.val_records, run.cfg.train.eval_batch_size, run.multi, progress=progress
    )
    return report


def _epoch_weights(run: TrainingRun, state: TrainState, rows: list[int]) -> dict[str, float]:
    """Set ``state.weights`` to the S3 weights of the epoch's ``rows`` (rank 0 computes them, every rank gets
    them) and return their stats."""
    weights: np.ndarray | None = None
    weight_stats: dict[str, float] = {}
    if run.main:  # S3 over the whole training set, once, the same weights on every rank
        weights, weight_stats = sample_weights(
            run.model,
            run.pre,
            [run.records[i] for i in rows],
            state.epoch,
            run.cfg,
            run.progress,
            [run.free_texts[i] for i in rows] if run.mention_free_predictions else None,
            state.visual_cache,
        )
        if weights is not None and len(rows) < len(run.records):  # S3 over this epoch's rows; the others unused
            weights = _scatter(weights, rows, len(run.records))
    state.weights, weight_stats = ddp.broadcast((weights, weight_stats) if run.main else None, run.accelerator)
    return weight_stats


def _optimizer_step(
    run: TrainingRun, state: TrainState, net: torch.nn.Module, mine: list[int], swapped: dict[int, str]
) -> dict[str, float]:
    """One optimizer step on this rank's rows ``mine`` (in micro-batches, DDP syncing the last): its loss terms,
    row means of this rank."""
    cfg, model, accelerator, optimizer = run.cfg, run.model, run.accelerator, run.optimizer
    micro = ddp.micro_batches(mine, cfg.train.batch_size)
    model.momentum_update()
    optimizer.zero_grad(set_to_none=True)
    values: dict[str, float] = {}
    for j, indices in enumerate(micro):
        batch = run.collate(indices, swapped)
        w = torch.as_tensor(state.weights[indices], dtype=torch.float32) if state.weights is not None else None  # (B,)
        if accelerator.device.type != "cpu":
            batch, w = batch.to(accelerator.device), None if w is None else w.to(accelerator.device)
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(net):  # DDP syncs the last one
            out = net(batch, w) if run.teacher is None else net(batch, w, run.teacher.logits(batch))
            if not torch.isfinite(out.loss):
                raise TrainingError(
                    f"non-finite loss at epoch {state.epoch + 1} step {state.step}: "
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
    if run.anchor is not None:
        run.anchor.pull(optimizer)  # with this step's lr, before the schedule moves on
    run.scheduler.step()
    return values


def train_one_epoch(run: TrainingRun, state: TrainState, net: torch.nn.Module) -> tuple[bool, dict[str, Any] | None]:
    """Train the rest of the current epoch (all of it unless resumed inside it), append its line to
    ``metrics.jsonl`` and save the checkpoint (also every ``train.save_every_steps``).

    Args:
        run: The run.
        state: Where training stands; advanced in place (to the next epoch when this one finishes).
        net: The model as the ranks train it (DDP-wrapped under several processes).

    Returns:
        Whether ``train.max_steps`` stopped the run, and the validation report when the finished epoch was
        validated (None otherwise).
    """
    cfg, main = run.cfg, run.main
    epoch_t0 = time.time()
    weight_stats: dict[str, float] = {}
    rows = epoch_rows(run.records, cfg.train.image_less_per_epoch, cfg.train.seed, state.epoch)
    if state.step_in_epoch == 0:
        weight_stats = _epoch_weights(run, state, rows)
    groups = [run.dataset.pair_ids[i] for i in rows] if cfg.train.product_batches else None
    batches = epoch_batches(len(rows), cfg.train.batch_size, cfg.train.seed, state.epoch, groups)
    order = [rows[j] for b in batches for j in b]
    steps = ddp.step_rows(order, state.rows_done, run.rows_per_rank, run.world)  # the epoch's remaining batches
    swapped = mention_dropout_rows(run.free_texts, cfg.schemes.mention_dropout, cfg.train.seed, state.epoch)
    sums: dict[str, float] = {}
    if state.carried is not None:  # resumed inside this epoch: its record covers the steps taken before the resume
        sums, weight_stats = dict(state.carried[0]), dict(state.carried[1])
        state.carried = None
    bar = tqdm(
        total=state.step_in_epoch + len(steps),
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
        disable=not run.progress,
        leave=False,
    )
    stop = False
    for global_rows in steps:
        mine = ddp.rank_part(global_rows, run.world, run.rank)
        values = _optimizer_step(run, state, net, mine, swapped)
        state.step += 1
        state.step_in_epoch += 1
        state.rows_done = min(state.rows_done + len(global_rows), len(order))
        values = ddp.mean_over_ranks(values, run.accelerator)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
        if state.step % cfg.train.log_every_steps == 0:
            log.info(
                "epoch %d step %d %s lr %.2e",
                state.epoch + 1,
                state.step,
                " ".join(f"{k}={v:.4f}" for k, v in values.items()),
                run.scheduler.get_last_lr()[0],
            )
        if cfg.train.save_every_steps and state.step % cfg.train.save_every_steps == 0:
            save_checkpoint(run, state, run.ckpt_dir, True, sums, weight_stats)
        if cfg.train.max_steps is not None and state.step >= cfg.train.max_steps:
            stop = True
            break
    bar.close()
    done_steps = max(state.step_in_epoch, 1)
    finished_epoch = state.rows_done == len(order)
    record: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "finished": finished_epoch,
        "seconds": round(time.time() - epoch_t0, 2),
        **{k: v / done_steps for k, v in sums.items()},
        **weight_stats,
    }
    if run.model.fusion.gated:
        record["visual_gate"] = run.model.fusion.gate_openings()  # per fusion layer: how far the image is let in
    val_report = None
    if finished_epoch:
        state.epoch, state.step_in_epoch, state.rows_done = state.epoch + 1, 0, 0
        if run.average is not None and state.epoch > cfg.train.epochs - cfg.train.average_epochs:
            run.average.update(run.model)
            record["averaged_epochs"] = run.average.count
        if run.val_records and main:
            val_report = validate(run, progress=run.progress)
            record["val"] = {"overall": val_report["overall"], "gap": val_report["gap"]}
            log.info("epoch %d validation F1 %s", state.epoch, val_report["overall"]["f1"])
    if main:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    save_checkpoint(run, state, run.ckpt_dir, True, sums, weight_stats)
    log.info("epoch %d: %s", state.epoch, {k: v for k, v in record.items() if k != "val"})
    return stop, val_report
