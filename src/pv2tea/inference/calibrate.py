"""Calibrating a trained model against the text extractor it is deployed next to (``pv2tea calibrate``).

The model and the extractor both score each gold row's candidate list; :func:`pv2tea.decoding.calibration.fit_calibration`
then picks, per attribute, the model's guarded share λ and, for a model with a visual path, whether it reads the
photo (the sample is scored a second time with its photos withheld). :func:`calibrate_model` does the scoring and the fit and
records in the calibration's ``meta`` what it was fitted on (the model's weights fingerprint among them, which
``pv2tea predict --calibration`` checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from pv2tea.baselines import load_extractor
from pv2tea.data.schema import Record
from pv2tea.decoding.calibration import Calibration, CalibrationConfig, fit_calibration, scored_rows, today
from pv2tea.inference.predictor import Predictor
from pv2tea.models.checkpoint import warm_start_fingerprint


def _ignore(records: Sequence[Record]) -> None:
    pass


def calibrate_model(
    model: Path,
    extractor: Path,
    records: Sequence[Record],
    candidates: Mapping,
    config: CalibrationConfig | None = None,
    *,
    batch_size: int = 32,
    sample: str = "",
    skipped_rows: int = 0,
    on_left_out: Callable[[Sequence[Record]], None] = _ignore,
) -> Calibration:
    """Fit per-attribute model shares for the model folder ``model`` against the saved extractor ``extractor``.

    Args:
        model: A model folder (a run's ``final/``).
        extractor: A saved text extractor (``pv2tea weak-label ... --save DIR``).
        records: The gold sample: rows with ``gold`` values the model did not train on.
        candidates: ``{category: {attribute: [values]}}`` or ``{attribute: [values]}``: the value lists ranked.
        config: The grid of λ, the guard's z and the fewest rows an attribute needs for its own λ.
        batch_size: Rows the model scores at a time.
        sample: The sample's name (its file), recorded in the calibration's ``meta``.
        skipped_rows: Invalid rows of the sample left out before, recorded in ``meta``.
        on_left_out: Called, before the fit, with the rows that have no candidate list (they are left out of it),
            if any.

    Returns:
        The calibration (not yet saved: :meth:`Calibration.save <pv2tea.decoding.calibration.Calibration.save>`);
        ``meta["sample_rows"]`` is the number of rows it was fitted on.

    Raises:
        pv2tea.decoding.calibration.CalibrationError: No row has a candidate list.
    """
    text_extractor = load_extractor(extractor)
    predictor = Predictor.from_checkpoint(model)
    scores = predictor.candidate_log_probs(records, candidates, batch_size)
    blind = None
    if predictor.model.visual is not None and any(r.images for r in records):  # to weigh the photo per attribute
        blind = predictor.candidate_log_probs([replace(r, images=()) for r in records], candidates, batch_size)
    rows, left_out = scored_rows(records, scores, text_extractor.value_probabilities(records), blind)
    if left_out:
        on_left_out([records[i] for i in left_out])
    return fit_calibration(
        rows,
        config,
        meta={
            "created": today(),
            "model": str(model),
            "model_sha256": warm_start_fingerprint(model),
            "extractor": str(extractor),
            "sample": sample,
            "sample_rows": len(rows),
            "rows_without_candidates": len(left_out),
            "skipped_rows": skipped_rows,
        },
    )
