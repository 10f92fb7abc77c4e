"""Batch prediction into a JSON Lines file that survives a crash.

Rows are predicted in chunks; each chunk's lines are appended to ``OUT.partial`` and flushed to disk before the
next chunk starts, so an interrupted job loses at most the chunk in flight. Re-running with ``resume=True``
skips the rows whose ids the partial file already holds (a line torn by the crash is dropped and redone) and
continues; when every row is written the partial file is renamed to ``OUT``. An uninterrupted run and an
interrupted-then-resumed run write the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pv2tea.data.schema import Record
from pv2tea.decoding import fusion
from pv2tea.decoding.calibration import Calibration
from pv2tea.inference.predictor import Predictor, prediction_rows

if TYPE_CHECKING:  # only for annotations: the extractor's libraries load when --extractor is used
    from pv2tea.baselines import TextExtractor


@dataclass
class BatchResult:
    written: int  # rows predicted by this call
    resumed: int  # rows found already written in the partial file
    kept: int  # rows (of both) that kept their grounded label (keep_grounded)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """The complete lines of a partial file by id; a torn last line (no newline, or not JSON) is cut off."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    rows: dict[str, dict[str, Any]] = {}
    good = 0
    for line in data[:end].splitlines(keepends=True):
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, TypeError, KeyError):
            break  # a corrupt line: keep what precedes it
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def predict_to_file(
    predictor: Predictor,
    records: Sequence[Record],
    out: str | Path,
    *,
    batch_size: int = 32,
    num_beams: int | None = None,
    candidates: Mapping | None = None,
    keep_grounded: bool = False,
    chunk_size: int = 4096,
    resume: bool = False,
    progress: bool = True,
    extractor: TextExtractor | None = None,
    extractor_weight: float = 1.0,
    calibration: Calibration | None = None,
) -> BatchResult:
    """Predict every record into ``out`` (JSON Lines, rows of :func:`prediction_rows`), chunk by chunk.

    With ``extractor`` (and ``candidates``) each chunk's candidate ranking is fused with the extractor's class
    probabilities (:mod:`pv2tea.decoding.fusion`), each attribute weighted by its ``calibration`` when given
    (:mod:`pv2tea.decoding.calibration`).

    Raises:
        ValueError: ``OUT.partial`` exists (an interrupted run) and ``resume`` is false, or it holds ids that
            ``records`` does not (it was written for other input).
    """
    fusion.check_fusion(candidates, extractor)
    out = Path(out)
    partial = partial_path(out)
    done: dict[str, dict[str, Any]] = {}
    if partial.exists():
        if not resume:
            raise ValueError(
                f"{partial} holds the predictions of an interrupted run; pass --resume to continue "
                f"it, or delete it to start over"
            )
        done = _read_partial(partial)
        ids = {r.id for r in records}
        stale = [i for i in done if i not in ids]
        if stale:
            raise ValueError(
                f"{partial} was written for other input: it holds id '{stale[0]}'"
                f"{f' and {len(stale) - 1} more' if len(stale) > 1 else ''} that the data does not; "
                f"delete it to start over"
            )
    todo = [r for r in records if r.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = sum(bool(row.get("kept_label")) for row in done.values())
    with (
        open(partial, "a") as f,
        tqdm(
            total=len(records), initial=len(records) - len(todo), desc="predict", unit="row", disable=not progress
        ) as bar,
    ):
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            priors = extractor.value_probabilities(chunk) if extractor is not None else None
            preds = predictor.predict(
                chunk,
                batch_size,
                num_beams,
                candidates=candidates,
                priors=priors,
                prior_weight=extractor_weight,
                calibration=calibration,
            )
            rows = prediction_rows(chunk, preds, keep_grounded)
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())  # on disk before the next chunk: a crash loses at most one chunk
            kept += sum(bool(row.get("kept_label")) for row in rows)
            bar.update(len(chunk))
    os.replace(partial, out)
    return BatchResult(written=len(todo), resumed=len(records) - len(todo), kept=kept)
