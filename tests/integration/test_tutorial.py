"""The tutorial's Python (docs/guides/tutorial.md, step 5) runs as written: the calibrated deployment scored from the
``pv2tea`` facade gives the answers ``pv2tea predict --calibration`` writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pv2tea.cli import main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "tutorial.md"


def test_the_tutorials_python_scores_the_calibrated_deployment(tiny_trained, tmp_path, monkeypatch, capsys):
    from pv2tea.baselines import TfidfExtractorConfig, TfidfTextExtractor
    from pv2tea.data.validate import load_dataset

    final, catalog = tiny_trained
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "final").symlink_to(final)
    shutil.copytree(catalog["test"].parent, tmp_path / "catalogue")  # its rows name images relative to the file
    (tmp_path / "catalogue" / catalog["test"].name).rename(tmp_path / "catalogue" / "gold_test.jsonl")
    records = load_dataset(catalog["test"], require_label=False).records
    values = {a: sorted({v for r in records if r.attribute == a for v in (*r.gold, *r.label)}) for a in ("pattern",)}
    (tmp_path / "catalogue" / "values.json").write_text(json.dumps(values))
    TfidfTextExtractor(TfidfExtractorConfig()).fit(load_dataset(catalog["train"]).records).save(tmp_path / "extractor")
    monkeypatch.chdir(tmp_path)
    deploy = ["--model", "runs/a/final", "--extractor", "extractor/", "--candidates", "catalogue/values.json"]
    gold = ["--data", "catalogue/gold_test.jsonl"]
    assert main(["calibrate", *deploy, *gold, "--out", "calibration.json", "--min-rows", "1"]) == 0
    assert main(["predict", *deploy, *gold, "--out", "predictions.jsonl", "--calibration", "calibration.json"]) == 0
    written = [row["values"] for row in map(json.loads, Path("predictions.jsonl").read_text().splitlines())]
    capsys.readouterr()

    step = PAGE.read_text().split("## 5.", 1)[1].split("## 6.", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", step, flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(PAGE), "exec"), namespace)

    assert namespace["answers"] == written
    report = namespace["report"]
    assert report["overall"]["n"] == len(records)
    printed = capsys.readouterr().out.split()
    assert printed == [str(report["overall"]["f1"]), str(report["by_source"]["image"]["f1"]), str(report["gap"]["f1"])]
