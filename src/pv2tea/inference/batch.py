"""Batch prediction into a JSON Lines file that survives a crash.

Rows are predicted in chunks; each chunk's lines are appended to ``OUT.partial`` and flushed to disk before the
next chunk starts, so an interrupted job loses at most the chunk in flight. Re-running with ``resume=True``
skips the rows whose ids the partial file already holds (a line torn by the crash is dropped and redone) and
continues; when every row is written the partial file is renamed to ``OUT``. An uninterrupted run and an
interrupted-then-resumed run write the same file. The rows may come as a stream: only the chunk being predicted
and the ids already written are held in memory. :mod:`pv2tea.inference.sharded` runs this on each process of a
multi-process job, one part file each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from pv2tea.data.schema import Record
from pv2tea.decoding import fusion
from pv2tea.decoding.calibration import Calibration
from pv2tea.inference.predictor import Predictor, prediction_rows
from pv2tea.renamed import renamed_keyword

if TYPE_CHECKING:  # only for annotations: the extractor's libraries load when --extractor is used
    from pv2tea.baselines import TextExtractor


@dataclass
class BatchResult:
    """What one batch prediction did: the rows it predicted, found already written, and kept labels."""

    written: int  # rows predicted by this call
    resumed: int  # rows found already written in the partial file
    kept: int  # rows (of both) that kept their label (keep_labels)


def partial_path(out: Path) -> Path:
    """The file a prediction writes into before it is complete (``OUT.partial``; ``--resume`` continues it)."""
    return out.with_name(out.name + ".partial")


def _read_partial(path: Path) -> tuple[set[str], int]:
    """The ids of the complete lines of a partial file and how many of them kept their label; a torn last
    line (no newline, or not JSON) is cut off."""
    ids: set[str] = set()
    kept = 0
    good = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # everything after the last newline is a torn write
            try:
                row = json.loads(line)
                ids.add(row["id"])
            except (json.JSONDecodeError, TypeError, KeyError):
                break  # a corrupt line: keep what precedes it
            kept += bool(row.get("kept_label"))
            good += len(line)
    if good < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids, kept


def _stale_error(partial: Path, stale: list[str]) -> ValueError:
    return ValueError(
        f"{partial} was written for other input: it holds id '{stale[0]}'"
        f"{f' and {len(stale) - 1} more' if len(stale) > 1 else ''} that the data does not; "
        f"delete it to start over"
    )


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


def predict_to_file(
    predictor: Predictor,
    records: Iterable[Record],
    out: str | Path,
    *,
    batch_size: int = 32,
    num_beams: int | None = None,
    candidates: Mapping | None = None,
    keep_labels: bool = False,
    chunk_size: int = 4096,
    resume: bool = False,
    progress: bool = True,
    extractor: TextExtractor | None = None,
    extractor_weight: float = 1.0,
    calibration: Calibration | None = None,
    total: int | None = None,
    known_ids: Container[str] | None = None,
    keep_grounded: bool | None = None,
) -> BatchResult:
    """Predict every record into ``out`` (JSON Lines, rows of :func:`prediction_rows`), chunk by chunk.

    ``records`` may be a stream (e.g. :func:`pv2tea.data.validate.iter_records`): one chunk is held at a time.
    ``total`` sizes the progress bar, and ``known_ids`` (every id of ``records``; a sequence's own) lets a
    resumed run refuse a partial file of other input before predicting; without them a stream is checked when
    it ends, before ``out`` is written.

    With ``extractor`` (and ``candidates``) each chunk's candidate ranking is fused with the extractor's class
    probabilities (:mod:`pv2tea.decoding.fusion`), each attribute weighted by its ``calibration`` when given
    (:mod:`pv2tea.decoding.calibration`).

    With ``keep_labels`` (kept labels) a row whose existing label its text states keeps it
    (:func:`prediction_rows`); ``keep_grounded`` is its old name (it warns once).

    Raises:
        ValueError: ``OUT.partial`` exists (an interrupted run) and ``resume`` is false, or it holds ids that
            ``records`` does not (it was written for other input).
    """
    keep_labels = renamed_keyword("keep_grounded", "keep_labels", keep_grounded, keep_labels, False)
    fusion.check_fusion(candidates, extractor)
    if isinstance(records, Sequence):
        total = len(records) if total is None else total
        known_ids = {r.id for r in records} if known_ids is None else known_ids
    out = Path(out)
    partial = partial_path(out)
    done: set[str] = set()
    kept = 0
    if partial.exists():
        if not resume:
            raise ValueError(
                f"{partial} holds the predictions of an interrupted run; pass --resume to continue "
                f"it, or delete it to start over"
            )
        done, kept = _read_partial(partial)
        if known_ids is not None:
            stale = [i for i in done if i not in known_ids]
            if stale:
                raise _stale_error(partial, stale)
    matched: set[str] = set()  # the ids of done rows the records hold

    def todo() -> Iterator[Record]:
        for record in records:
            if record.id in done:
                matched.add(record.id)
            else:
                yield record

    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with (
        open(partial, "a") as f,
        tqdm(total=total, initial=len(done), desc="predict", unit="row", disable=not progress) as bar,
    ):
        for chunk in _chunks(todo(), chunk_size):
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
            rows = prediction_rows(chunk, preds, keep_labels)
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())  # on disk before the next chunk: a crash loses at most one chunk
            kept += sum(bool(row.get("kept_label")) for row in rows)
            written += len(chunk)
            bar.update(len(chunk))
    if len(matched) < len(done):
        raise _stale_error(partial, [i for i in done if i not in matched])
    os.replace(partial, out)
    return BatchResult(written=written, resumed=len(done), kept=kept)
