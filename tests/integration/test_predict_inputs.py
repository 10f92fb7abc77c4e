"""`pv2tea predict` and `pv2tea data validate` on input that is not there or holds nothing:
a clear error and a non-zero exit, and predict says so before it loads the model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pv2tea.cli import main
from pv2tea.inference.predictor import Predictor


def _empty_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header.csv").write_text("id,text,category,attribute,label\n")
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet"
    )
    return [tmp_path / n for n in ("empty.jsonl", "blank.jsonl", "header.csv", "e.parquet")]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the inputs must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Predictor, "from_checkpoint", refuse)


def test_an_empty_file_says_no_rows_and_fails(tmp_path, capsys, no_model):
    for path in _empty_files(tmp_path):
        assert main(["data", "validate", str(path), "--unlabelled", "--no-images"]) != 0, path
        captured = capsys.readouterr()
        assert "no rows" in captured.err and "all rows valid" not in captured.out, path
        out = tmp_path / "predictions.jsonl"
        assert main(["predict", "--model", str(tmp_path), "--data", str(path), "--out", str(out)]) == 2, path
        assert "no rows" in capsys.readouterr().err and not out.exists()


def test_predict_checks_the_data_file_before_loading_the_model(tmp_path, capsys, no_model):
    (tmp_path / "rows.txt").write_text('{"id": "a"}\n')
    for data, says in [(tmp_path / "missing.jsonl", "not found"), (tmp_path / "rows.txt", "unsupported dataset file")]:
        code = main(["predict", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "p.jsonl")])
        assert code == 2 and says in capsys.readouterr().err
