"""`pv2tea evaluate` reads its file as a stream: chunk by chunk it gives the report that scoring every row at once
gives, never loads the whole file, and refuses rows without gold (naming the first) or invalid rows before any
prediction."""

from __future__ import annotations

import json
from pathlib import Path

from pv2tea.cli import evaluate as evaluate_command
from pv2tea.cli import main
from pv2tea.data import validate
from pv2tea.data.validate import load_dataset
from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.inference.predictor import Predictor
from pv2tea.models import checkpoint as ckpt
from pv2tea.train.loop import multi_value_attributes


def _answers(records, *args, **kwargs):
    """A stand-in model: right on about half the rows (by id), a wrong value on the others."""
    return [list(r.gold) if sum(map(ord, r.id)) % 2 else ["not-a-value"] for r in records]


def test_chunked_evaluation_equals_scoring_every_row_at_once(tiny_trained, tmp_path, monkeypatch):
    model, catalog = tiny_trained
    data = catalog["train"]  # the synthetic rows carry gold and source
    records = load_dataset(data, require_label=False).records
    multi = {**ckpt.read_json(model, ckpt.PREPROCESS_FILE).get("multi_value", {})}
    for attr, several in multi_value_attributes(records).items():
        multi[attr] = multi.get(attr, False) or several
    expected = source_aware_report(
        [
            Example(tuple(r.gold), tuple(p), r.source, r.attribute, multi.get(r.attribute, False))
            for r, p in zip(records, _answers(records))
        ]
    )
    assert 0 < expected["overall"]["f1"] < 100

    def whole_file(*args, **kwargs):
        raise AssertionError("evaluate loaded the whole file")

    chunks: list[int] = []
    monkeypatch.setattr(validate, "load_dataset", whole_file)
    monkeypatch.setattr(Predictor, "predict", lambda self, chunk, *a, **k: chunks.append(len(chunk)) or _answers(chunk))
    monkeypatch.setattr(evaluate_command, "EVALUATE_CHUNK_ROWS", 7)  # several chunks, the last one short
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sum(chunks) == len(records) and max(chunks) == 7 and len(chunks) > 2
    assert report["skipped_rows"] == 0
    assert {k: v for k, v in report.items() if k != "skipped_rows"} == json.loads(json.dumps(expected))


def test_rows_without_gold_or_invalid_rows_stop_it_before_predicting(tiny_trained, tmp_path, capsys, monkeypatch):
    model, catalog = tiny_trained
    folder = Path(catalog["test"]).parent
    rows = [json.loads(line) for line in open(catalog["test"])]
    rows = [{**r, "images": [str(folder / i) for i in r["images"]]} for r in rows]  # the copies live elsewhere
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k not in ("gold", "source")}) + "\n" for r in rows)
    )
    loads = []
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: loads.append(a)))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(no_gold)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{len(rows)} row(s) have no 'gold' value (first: {rows[0]['id']})" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "text": 5} if i == 2 else r) + "\n" for i, r in enumerate(rows)))
    assert main(["evaluate", "--model", str(model), "--data", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "row 3" in err and "text" in err
    assert loads == []
