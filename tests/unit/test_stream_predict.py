"""Batch prediction from a stream of records (inference/batch.py, inference/sharded.py) with a stand-in model: the
records are pulled a chunk at a time, a resumed stream skips what is on disk, and a partial file of other input is
refused even when the ids are only known at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pv2tea.data.readers import write_records
from pv2tea.data.schema import DataValidationError, Record
from pv2tea.inference.batch import partial_path, predict_to_file
from pv2tea.inference.sharded import JobError, predict_file


class EchoPredictor:
    """Answers each row with its own text; records what it was asked."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.chunks: list[list[str]] = []
        self.fail_at_call = fail_at_call

    def predict(self, chunk, *args, **kwargs):
        self.chunks.append([r.id for r in chunk])
        if len(self.chunks) == self.fail_at_call:
            raise KeyboardInterrupt  # an interruption between two chunks
        return [[r.text] for r in chunk]


def _records(n: int) -> list[Record]:
    return [Record(f"p{i}", f"text {i}", (), "mug", "color", ("red",)) for i in range(1, n + 1)]


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_a_stream_is_pulled_one_chunk_at_a_time(tmp_path: Path) -> None:
    pulled: list[str] = []

    def stream():
        for record in _records(10):
            pulled.append(record.id)
            yield record

    predictor = EchoPredictor()
    seen_when_predicting: list[int] = []
    predict = predictor.predict
    predictor.predict = lambda chunk, *a, **k: seen_when_predicting.append(len(pulled)) or predict(chunk, *a, **k)
    result = predict_to_file(predictor, stream(), tmp_path / "out.jsonl", chunk_size=4, progress=False)
    assert seen_when_predicting == [4, 8, 10]  # no more than one chunk ahead of the model
    assert (result.written, result.resumed) == (10, 0)
    assert _ids(tmp_path / "out.jsonl") == [f"p{i}" for i in range(1, 11)]


def test_a_resumed_stream_predicts_only_the_rows_not_on_disk(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(EchoPredictor(fail_at_call=3), iter(_records(10)), out, chunk_size=3, progress=False)
    assert _ids(partial_path(out)) == [f"p{i}" for i in range(1, 7)]
    with open(partial_path(out), "a") as f:
        f.write('{"id": "p7", "val')  # torn by the crash
    with pytest.raises(ValueError, match="pass --resume"):
        predict_to_file(EchoPredictor(), iter(_records(10)), out, chunk_size=3, progress=False)
    again = EchoPredictor()
    result = predict_to_file(again, iter(_records(10)), out, chunk_size=3, resume=True, progress=False)
    assert again.chunks == [["p7", "p8", "p9"], ["p10"]] and (result.written, result.resumed) == (4, 6)
    assert _ids(out) == [f"p{i}" for i in range(1, 11)] and not partial_path(out).exists()


def test_a_partial_file_of_other_input_is_refused_before_or_after_the_stream(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    partial_path(out).write_text(json.dumps({"id": "elsewhere", "values": []}) + "\n")
    early = EchoPredictor()
    with pytest.raises(ValueError, match="holds id 'elsewhere'"):  # ids known: before any prediction
        predict_to_file(early, iter(_records(5)), out, resume=True, known_ids={f"p{i}" for i in range(1, 6)})
    assert early.chunks == []
    with pytest.raises(ValueError, match="holds id 'elsewhere'"):  # a bare stream: at its end, out not written
        predict_to_file(EchoPredictor(), iter(_records(5)), out, resume=True, progress=False)
    assert not out.exists()


def test_predict_file_checks_every_row_first_and_streams_the_good_ones(tmp_path: Path) -> None:
    rows = [{"id": r.id, "text": r.text, "category": "mug", "attribute": "color"} for r in _records(8)]
    rows[5]["category"] = ""  # row 6
    data = write_records(rows, tmp_path / "d.jsonl")
    predictor = EchoPredictor()
    with pytest.raises(DataValidationError, match="row 6, field 'category'"):
        predict_file(predictor, data, tmp_path / "out.jsonl", chunk_size=3, progress=False)
    assert predictor.chunks == []  # nothing predicted before the whole file was checked
    result = predict_file(predictor, data, tmp_path / "out.jsonl", skip_invalid=True, chunk_size=3, progress=False)
    assert predictor.chunks == [["p1", "p2", "p3"], ["p4", "p5", "p7"], ["p8"]]
    assert (result.written, result.scan.bad_rows, result.scan.n_valid) == (7, {6}, 7)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["values"]) for r in lines] == [(f"p{i}", [f"text {i}"]) for i in (1, 2, 3, 4, 5, 7, 8)]

    def no_labels(scan):
        raise ValueError(f"{scan.n_labelled} labelled rows")

    with pytest.raises(JobError, match="0 labelled rows"):
        predict_file(predictor, data, tmp_path / "x.jsonl", skip_invalid=True, check_input=no_labels)
