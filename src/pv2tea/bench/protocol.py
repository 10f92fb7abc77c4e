"""The weak-label protocol, shared by every benchmark on gold-labelled multimodal products.

Given a set's labelled *text-only* rows (what the team's text extractor learns from) and its multimodal products
(text, image, gold, source; no label): (1) train the text-established extractor (TF-IDF word 1–2-grams + char
3–5-grams, logistic regression per attribute) on the text-only rows; (2) weakly label the products with it; (3) k-fold
cross-validation over the products (folds by product): PV2TEA and its variants train on the weak labels of k−1 folds
with their images (plus text-only rows as image-less samples) and are scored against gold on the held-out fold, by
free generation and ranked among the closed value lists (every run starts from a TEA trained once on all the
text-only rows, ``warm_start_epochs`` epochs: the warm start); a PV2TEA trained on the gold labels of the same folds is the ceiling. Each
model also gets a ``<variant>+extractor`` row (its candidate ranking fused with the extractor's class probabilities)
and a ``<variant>+calibrated`` row (the model's share per attribute fitted on the other folds' held-out gold). Runs
resume: every finished (fold, variant, seed) keeps its ``test_report.json``.

ImplicitAVE (:mod:`pv2tea.bench.implicitave`: its own text-only training set) and any catalogue
(:mod:`pv2tea.bench.catalog`: a share of the products as the text-labelled set) are cases of it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from pv2tea.baselines import TfidfExtractorConfig, TfidfTextExtractor, load_extractor, soft_labelled, weak_label
from pv2tea.bench.calibrated import (
    SCORES_FILE,
    FoldRows,
    calibrated_reports,
    fold_scored_rows,
    halves_calibrated_report,
)
from pv2tea.config import Config, load_config, preset_overrides, with_settings_of
from pv2tea.data.attributes import multi_value_attributes
from pv2tea.data.folds import product_folds
from pv2tea.data.schema import Record
from pv2tea.decoding.calibration import CalibrationConfig, Objective
from pv2tea.eval.metrics import merge_departures, source_aware_report
from pv2tea.eval.report import write_report
from pv2tea.eval.summary import METRICS as METRICS  # re-exported (pv2tea.bench.implicitave)
from pv2tea.eval.summary import SOURCES, add_ttests, attribute_stats, fmt_p, fmt_stat, markdown_table, metric_stats
from pv2tea.experiment import (
    FUSED_SUFFIX,
    KEEP_SUFFIX,
    KEPT_KEY,
    NO_IMAGES_KEY,
    NO_IMAGES_SUFFIX,
    VARIANTS,
    Split,
    check_same_config,
    constrain_to_candidates,
    gold_examples,
    load_predictor,
    run_variant,
    score_predictor,
)
from pv2tea.models.checkpoint import checkpoint_exists, warm_start_fingerprint
from pv2tea.train.loop import train

# A frozen visual backbone with cached features (the text encoder as the preset says; `cpu` caches all but its top
# layers): the only way the protocol fits half an hour per ImplicitAVE domain on 2 CPU cores. A product's rows (one per
# attribute) batched together and their text and image encoded once (train.product_batches): the same batches as
# before where a product has one row (ImplicitAVE), fewer encoder passes on a catalogue with several.
BENCH_OVERRIDES = ["vision.freeze=true", "train.product_batches=true"]
# How every model of the protocol answers and how a fold's run keeps its warm start: the recipe for real products,
# read from the two presets that hold it (src/pv2tea/presets/warm-start.yaml and from-warm-start.yaml, with their
# evidence; docs/method/decisions.md, "The ImplicitAVE protocol"), on whichever --config the benchmark runs. Every model
# classifies among the values (REAL_DATA_OVERRIDES); with a warm start (--warm-start-epochs > 0) the warm start also
# learns from the extractor's out-of-fold class probabilities and a fold's run learns from the warm start, at a tenth
# of the rate on the warm-started parts, the image read through a gate that starts closed (WARM_START_OVERRIDES).
# They hold for any domain; --set overrides them.
WARM_START_PRESET = "warm-start"  # step 1: the text-only warm start
FROM_WARM_START_PRESET = "from-warm-start"  # step 2: the run it starts and teaches
REAL_DATA_OVERRIDES = preset_overrides(FROM_WARM_START_PRESET, ["decoder.head"])
WARM_START_OVERRIDES = [  # only with a warm start (the teacher)
    *preset_overrides(WARM_START_PRESET, ["loss.soft_label_weight"]),
    *preset_overrides(
        FROM_WARM_START_PRESET, ["loss.distill_weight", "optim.warm_start_lr_scale", "fusion.visual_gate"]
    ),
]
# the presets' epochs: of the warm start, and of each fold's run (5: as good as 10 in half the time)
WARM_START_EPOCHS = load_config(WARM_START_PRESET).train.epochs
FOLD_EPOCHS = load_config(FROM_WARM_START_PRESET).train.epochs
# settings of the fold runs that the warm start (a TEA from scratch on text-only rows) keeps at the preset's: the
# visual encoder (TEA has none), the schemes (TEA's, whatever a benchmark sets for its image rows), the L_sc / L_ct
# weights, the lr of warm-started parts and the gate of a visual path; benchmarks that differ only there share one
# warm start
FOLD_RUN_SETTINGS = (
    "vision",
    "schemes",
    "loss.weight_sc",
    "loss.weight_ct",
    "optim.warm_start_lr",
    "optim.warm_start_lr_scale",
    "optim.anchor_decay",
    "loss.distill_weight",
    "fusion.visual_gate",
)


@dataclass(kw_only=True)
class ProtocolConfig:
    """How the protocol trains and scores; a benchmark adds where its data comes from."""

    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    quick: bool = False  # 1 fold, 1 seed: a smoke test of the whole protocol (its run is the full protocol's fold 0)
    variants: list[str] = field(default_factory=lambda: ["tea", "pv2tea"])
    gold_ceiling: bool = True  # also train PV2TEA on the gold labels of the training folds
    text_rows: int = 1000  # text-only rows trained on per epoch (0: none, -1: the whole pool)
    # text-only rows of the domain's train.tsv they come from (-1: all; None: text_rows, i.e. one fixed sample seen
    # every epoch); a pool larger than text_rows gives a fresh draw each epoch (train.image_less_per_epoch)
    text_pool: int | None = None
    # epochs of each fold's run (the preset from-warm-start's; docs/method/decisions.md)
    epochs: int = FOLD_EPOCHS
    # epochs of the warm start, a TEA trained once per domain on *all* its text-only rows, whose text encoder, fusion
    # and decoder then start every fold's run (train.warm_start); 0: none, each run starts from the pretrained text
    # model (the preset warm-start's; docs/method/decisions.md)
    warm_start_epochs: int = WARM_START_EPOCHS
    config: str = "cpu"
    overrides: list[str] = field(default_factory=list)
    # what a fold's score is for the t-tests: "overall" (macro-F1 over the values of every attribute pooled, as
    # ImplicitAVE reports it) or "attribute_mean" (the mean over attributes of each one's macro-F1)
    fold_score: Literal["overall", "attribute_mean"] = "overall"
    # what the calibrated rows choose each attribute's share by (pv2tea calibrate --objective)
    calibration_objective: Objective = "accuracy"

    def __post_init__(self) -> None:
        if self.warm_start_epochs < 0:
            raise ValueError(f"--warm-start-epochs must be >= 0, got {self.warm_start_epochs}")
        if self.folds < 2:
            raise ValueError("--folds must be at least 2 (one held-out fold, the rest for training)")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        if self.calibration_objective not in get_args(Objective):
            raise ValueError(
                f"--calibration-objective must be one of {', '.join(get_args(Objective))}, "
                f"got {self.calibration_objective!r}"
            )
        if self.quick:
            self.seeds = self.seeds[:1]


def gold_labelled(records: Sequence[Record]) -> list[Record]:
    """The rows with their gold values as labels, fully trusted (no extractor confidence carried over)."""
    return [replace(r, label=tuple(r.gold or ()), label_weight=None) for r in records]


def _text_extractor(train_rows: list[Record], directory: Path) -> TfidfTextExtractor:
    """The set's TF-IDF extractor, trained once and saved; reloaded when present and trained on the same rows (their
    SHA-256 in ``rows_sha256``), trained again otherwise."""
    key = hashlib.sha256(json.dumps([[r.id, r.text, r.attribute, list(r.label)] for r in train_rows]).encode())
    stamp = directory / "rows_sha256"
    if (directory / "extractor.json").is_file() and stamp.is_file() and stamp.read_text() == key.hexdigest():
        return load_extractor(directory)  # type: ignore[return-value]
    extractor = TfidfTextExtractor(TfidfExtractorConfig()).fit(train_rows)
    extractor.save(directory)
    stamp.write_text(key.hexdigest())
    return extractor


SOFT_LABEL_FOLDS = 5  # the text-only rows' cross-fitting folds for the extractor's soft labels


def _soft_labels(text_rows: list[Record], path: Path, log: Callable[[str], None]) -> list[Record]:
    """The text-only rows with the TF-IDF extractor's out-of-fold class probabilities as soft labels
    (``loss.soft_label_weight``); computed once and kept in ``path``, keyed by the rows."""
    key = hashlib.sha256(
        json.dumps([[r.id, r.text, r.attribute, list(r.label)] for r in text_rows]).encode()
    ).hexdigest()
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None  # damaged: computed again below
        probs = saved.get("label_probs") if isinstance(saved, dict) else None
        if (
            isinstance(saved, dict)
            and saved.get("rows_sha256") == key
            and saved.get("folds") == SOFT_LABEL_FOLDS
            and isinstance(probs, list)
            and len(probs) == len(text_rows)
        ):
            return [replace(r, label_probs=tuple(map(tuple, p)) if p else None) for r, p in zip(text_rows, probs)]
        # otherwise damaged or of other rows: computed again below
    log(f"soft labels: {SOFT_LABEL_FOLDS} TF-IDF extractors, each scoring the text-only rows the others trained on")
    rows = soft_labelled(
        lambda: TfidfTextExtractor(TfidfExtractorConfig()), text_rows, product_folds(text_rows, SOFT_LABEL_FOLDS)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "rows_sha256": key,
                "folds": SOFT_LABEL_FOLDS,
                "label_probs": [list(map(list, r.label_probs)) if r.label_probs else None for r in rows],
            }
        )
    )
    tmp.replace(path)
    return rows


WARM_START_ROW = "warm_start"  # the row of the warm start scored alone, and the folder it is trained and scored in
OLD_WARM_START_DIR = "text_pretrain"  # that folder's name in runs made before the rename, still reused


def warm_start_dir(parent: Path) -> Path:
    """Where the warm start (or its scores on a fold) lives under ``parent``: ``warm_start/``, or the folder of an
    older run (``text_pretrain/``) when that is the one there."""
    old = parent / OLD_WARM_START_DIR
    return old if old.is_dir() and not (parent / WARM_START_ROW).exists() else parent / WARM_START_ROW


def warm_start_config(cfg: ProtocolConfig, overrides: Sequence[str]) -> Config:
    """The config of the warm start: a TEA on the fold runs' ``overrides`` for ``cfg.warm_start_epochs`` epochs, its
    :data:`FOLD_RUN_SETTINGS` at the preset's."""
    return with_settings_of(
        load_config(
            cfg.config,
            [
                *overrides,
                *VARIANTS["tea"],
                f"train.epochs={cfg.warm_start_epochs}",
                "train.image_less_per_epoch=null",
                "train.warm_start=null",
                "train.seed=0",
            ],
        ),
        load_config(cfg.config, VARIANTS["tea"]),
        FOLD_RUN_SETTINGS,
    )


