"""The benchmark's calibrated rows: each fold's model next to the extractor, weighted per attribute by a calibration
fitted on the gold of the *other* folds' held-out products (cross-fitting; :mod:`pv2tea.decoding.calibration`).

A catalog team calibrates on a gold sample of products the model did not train on. In k-fold cross-validation the
other folds' held-out rows are such a sample for fold k: each was scored by a model that did not train on it, and
none is fold k's. How large the sample must be is measured by drawing smaller samples from the same pool.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pv2tea.data.products import split_key
from pv2tea.data.schema import Record
from pv2tea.decoding.calibration import (
    Calibration,
    CalibrationConfig,
    Choice,
    ScoredRow,
    calibrated_answer,
    fit_calibration,
    scored_rows,
)
from pv2tea.eval.metrics import departures, source_aware_report
from pv2tea.experiment import constrain_to_candidates, gold_examples, load_predictor
from pv2tea.models.checkpoint import warm_start_fingerprint

SCORES_FILE = "candidate_scores.json"
SAMPLE_SIZES = (25, 50, 100, 200)  # gold rows drawn for the sample-size curve (besides the whole pool)
SAMPLE_DRAWS = 5
GUARD_Z = (0.0, 1.0, 1.645)  # the guard's sensitivity (the default is CalibrationConfig.z)

FoldRows = list[ScoredRow | None]  # one entry per held-out record (None: no candidate list)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def fold_scored_rows(
    final: Path,
    records: Sequence[Record],
    candidates: Mapping,
    priors: Sequence[Mapping[str, float]],
    cache: Path,
    prior_correction: float | None = None,
    trained_on: Sequence[Record] | None = None,
) -> FoldRows:
    """The held-out records as scored rows of the model in ``final`` and the extractor (cached in ``cache``, keyed
    by the model's weights, the records, the extractor's probabilities and the ranking's ``prior_correction``;
    :func:`pv2tea.experiment.load_predictor` says what ``prior_correction`` and ``trained_on`` do)."""
    key = {
        "model_sha256": warm_start_fingerprint(final),
        "products_sha256": _sha([r.id for r in records]),
        "priors_sha256": _sha([dict(p) for p in priors]),
        "candidates_sha256": _sha(candidates),
        "prior_correction": prior_correction,
        "photo_withheld_scores": True,  # rows of a model with a visual path are also scored with their photos withheld
    }
    stored = None
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = None  # damaged: scored again
    if not (isinstance(stored, dict) and all(stored.get(k) == v for k, v in key.items())):
        predictor = load_predictor(final, prior_correction, trained_on)
        batch_size = predictor.model.cfg.train.eval_batch_size
        scores = predictor.candidate_log_probs(records, candidates, batch_size)
        blind: list = [None] * len(records)
        if predictor.model.visual is not None:  # what the model answers from the text alone, to weigh the photo
            blind = predictor.candidate_log_probs([replace(r, images=()) for r in records], candidates, batch_size)
        stored = {
            **key,
            "rows": [
                None
                if s is None
                else {
                    "candidates": list(s[0]),
                    "model": s[1].tolist(),
                    **({} if t is None else {"text": t[1].tolist()}),
                }
                for s, t in zip(scores, blind)
            ],
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(stored, allow_nan=False))
    scores = [None if row is None else (row["candidates"], np.array(row["model"])) for row in stored["rows"]]
    text = [
        None if row is None or "text" not in row else (row["candidates"], np.array(row["text"]))
        for row in stored["rows"]
    ]
    rows, left_out = scored_rows(records, scores, priors, text if any(t is not None for t in text) else None)
    kept = iter(rows)  # in record order, without the left-out records
    skipped = set(left_out)
    return [None if i in skipped else next(kept) for i in range(len(records))]


def _answers(rows: FoldRows, records: Sequence[Record], calibration: Calibration) -> list[list[str]]:
    """Calibrated answers; a row without candidates keeps its weak label (the extractor's answer)."""
    return [list(r.label) if row is None else [calibrated_answer(row, calibration)] for row, r in zip(rows, records)]


def _report(
    records: Sequence[Record], answers: list[list[str]], multi: dict[str, bool], candidates: Mapping
) -> dict[str, Any]:
    examples = gold_examples(records, answers, multi)
    report = source_aware_report(examples)
    if any(r.label for r in records):
        report["departures"] = departures(
            examples, constrain_to_candidates([r.label for r in records], records, candidates)
        )
    return report


def _pool(folds: Sequence[FoldRows], k: int) -> list[ScoredRow]:
    return [row for j, rows in enumerate(folds) if j != k for row in rows if row is not None]


def _chosen(chosen: Sequence[Calibration], rows: FoldRows) -> dict[str, dict[str, list]]:
    """Per attribute, each calibration's λ (``model_weight``) and whether it reads the photo (``image``; None for
    every calibration when no row was scored without its photo: a model without a visual path)."""
    attributes = sorted({a for c in chosen for a in c.attributes})
    weighed = any(row is not None and row.model_text is not None for row in rows)

    def per(attribute: str, field: str) -> list:
        return [getattr(c.attributes[attribute], field) if attribute in c.attributes else None for c in chosen]

    return {
        "model_weight": {a: per(a, "model_weight") for a in attributes},
        "image": {a: per(a, "image") if weighed else [None] * len(chosen) for a in attributes},
    }


def calibrated_reports(
    folds: Sequence[FoldRows],
    tests: Sequence[Sequence[Record]],
    multi: dict[str, bool],
    candidates: Mapping,
    config: CalibrationConfig | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per fold, the report of the calibrated answers (calibration fitted on the other folds' rows), and what the
    calibrations chose and how the result moves with the sample size and the guard (``details``)."""
    config = config or CalibrationConfig()
    reports, chosen = [], []
    for k, (rows, test) in enumerate(zip(folds, tests)):
        calibration = fit_calibration(_pool(folds, k), config)
        report = _report(test, _answers(rows, test, calibration), multi, candidates)
        report["calibration"] = calibration.to_json()
        reports.append(report)
        chosen.append(calibration)

    def f1_with(k: int, sample: list[ScoredRow], cfg: CalibrationConfig) -> float:
        calibration = fit_calibration(sample, cfg)
        return source_aware_report(gold_examples(tests[k], _answers(folds[k], tests[k], calibration), multi))[
            "overall"
        ]["f1"]

    curve: dict[str, float] = {}
    for n in SAMPLE_SIZES:
        scores = []
        for k in range(len(folds)):
            pool = _pool(folds, k)
            if n >= len(pool):
                continue
            for draw in range(SAMPLE_DRAWS):
                pick = np.random.default_rng(draw).choice(len(pool), size=n, replace=False)
                scores.append(f1_with(k, [pool[i] for i in sorted(pick)], config))
        if scores:
            curve[str(n)] = float(np.mean(scores))
    curve["all"] = float(np.mean([r["overall"]["f1"] for r in reports]))
    guard = {
        f"{z:g}": float(np.mean([f1_with(k, _pool(folds, k), replace(config, z=z)) for k in range(len(folds))]))
        for z in GUARD_Z
    }
    pool_sizes = [len(_pool(folds, k)) for k in range(len(folds))]
    return reports, {
        "sample_size_f1": curve,
        "guard_z_f1": guard,
        **_chosen(chosen, [row for rows in folds for row in rows]),
        "pool_rows": pool_sizes,
        "z": config.z,
        "min_rows": config.min_rows,
        "objective": config.objective,
        "draws": SAMPLE_DRAWS,
    }


def product_halves(records: Sequence[Record]) -> list[int]:
    """0 or 1 per record, a stable hash of its product (:func:`~pv2tea.data.products.split_key`): a product's rows
    fall in the same half wherever they are."""
    return [hashlib.sha256(split_key(r).encode()).digest()[0] % 2 for r in records]


def halves_calibrated_report(
    rows: FoldRows,
    test: Sequence[Record],
    multi: dict[str, bool],
    candidates: Mapping,
    config: CalibrationConfig | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The calibrated report of one fold when it is the only one (the quick protocol): its held-out products split
    in two halves by product, each half answered with the calibration fitted on the other half's gold (cross-fitting
    within the fold), the report over both. Returns (report, details as :func:`calibrated_reports` gives them)."""
    config = config or CalibrationConfig()
    half = product_halves(test)
    answers: list[list[str]] = [[] for _ in test]
    chosen: list[Calibration] = []
    pools = []
    for h in (0, 1):
        pool = [row for row, k in zip(rows, half) if k != h and row is not None]
        pools.append(len(pool))
        if pool:
            calibration = fit_calibration(pool, config)
        else:  # every product in one half: nothing to calibrate the other on, so the extractor answers it
            calibration = Calibration(Choice(0.0, 0.0, 0, 0, 0, 0, 0, False, "pooled"), {}, config)
        chosen.append(calibration)
        mine = [i for i, k in enumerate(half) if k == h]
        for i, a in zip(mine, _answers([rows[i] for i in mine], [test[i] for i in mine], calibration)):
            answers[i] = a
    report = _report(test, answers, multi, candidates)
    report["calibration"] = [c.to_json() for c in chosen]
    return report, {
        "sample_size_f1": {"all": report["overall"]["f1"]},
        "guard_z_f1": {},
        **_chosen(chosen, rows),
        "pool_rows": pools,
        "z": config.z,
        "min_rows": config.min_rows,
        "objective": config.objective,
        "draws": 0,
        "halves": True,  # calibrated within the one fold: each half of its products on the other half's gold
    }
