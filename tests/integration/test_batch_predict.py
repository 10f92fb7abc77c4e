"""`pv2tea predict` in chunks: the same file as one pass, and an interrupted job resumes without loss."""

from __future__ import annotations

import json

import pytest

from pv2tea.cli import main
from pv2tea.data.validate import load_dataset
from pv2tea.inference.predictor import Predictor, prediction_rows


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tiny_trained):
    model, catalog = tiny_trained
    return model, catalog["train"]


def test_chunks_resume_after_a_crash_and_equal_one_pass(trained, tmp_path, monkeypatch, capsys):
    model, data = trained
    records = load_dataset(data).records
    predictor = Predictor.from_checkpoint(model)
    expected = "".join(
        json.dumps(row) + "\n" for row in prediction_rows(records, predictor.predict(records, 8), keep_labels=True)
    )
    assert len(records) > 12
    out = tmp_path / "preds.jsonl"
    args = [
        "predict",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--keep-labels",
        "--batch-size",
        "8",
        "--chunk-size",
        "5",
    ]
    assert main(args) == 0
    assert out.read_text() == expected and not (tmp_path / "preds.jsonl.partial").exists()

    # a crash during the third chunk: the first two chunks (10 rows) are on disk, plus a torn line
    real = Predictor.predict
    calls: list[int] = []
    crash_at = [3]  # the call that fails; later runs do not crash
    on_disk: list[int] = []

    def crashing(self, chunk, *a, **k):
        calls.append(len(chunk))
        if len(calls) == crash_at[0]:
            # what another process sees now: the earlier chunks are flushed, not sitting in a buffer
            on_disk.append(len((tmp_path / "again.jsonl.partial").read_text().splitlines()))
            raise Crash
        return real(self, chunk, *a, **k)

    monkeypatch.setattr(Predictor, "predict", crashing)
    out2 = tmp_path / "again.jsonl"
    args2 = [*args[:6], str(out2), *args[7:]]
    with pytest.raises(Crash):
        main(args2)
    partial = tmp_path / "again.jsonl.partial"
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 10 and on_disk == [10] and not out2.exists()
    with open(partial, "a") as f:
        f.write('{"id": "torn')
    capsys.readouterr()
    assert main(args2) == 2  # without --resume: refused, nothing overwritten
    assert "pass --resume" in " ".join(capsys.readouterr().err.split())
    calls.clear()
    crash_at[0] = 0
    assert main([*args2, "--resume"]) == 0
    assert sum(calls) == len(records) - 10  # only the rows not on disk were predicted again
    assert out2.read_text() == expected and not partial.exists()
    assert "(10 from the interrupted run)" in " ".join(capsys.readouterr().err.split())  # console: stderr


def test_a_partial_file_from_other_input_is_refused(trained, tmp_path, capsys):
    model, data = trained
    out = tmp_path / "p.jsonl"
    (tmp_path / "p.jsonl.partial").write_text(json.dumps({"id": "elsewhere", "values": []}) + "\n")
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out), "--resume"]) == 2
    assert "holds id 'elsewhere'" in " ".join(capsys.readouterr().err.split())


def test_predict_fused_with_a_saved_extractor(trained, tmp_path, capsys):
    from pv2tea.baselines import TfidfTextExtractor
    from pv2tea.eval.normalize import normalize_value

    model, data = trained
    records = load_dataset(data).records
    extractor_dir = TfidfTextExtractor().fit(records).save(tmp_path / "extractor")
    values = {
        a: sorted({v for r in records if r.attribute == a for v in r.label}) for a in {r.attribute for r in records}
    }
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps(values))
    out = tmp_path / "fused.jsonl"
    base = ["predict", "--model", str(model), "--data", str(data), "--candidates", str(cands)]
    assert main([*base, "--out", str(out), "--extractor", str(extractor_dir)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(len(r["values"]) == 1 and r["values"][0] in values[r["attribute"]] for r in rows)
    # with a dominant extractor weight the answers are the extractor's most probable candidates
    strong = tmp_path / "strong.jsonl"
    assert main([*base, "--out", str(strong), "--extractor", str(extractor_dir), "--extractor-weight", "1000"]) == 0
    extractor = TfidfTextExtractor.load(extractor_dir)
    expected = [
        max(values[r.attribute], key=lambda v: p.get(normalize_value(v), 0.0))
        for r, p in zip(records, extractor.value_probabilities(records))
    ]
    assert [json.loads(line)["values"][0] for line in strong.read_text().splitlines()] == expected
    capsys.readouterr()
    assert main([*base[:5], "--out", str(tmp_path / "x.jsonl"), "--extractor", str(extractor_dir)]) == 2
    assert "needs candidate lists (--candidates)" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--out", str(tmp_path / "y.jsonl"), "--extractor", str(tmp_path / "nowhere")]) == 2
    assert "not a saved text extractor" in " ".join(capsys.readouterr().err.split())