def _train_warm_start(
    text_rows: list[Record], directory: Path, cfg: ProtocolConfig, overrides: Sequence[str], log: Callable[[str], None]
) -> Path:
    """A TEA trained on all the domain's text-only rows (once; reused when finished); returns its final/ folder."""
    final = directory / "final"
    run_cfg = warm_start_config(cfg, overrides)
    check_same_config(directory, run_cfg)
    rows = hashlib.sha256(json.dumps([[r.id, r.text, r.attribute, list(r.label)] for r in text_rows]).encode())
    stamp = directory / "rows_sha256"
    if stamp.is_file() and stamp.read_text() != rows.hexdigest():
        raise ValueError(
            f"{directory}: this warm start was trained on other text-only rows; delete the folder (or use another "
            "--out) to train it on these"
        )
    if not (final / "model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(rows.hexdigest())
        resume = checkpoint_exists(directory / "checkpoint")
        log(
            f"warm start: TEA on {len(text_rows)} text-only rows, {cfg.warm_start_epochs} epoch(s)"
            + (" (resumed)" if resume else "")
        )
        train(run_cfg, text_rows, directory, resume=resume, progress=False)
    return final


def _score_warm_start(
    final: Path,
    test: list[Record],
    candidates: dict[str, list[str]] | None,
    multi: dict[str, bool],
    report_path: Path,
    prior_correction: float = 0.0,
    trained_on: Sequence[Record] | None = None,
) -> dict[str, Any]:
    """The warm start (a TEA) scored on a fold's held-out products as it is (cached, keyed by its weights, the
    products and how it ranks candidates)."""
    fingerprint = warm_start_fingerprint(final)
    products = hashlib.sha256("\n".join(r.id for r in test).encode()).hexdigest()  # the fold's held-out products
    # their weak labels (the departures are counted against them; a retrained extractor changes them)
    labels = hashlib.sha256(json.dumps([list(r.label) for r in test]).encode()).hexdigest()
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            report = None  # damaged: scored again below
        if (
            isinstance(report, dict)
            and report.get("warm_start_sha256") == fingerprint
            and report.get("products_sha256") == products
            and (not candidates or "constrained" in report)
            and report.get("labels_sha256") == labels
            and report.get("prior_correction", 0.0) == prior_correction
        ):
            return report
    report, _, _ = score_predictor(load_predictor(final, prior_correction, trained_on), test, multi, candidates)
    report["warm_start_sha256"], report["products_sha256"], report["labels_sha256"] = fingerprint, products, labels
    report["prior_correction"] = prior_correction
    write_report(report, report_path)
    return report


def summarize_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds × seeds: open generation, candidate-constrained, and per attribute."""
    out: dict[str, Any] = {"runs": len(reports)}
    for mode in ("open", "constrained"):
        blocks = [r if mode == "open" else r.get("constrained", r) for r in reports]
        out[mode] = metric_stats(blocks, "overall")
        moved = [b["departures"] for b in blocks if "departures" in b]
        if moved and len(moved) == len(blocks):  # pooled over the runs: where the answers left the weak labels
            out[mode]["departures"] = merge_departures(moved)
        out[mode]["by_attribute"] = attribute_stats(blocks, ("f1", "accuracy"), SOURCES)
    return out


@dataclass
class ProtocolRun:
    """What a run of the protocol leaves: the summaries, and per fold its held-out rows (weak labels attached) and
    every model's scored rows (for per-row views such as the examples page)."""

    summaries: dict[str, Any]  # {variant: summary}
    tests: list[list[Record]]  # per fold run, the held-out rows
    scored: dict[tuple[str, int], list[FoldRows]]  # (model, seed) -> per fold run, its scored held-out rows


def fold_run_overrides(cfg: ProtocolConfig, per_epoch: Sequence[str] = ()) -> list[str]:
    """The overrides (on ``cfg.config``) of every fold's run, but for its warm start's folder (``train.warm_start``,
    added once the warm start is trained): the benchmark's, the recipe's (all of it with a warm start, only how the
    models answer without), the epochs, ``per_epoch`` and the user's ``--set``."""
    # soft labels need the classification head: a protocol set to generate (--set decoder.head=generate) goes without;
    # a decoder that reads the context tokens (--set decoder.attend_context=true) would read the image past the gate
    asked = load_config(cfg.config, [*BENCH_OVERRIDES, *REAL_DATA_OVERRIDES, *cfg.overrides])
    dropped = [
        *(["loss.soft_label_weight="] if asked.decoder.head != "classify" else []),
        *(["fusion.visual_gate="] if asked.decoder.attend_context else []),
    ]
    warm_start = [o for o in WARM_START_OVERRIDES if not o.startswith(tuple(dropped))]
    return [
        *BENCH_OVERRIDES,
        *REAL_DATA_OVERRIDES,
        *(warm_start if cfg.warm_start_epochs else []),
        f"train.epochs={cfg.epochs}",
        *per_epoch,
        *cfg.overrides,
    ]


def run_protocol(
    label: str,
    text_rows: list[Record],
    products: list[Record],
    candidates: dict[str, list[str]] | None,
    directory: Path,
    cfg: ProtocolConfig,
    log: Callable[[str], None] = print,
    anchors: Callable[[list[Record], list[Record]], dict[str, list[list[str]]]] | None = None,
) -> ProtocolRun:
    """The whole protocol on one set (``label`` in the log): ``text_rows`` (labelled, text only) train the extractor
    and the warm start, ``products`` (gold, images) are weakly labelled and cross-validated; everything is written
    under ``directory`` and resumes from it. ``anchors(train, test)``, if given, answers each fold's held-out rows
    from its weakly labelled training rows by other means ({row name: answers}, e.g. image-only probes); each
    becomes a row of the tables."""
    domain = label
    domain_dir = directory
    extractor = _text_extractor(text_rows, domain_dir / "text_extractor")
    weak = weak_label(extractor, products)
    multi = multi_value_attributes(products)
    extracted = {r.id: list(r.label) for r in weak}

    rng = random.Random(0)
    size = cfg.text_rows if cfg.text_pool is None else cfg.text_pool
    pool = list(text_rows) if size < 0 else rng.sample(text_rows, min(size, len(text_rows)))
    extra = [] if cfg.text_rows == 0 else pool
    per_epoch = (
        [] if cfg.text_rows < 0 or cfg.text_rows >= len(extra) else [f"train.image_less_per_epoch={cfg.text_rows}"]
    )  # a fresh sample of the pool each epoch
    folds = product_folds(weak, cfg.folds)
    fold_ids = [0] if cfg.quick else list(range(cfg.folds))
    overrides = fold_run_overrides(cfg, per_epoch)
    resolved = load_config(cfg.config, overrides)
    tau = resolved.decoder.prior_correction  # how every model ranks the options
    if cfg.warm_start_epochs:
        soft = resolved.loss.soft_label_weight > 0
        warm_rows = _soft_labels(text_rows, domain_dir / "soft_labels.json", log) if soft else text_rows
        start = _train_warm_start(warm_rows, warm_start_dir(domain_dir), cfg, overrides, log)
        overrides.append(f"train.warm_start={start}")
    reports: dict[str, list[dict[str, Any]]] = {}
    # per (model, seed): each fold's held-out rows scored by that fold's model and the extractor, for the calibrated
    # rows (cross-fitted over the folds once all have run)
    scored: dict[tuple[str, int], list[FoldRows]] = {}
    tests: list[list[Record]] = []
    for fold in fold_ids:
        held = set(folds[fold])
        test = [weak[i] for i in sorted(held)]
        train_weak = [weak[i] for i in range(len(weak)) if i not in held]
        fold_dir = domain_dir / f"fold_{fold}"
        tests.append(test)
        priors = extractor.value_probabilities(test) if candidates else None
        preds = [extracted[r.id] for r in test]
        report = source_aware_report(gold_examples(test, preds, multi))
        report["constrained"] = source_aware_report(
            gold_examples(test, constrain_to_candidates(preds, test, candidates), multi)
        )
        reports.setdefault("text_extractor", []).append(report)
        for row, answers in (anchors(train_weak, test) if anchors else {}).items():
            anchored = source_aware_report(gold_examples(test, answers, multi))  # answers among the training values
            reports.setdefault(row, []).append({**anchored, "constrained": anchored})
        if cfg.warm_start_epochs:  # the warm start alone: what the fold's training on weak labels adds to it
            scores_dir = warm_start_dir(fold_dir)
            reports.setdefault(WARM_START_ROW, []).append(
                _score_warm_start(start, test, candidates, multi, scores_dir / "test_report.json", tau, text_rows)
            )
            if candidates and priors is not None:
                scored.setdefault((WARM_START_ROW, 0), []).append(
                    fold_scored_rows(start, test, candidates, priors, scores_dir / SCORES_FILE, tau, text_rows)
                )
        split = Split(train=train_weak + extra, val=[], test=test)
        for name in cfg.variants:
            for seed in cfg.seeds:
                result = run_variant(
                    name, seed, split, fold_dir, cfg.config, overrides, candidates=candidates, priors=priors
                )
                reports.setdefault(name, []).append(result)
                if KEPT_KEY in result:  # deployed next to the extractor: its labels the text states kept
                    reports.setdefault(f"{name}{KEEP_SUFFIX}", []).append(result[KEPT_KEY])
                if "fused" in result:  # deployed next to the extractor: candidates ranked by both
                    # fusion only ranks candidates, so the row's open and constrained blocks are the same
                    reports.setdefault(f"{name}{FUSED_SUFFIX}", []).append(
                        {**result["fused"], "constrained": result["fused"]}
                    )
                if result.get(NO_IMAGES_KEY):  # the same model, the test images withheld: what the image adds
                    reports.setdefault(f"{name}{NO_IMAGES_SUFFIX}", []).append(result[NO_IMAGES_KEY])
                run_final = fold_dir / name / f"seed_{seed}" / "final"
                if candidates and priors is not None and (run_final / "model.safetensors").is_file():
                    scored.setdefault((name, seed), []).append(
                        fold_scored_rows(
                            run_final, test, candidates, priors, run_final.parent / SCORES_FILE, tau, split.train
                        )
                    )
                log(f"{domain} fold {fold} {name} seed {seed}: F1 {_log_f1(result)}")
        if cfg.gold_ceiling:
            gold_train = gold_labelled(train_weak)
            gold_split = Split(train=gold_train + extra, val=[], test=test)
            for seed in cfg.seeds:
                result = run_variant(
                    "pv2tea",
                    seed,
                    gold_split,
                    fold_dir,
                    cfg.config,
                    [*overrides, "loss.distill_weight=0"],  # the ceiling learns the gold labels, not the warm start's
                    candidates=candidates,
                    run_name="pv2tea_gold",
                )
                reports.setdefault("pv2tea_gold", []).append(result)
                log(f"{domain} fold {fold} pv2tea_gold seed {seed}: F1 {_log_f1(result)}")
    details = _add_calibrated(reports, scored, tests, multi, candidates, cfg)
    summaries = {name: summarize_runs(runs) for name, runs in reports.items()}
    for name, detail in details.items():
        summaries[name]["calibration"] = detail
    add_fold_ttests(summaries, reports, len(fold_ids), cfg.fold_score)
    return ProtocolRun(summaries=summaries, tests=tests, scored=scored)


def _add_calibrated(
    reports: dict[str, list[dict[str, Any]]],
    scored: dict[tuple[str, int], list[FoldRows]],
    tests: list[list[Record]],
    multi: dict[str, bool],
    candidates: dict | None,
    cfg: ProtocolConfig,
) -> dict[str, dict[str, Any]]:
    """``<model>+calibrated`` rows in ``reports`` (fold-major, seeds inner, as the other rows), in place: each
    fold's model next to the extractor with per-attribute shares calibrated on the other folds' held-out gold
    (:mod:`pv2tea.bench.calibrated`), or with one fold, on the other half of its own held-out products; needs
    candidate lists. Returns each row's details
    (chosen shares, the F1 by calibration sample size and by guard; the first seed's)."""
    details: dict[str, dict[str, Any]] = {}
    if not candidates or not tests:
        return details
    calibration = CalibrationConfig(objective=cfg.calibration_objective)
    for name in dict.fromkeys(n for n, _ in scored):
        seeds = [s for n, s in scored if n == name]
        if any(len(scored[(name, s)]) != len(tests) for s in seeds):
            continue  # a fold without a final model (cannot happen after a finished run)
        if len(tests) == 1:  # one fold (--quick): calibrated within it, each half of its products on the other's gold
            one = {
                s: halves_calibrated_report(scored[(name, s)][0], tests[0], multi, candidates, calibration)
                for s in seeds
            }
            per_seed = {s: ([report], detail) for s, (report, detail) in one.items()}
        else:
            per_seed = {s: calibrated_reports(scored[(name, s)], tests, multi, candidates, calibration) for s in seeds}
        row = f"{name}{CALIBRATED_SUFFIX}"
        reports[row] = [per_seed[s][0][fold] for fold in range(len(tests)) for s in seeds]
        details[row] = per_seed[seeds[0]][1]
    return details


CALIBRATED_SUFFIX = "+calibrated"  # a model next to the extractor, weighted per attribute on other folds' gold
SIGNIFICANCE_REFERENCES = ("text_extractor", "tea", "pv2tea")  # every variant is t-tested against these


def run_f1(report: dict[str, Any], score: str = "overall") -> float | None:
    """A run's ranked F1: over all rows (``"overall"``) or the mean over attributes (``"attribute_mean"``)."""
    block = report.get("constrained", report)
    if score == "overall":
        return block["overall"].get("f1")
    f1s = [a["overall"].get("f1") for a in block.get("by_attribute", {}).values()]
    kept = [x for x in f1s if x is not None]
    return sum(kept) / len(kept) if kept else None


def per_fold_f1(runs: list[dict[str, Any]], n_folds: int, score: str = "overall") -> list[float | None]:
    """Ranked F1 per fold (:func:`run_f1`), averaged over the fold's seeds (``runs`` are fold-major, as
    :func:`run_protocol` makes them)."""
    per = len(runs) // n_folds
    f1s = [run_f1(r, score) for r in runs]
    out = []
    for fold in range(n_folds):
        values = [x for x in f1s[fold * per : (fold + 1) * per] if x is not None]
        out.append(sum(values) / len(values) if values else None)
    return out


def add_fold_ttests(
    summaries: dict[str, Any], reports: dict[str, list[dict[str, Any]]], n_folds: int, score: str = "overall"
) -> None:
    """Paired t-tests over folds (ranked F1, :func:`run_f1`) of every variant against the extractor, TEA and PV2TEA,
    in place: the folds hold different products, so a fold is one paired observation (undefined with one fold)."""
    if any(ref in reports for ref in SIGNIFICANCE_REFERENCES):
        scores = {name: per_fold_f1(runs, n_folds, score) for name, runs in reports.items()}
        add_ttests(summaries, scores, SIGNIFICANCE_REFERENCES)


def _log_f1(report: dict[str, Any]) -> str:
    """A run's F1 for the log line: open, and ranked among the options when it was."""
    f1 = report["overall"]["f1"]
    constrained = report.get("constrained", {}).get("overall", {}).get("f1")
    return f"{f1:.2f}" + (f" (ranked among options {constrained:.2f})" if constrained is not None else "")


def _cell(stat: dict[str, float | None]) -> str:
    return fmt_stat(stat, digits=1)


def format_tables(results: dict[str, Any]) -> str:
    """Markdown tables per domain: every row's ranked and open scores with its fold t-tests, where the ranked answers
    depart from the extractor's, the calibrated rows' details, and the ranked F1 per attribute."""
    lines = []
    for domain, variants in results["domains"].items():
        lines += [f"### {domain}", ""]
        lines += _scores_table(variants)
        lines += _departures_table(variants)
        calibrated = {name: s["calibration"] for name, s in variants.items() if "calibration" in s}
        if calibrated:
            lines += _calibrated_f1_table(calibrated)
            lines += _calibrated_weights_table(calibrated)
        lines += _per_attribute_table(variants)
        lines.append("")
    return "\n".join(lines)


def _scores_table(variants: dict[str, Any]) -> list[str]:
    """Every row's ranked and open scores, with its fold t-tests against the references."""
    lines = markdown_table(
        [
            "variant",
            "runs",
            *(f"{m} ranked" for m in ("F1", "Acc", "P", "R")),
            "F1 open",
            "Acc open",
            *(f"p vs {ref}" for ref in ("extractor", "tea", "pv2tea")),
        ],
        [
            [
                name,
                s["runs"],
                *(_cell(s["constrained"][m]) for m in ("f1", "accuracy", "precision", "recall")),
                _cell(s["open"]["f1"]),
                _cell(s["open"]["accuracy"]),
                *(fmt_p(s.get(f"ttest_vs_{ref}")) for ref in SIGNIFICANCE_REFERENCES),
            ]
            for name, s in variants.items()
        ],
    )
    return [
        *lines,
        "",
        "p: two-sided paired t-test over folds on ranked F1 (– with one fold or for the reference itself).",
    ]


def _departures_table(variants: dict[str, Any]) -> list[str]:
    """Where the ranked answers depart from the extractor's (nothing when no row counted them)."""
    moved = {name: s["constrained"]["departures"] for name, s in variants.items() if "departures" in s["constrained"]}
    if not moved:
        return []
    lines = [
        "",
        "Where the ranked answers depart from the extractor's (its weak labels kept to the options), "
        "counted over all runs (rows × runs): fixed = the model is right where the extractor is wrong, "
        "broke = the reverse; net % = 100 · (fixed − broke) / rows, the accuracy difference; either = "
        "accuracy of an oracle choosing the right one of the two per row.",
        "",
    ]
    return lines + markdown_table(
        ["variant", "rows × runs", "changed", "fixed", "broke", "neither", "net %", "fix rate", "either"],
        [
            [
                name,
                d["n"],
                d["changed"],
                d["fixed"],
                d["broke"],
                d["neither"],
                "–" if not d["n"] else f"{100.0 * d['net'] / d['n']:+.1f}",
                "–" if d["fix_rate"] is None else f"{d['fix_rate']:.1f}",
                "–" if d["either"] is None else f"{d['either']:.1f}",
            ]
            for name, d in moved.items()
        ],
    )


def _calibrated_f1_table(calibrated: dict[str, Any]) -> list[str]:
    """The calibrated rows' ranked F1 by the size of the gold sample calibrated on and by the guard's z."""
    first = next(iter(calibrated.values()))
    sizes = list(first["sample_size_f1"])
    zs = list(first["guard_z_f1"])
    objective = first.get("objective", "accuracy")  # older runs chose by accuracy
    chosen_by = "balanced accuracy" if objective == "balanced" else "accuracy"
    lines = [
        "",
        "Calibrated rows (`+calibrated`): each fold's model next to the extractor, the model's share "
        "λ per attribute fitted on the other folds' held-out gold rows (with one fold: each half of its "
        "held-out products on the other half's gold), chosen by " + chosen_by + " (`pv2tea calibrate "
        "--objective "
        + objective
        + "`; λ = 0 keeps the extractor's answer). F1 ranked by the size of the gold sample calibrated on (rows drawn "
        "from that pool, mean over folds × draws) and by the guard's z (the whole pool):",
        "",
    ]
    return lines + markdown_table(
        ["row", *(f"n = {n}" for n in sizes), *(f"z = {z}" for z in zs)],
        [
            [
                name,
                *(f"{c['sample_size_f1'][n]:.1f}" for n in sizes),
                *(f"{c['guard_z_f1'][z]:.1f}" for z in zs),
            ]
            for name, c in calibrated.items()
        ],
    )


def _calibrated_weights_table(calibrated: dict[str, Any]) -> list[str]:
    """The calibrated rows' λ deployed per attribute and fold, and whether the model read the photo."""
    lines = [
        "",
        "λ deployed per attribute and fold (0: the extractor's answer), and whether the model read the "
        "photo (yes) or answered with it withheld (no: with the photo it was not better beyond noise on the "
        "sample; – : a model without a visual path):",
        "",
    ]
    return lines + markdown_table(
        ["row", "attribute", "λ per fold", "photo per fold"],
        [
            [
                name,
                attribute,
                ", ".join("–" if w is None else f"{w:g}" for w in weights),
                ", ".join(
                    "–" if p is None else ("yes" if p else "no")
                    for p in (c.get("image", {}).get(attribute) or [None] * len(weights))
                ),
            ]
            for name, c in calibrated.items()
            for attribute, weights in c["model_weight"].items()
        ],
    )


def _per_attribute_table(variants: dict[str, Any]) -> list[str]:
    """Every row's ranked F1 per attribute."""
    attrs = sorted({a for s in variants.values() for a in s["constrained"]["by_attribute"]})
    names = list(variants)
    lines = ["", "Per attribute, F1 ranked among options:", ""]
    return lines + markdown_table(
        ["attribute", *names],
        [
            [
                a,
                *(
                    _cell(variants[n]["constrained"]["by_attribute"].get(a, {}).get("f1", {"mean": None}))
                    for n in names
                ),
            ]
            for a in attrs
        ],
    )
