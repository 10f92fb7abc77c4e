"""docs/results.md is the page docs/hooks/results.py generates from docs/results/*.json, and every result file
holds what the page shows of a run (its date, command, environment and tables)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "docs" / "results"
RESULT_FILES = sorted(RESULTS_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def results():
    path = ROOT / "docs" / "hooks" / "results.py"
    spec = importlib.util.spec_from_file_location("pv2tea_docs_results", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_committed_page_is_the_generated_one(results):
    page = results.generate(RESULTS_DIR)
    committed = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert page == committed, (
        "docs/results.md differs from the page generated from docs/results/*.json: run `make results`"
    )


def test_check_mode_agrees(results):
    assert results.main(["--check"]) == 0


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_every_result_file_has_the_required_keys(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("title", "date", "version", "command", "environment", "tables", "notes"):
        assert key in data, f"{path.name}: missing key {key!r}"
    assert data["command"] and all(isinstance(line, str) for line in data["command"]), path.name
    for key in ("cpu", "cores", "memory", "load"):
        assert key in data["environment"], f"{path.name}: environment has no {key!r}"
    assert data["tables"], f"{path.name}: no table"
    for table in data["tables"]:
        assert table["columns"] and table["rows"], f"{path.name}: {table.get('title')!r} is empty"
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), f"{path.name}: {table['title']!r}"


def test_the_page_answers_each_question_and_keeps_the_linked_anchors(results):
    page = results.generate(RESULTS_DIR)
    for anchor in ("demo-catalog", "implicitave", "fashion-product-images", "speed-and-resources"):
        assert f"{{#{anchor}}}" in page, f"#{anchor} is linked from other pages"
    for path in RESULT_FILES:
        assert f"(results/{path.name})" in page, f"{path.name} is not shown"


def test_what_the_image_adds_is_computed_from_the_rows(results):
    result = json.loads((RESULTS_DIR / "implicitave.json").read_text(encoding="utf-8"))
    table = results.image_table(result)
    assert table["rows"][-1][1:] == ["**−0.5**", "**−0.7**", "**+1.0**"]  # 60.4 − 60.9, 65.0 − 65.7, 65.3 − 64.3


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(RESULTS_DIR / "demo.json", folder / "demo.json")
    return folder


@pytest.mark.parametrize("key", ["date", "command", "environment", "tables"])
def test_a_missing_key_names_the_file_and_the_key(results, tmp_path, key):
    folder = _copy(tmp_path)
    data = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    del data[key]
    (folder / "broken.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(results.ResultsError, match=rf"broken\.json: missing key '{key}'"):
        results.generate(folder)


def test_malformed_files_name_the_file_and_what_is_wrong(results, tmp_path, capsys):
    folder = _copy(tmp_path)
    data = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    data["tables"][0]["rows"][0] = data["tables"][0]["rows"][0][:-1]
    (folder / "short_row.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(results.ResultsError, match=r"short_row\.json: tables\[0\] .*key 'rows': row 0"):
        results.generate(folder)

    (folder / "short_row.json").unlink()
    (folder / "bad_syntax.json").write_text('{"title": "x",', encoding="utf-8")
    with pytest.raises(results.ResultsError, match=r"bad_syntax\.json: not valid JSON"):
        results.generate(folder)
    assert results.main(["--dir", str(folder), "--out", str(tmp_path / "page.md")]) == 2
    assert "bad_syntax.json" in capsys.readouterr().err
    assert not (tmp_path / "page.md").exists()

    (folder / "bad_syntax.json").unlink()
    data = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    data["environment"]["cores"] = "two"
    (folder / "bad_env.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(results.ResultsError, match=r"bad_env\.json: environment: key 'cores' must be int"):
        results.generate(folder)


def test_renamed_rows_and_flags_show_their_current_name_and_the_files_stay_as_measured(results):
    committed = (ROOT / "docs" / "results" / "implicitave.json").read_text()
    assert '"text_pretrain+calibrated"' in committed  # the file is not rewritten
    page = (ROOT / "docs" / "results.md").read_text()
    assert "| warm_start+calibrated |" in page and "text_pretrain" not in page
    assert "--warm-start-epochs 3" in page and "--text-pretrain" not in page
    assert results.current_names({"x": ["text_pretrain", "my_text_pretrain", "--text-pretrain-x"]}) == {
        "x": ["warm_start", "my_text_pretrain", "--text-pretrain-x"]  # whole names only
    }


def test_kept_labels_rows_and_flag_show_their_current_name_and_the_files_stay_as_measured(results):
    demo = (ROOT / "docs" / "results" / "demo.json").read_text()
    assert "--keep-grounded" in demo  # the file is not rewritten
    page = (ROOT / "docs" / "results.md").read_text()
    assert "pv2tea+kept_labels" in page
    assert "pv2tea predict --keep-labels" in page and "keep_grounded" not in page and "keep-grounded" not in page
    assert results.current_names({"pv2tea+keep_grounded": ["--keep-grounded", "keep_grounded_test_report.json"]}) == {
        "pv2tea+kept_labels": ["--keep-labels", "keep_grounded_test_report.json"]  # whole names only
    }
