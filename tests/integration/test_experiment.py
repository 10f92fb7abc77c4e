"""The experiment runner, the report command and weak labelling at micro size (tiny random models)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import tiny_overrides
from png_checks import assert_drawn_png
from pv2tea.cli import main
from pv2tea.data.synth import make_catalog
from pv2tea.data.validate import load_dataset as load_rows
from pv2tea.eval.metrics import source_aware_report as report_of
from pv2tea.experiment import gold_examples, paired_ttest, summarize
from pv2tea.inference.predictor import Predictor
from pv2tea.train.loop import multi_value_attributes


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict[str, Path]:
    return make_catalog(tmp_path_factory.mktemp("exp_catalog"), n_products=20, seed=5, image_size=64)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_experiment_runs_resumes_and_reports(catalog, tiny_text_ckpt, tmp_path, capsys):
    out = tmp_path / "exp"
    args = [
        "experiment",
        "--train",
        str(catalog["train"]),
        "--val",
        str(catalog["val"]),
        "--test",
        str(catalog["test"]),
        "--out",
        str(out),
        "--variants",
        "weak_labels,text_extractor,tea,pv2tea,pv2tea_cls,wo_smooth",
        "--seeds",
        "2",
        "--config",
        "cpu",
        *_sets(tiny_overrides(tiny_text_ckpt) + ["train.epochs=1"]),
    ]
    assert main(args) == 0
    tables = capsys.readouterr().out
    for row in (
        "| pv2tea |",
        "| tea |",
        "| text_extractor |",
        "| weak_labels |",
        "Table 7",
        "R@Mean",
        "| pv2tea+kept_labels |",
        "| tea+kept_labels |",
        "| pv2tea+no_images |",
    ):
        assert row in tables, row
    summary = json.loads((out / "experiment.json").read_text())["summary"]
    assert summary["pv2tea"]["seeds"] == 2 and summary["weak_labels"]["seeds"] == 1
    assert "retrieval" in summary["pv2tea"] and "retrieval" not in summary["tea"]
    for name in ("tea", "pv2tea", "pv2tea_cls", "wo_smooth"):
        for seed in (0, 1):
            assert (out / name / f"seed_{seed}" / "test_report.json").is_file()
            # finished: the final model stays, the resumable checkpoint is pruned to save disk
            assert (out / name / f"seed_{seed}" / "final").is_dir()
            assert not (out / name / f"seed_{seed}" / "checkpoint").exists()
    assert "pv2tea+kept_labels" in summary and "text_extractor+kept_labels" not in summary
    assert "tea+no_images" not in summary and "| tea+no_images |" not in tables  # TEA reads no image
    assert json.loads((out / "tea" / "seed_0" / "test_report.json").read_text())["without_images"] is None
    # a second invocation reuses every finished run (no retraining: the files stay untouched); a report from
    # before kept labels existed gets it from the final model
    report_path = out / "pv2tea" / "seed_0" / "test_report.json"
    report = json.loads(report_path.read_text())
    kept_report = report.pop("kept_labels")
    no_images = report.pop("without_images")
    moved = report.pop("departures")  # where the answers left the weak labels of the test rows
    assert (
        moved["n"] == report["overall"]["n"]
        and moved["fixed"] + moved["broke"] + moved["neither"] + moved["both"] == moved["changed"]
    )
    report_path.write_text(json.dumps(report))
    stamp = (out / "pv2tea" / "seed_0" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "pv2tea" / "seed_0" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads(report_path.read_text())["kept_labels"] == kept_report
    assert json.loads(report_path.read_text())["without_images"] == no_images  # added back from the final model
    # it is the model's report on the test rows with their images withheld
    test_rows = load_rows(catalog["test"]).records
    assert any(r.images for r in test_rows)
    blind = Predictor.from_checkpoint(out / "pv2tea" / "seed_0" / "final").predict(
        [replace(r, images=()) for r in test_rows], 8
    )
    multi = multi_value_attributes(load_rows(catalog["train"]).records + load_rows(catalog["val"]).records + test_rows)
    assert report_of(gold_examples(test_rows, blind, multi))["overall"] == no_images["overall"]
    assert summary["pv2tea+no_images"]["overall"]["f1"]["mean"] == pytest.approx(
        (
            no_images["overall"]["f1"]
            + json.loads((out / "pv2tea" / "seed_1" / "test_report.json").read_text())["without_images"]["overall"][
                "f1"
            ]
        )
        / 2
    )
    assert json.loads(report_path.read_text())["departures"] == moved  # added back from the final model
    report = json.loads(report_path.read_text())
    del report["departures"]  # only the departures missing: they alone are added back
    report_path.write_text(json.dumps(report))
    assert main(args) == 0
    assert json.loads(report_path.read_text())["departures"] == moved
    # other settings into the same --out: refused with the setting named, nothing reused or overwritten
    capsys.readouterr()
    assert main([*args, "--set", "schemes.alpha=0.3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "was made with other settings" in err and "schemes.alpha: 0.4 there, 0.3 now" in err
    assert (out / "pv2tea" / "seed_0" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    # a run saved before a setting existed has that setting's default: still the same run
    import yaml

    saved_path = out / "pv2tea" / "seed_0" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    assert saved["schemes"].pop("mention_removal") == "words"
    saved_path.write_text(yaml.safe_dump(saved))
    assert main(args) == 0
    saved["schemes"]["mention_dropout"] = 0.5  # the preset's 0.25 is asked for
    saved_path.write_text(yaml.safe_dump(saved))
    assert main(args) == 2

    assert main(["report", str(out)]) == 0
    html = (out / "report" / "index.html").read_text()
    assert "variants_f1.png" in html
    assert_drawn_png(out / "report" / "variants_f1.png")
    assert_drawn_png(out / "report" / "retrieval_vs_alpha.png")  # alpha 0.4 (pv2tea) and 0 (wo_smooth)
    run = out / "pv2tea" / "seed_0"
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps({"pattern": ["solid", "striped"]}))
    preds = tmp_path / "preds.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "final"),
                "--data",
                str(catalog["test"]),
                "--out",
                str(preds),
                "--candidates",
                str(cands),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert all(r["values"] in (["solid"], ["striped"]) for r in rows if r["attribute"] == "pattern")
    # --keep-labels: the rows whose weak label the text states keep it, the model answers the others; scored,
    # that is the experiment's kept_labels report
    from pv2tea.data.validate import load_dataset
    from pv2tea.eval.metrics import Example, source_aware_report
    from pv2tea.regularize.grounding import label_in_text

    plain, kept = tmp_path / "plain.jsonl", tmp_path / "kept.jsonl"
    assert main(["predict", "--model", str(run / "final"), "--data", str(catalog["test"]), "--out", str(plain)]) == 0
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "final"),
                "--data",
                str(catalog["test"]),
                "--out",
                str(kept),
                "--keep-labels",
            ]
        )
        == 0
    )
    assert "label(s) kept" in " ".join(capsys.readouterr().err.split())  # rich may wrap the line
    test = load_dataset(catalog["test"]).records
    plain_rows = [json.loads(x) for x in plain.read_text().splitlines()]
    kept_rows = [json.loads(x) for x in kept.read_text().splitlines()]
    flags = [label_in_text(r.label, r.text) for r in test]
    assert any(flags) and not all(flags)
    for r, a, b, flag in zip(test, plain_rows, kept_rows, flags):
        assert b["kept_label"] is flag and "kept_label" not in a
        assert b["values"] == (list(r.label) if flag else a["values"])
    multi = {"color": True, "pattern": False}
    assert (
        source_aware_report(
            [
                Example(tuple(r.gold), tuple(b["values"]), r.source, r.attribute, multi[r.attribute])
                for r, b in zip(test, kept_rows)
            ]
        )
        == kept_report
    )
    unlabelled = Path(catalog["test"]).with_name("unlabelled.jsonl")  # next to the images its paths are relative to
    unlabelled.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k not in ("label", "gold")}) + "\n"
            for line in Path(catalog["test"]).read_text().splitlines()
        )
    )
    capsys.readouterr()
    assert (
        main(["predict", "--model", str(run / "final"), "--data", str(unlabelled), "--out", str(kept), "--keep-labels"])
        == 2
    )
    assert "needs the rows' existing values in a 'label' field" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert (
        main(["evaluate", "--model", str(run / "final"), "--data", str(catalog["test"]), "--candidates", str(bad)]) == 2
    )
    assert main(["report", str(run), "--data", str(unlabelled)]) == 0  # masks need images, not labels
    for name in ("learning_curves.png", "source_aware.png", "attribute_f1.png", "attention_masks.png"):
        assert_drawn_png(run / "report" / name)
    imageless = Path(catalog["test"]).with_name("imageless.jsonl")
    imageless.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "images"}) + "\n"
            for line in Path(catalog["test"]).read_text().splitlines()
        )
    )
    capsys.readouterr()
    assert main(["report", str(run), "--data", str(imageless)]) == 2
    assert f"{imageless}: no valid row with an image" in " ".join(capsys.readouterr().err.split())
    # a partly invalid file: the masks are drawn from its valid rows and the skipped ones are counted, not dropped
    partly = Path(catalog["test"]).with_name("partly.jsonl")
    lines = Path(catalog["test"]).read_text().splitlines()
    partly.write_text("\n".join([json.dumps({**json.loads(lines[0]), "text": ""})] + lines[1:]) + "\n")
    capsys.readouterr()
    assert main(["report", str(run), "--data", str(partly)]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert f"{partly}: 1 invalid row(s) skipped" in said and "row 1, field 'text'" in said
    assert "1 invalid row(s) of" in (run / "report" / "index.html").read_text()


def test_unknown_variant_is_refused(catalog, tmp_path, capsys):
    code = main(
        [
            "experiment",
            "--train",
            str(catalog["train"]),
            "--val",
            str(catalog["val"]),
            "--test",
            str(catalog["test"]),
            "--out",
            str(tmp_path / "x"),
            "--variants",
            "pv2tea,nonsense",
        ]
    )
    assert code == 2 and "nonsense" in capsys.readouterr().err


def test_report_on_a_non_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a pv2tea run" in capsys.readouterr().err


def test_paired_ttest_literal():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641
    result = paired_ttest([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert result["t"] == pytest.approx(3.4641, abs=1e-3) and result["p"] == pytest.approx(0.0742, abs=1e-3)
    assert paired_ttest([1.0, 2.0], [0.0, 1.0])["p"] is None  # constant difference: undefined
    assert paired_ttest([1.0], [0.0])["p"] is None


def test_summarize_mean_std():
    reports = {
        "pv2tea": [{"overall": {"f1": 50.0}}, {"overall": {"f1": 60.0}}],
        "tea": [{"overall": {"f1": 40.0}}, {"overall": {"f1": 40.0}}],
    }
    s = summarize(reports)
    assert s["pv2tea"]["overall"]["f1"] == {"mean": 55.0, "std": pytest.approx(7.0711, abs=1e-4)}
    assert s["tea"]["overall"]["f1"]["std"] == 0.0


def test_weak_label_command(catalog, tmp_path, capsys):
    out = tmp_path / "weak.jsonl"
    assert (
        main(
            [
                "weak-label",
                "--train",
                str(catalog["train"]),
                "--data",
                str(catalog["test"]),
                "--out",
                str(out),
                "--kind",
                "tfidf",
                "--save",
                str(tmp_path / "extractor"),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    original = [json.loads(x) for x in Path(catalog["test"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in original]
    assert all(r["gold"] == o["gold"] and r["label"] for r, o in zip(rows, original))
    said = capsys.readouterr().out
    assert "text extractor vs gold" in said
    # each label carries the extractor's confidence, and the gold rows say how well it tells right from wrong
    assert all(0 < r["label_weight"] <= 1 for r in rows) and len({r["label_weight"] for r in rows}) > 1
    assert f"vs its labels being right, {len(rows)} gold row(s): ROC AUC" in " ".join(said.split())
    assert sum(int(line.split()[2]) for line in said.splitlines() if line.strip().startswith("confidence 0")) == len(
        rows
    )  # the bins hold every row once
    again = tmp_path / "weak2.jsonl"
    assert (
        main(
            [
                "weak-label",
                "--train",
                str(catalog["train"]),
                "--data",
                str(catalog["test"]),
                "--out",
                str(again),
                "--load",
                str(tmp_path / "extractor"),
            ]
        )
        == 0
    )
    assert [json.loads(x)["label"] for x in again.read_text().splitlines()] == [r["label"] for r in rows]


def test_weak_label_writes_out_of_fold_soft_labels_of_the_training_rows(catalog, tmp_path, capsys):
    soft = tmp_path / "train_soft.parquet"
    args = ["weak-label", "--train", str(catalog["train"]), "--data", str(catalog["test"]), "--kind", "tfidf"]
    assert main([*args, "--out", str(tmp_path / "weak.jsonl"), "--soft-train", str(soft), "--soft-folds", "3"]) == 0
    said = capsys.readouterr()
    assert "with out-of-fold soft labels (3 folds" in " ".join((said.out + said.err).split())
    train_rows = load_rows(catalog["train"]).records
    rows = load_rows(soft).records  # read back with the soft labels validated
    assert [(r.id, r.label) for r in rows] == [(r.id, r.label) for r in train_rows]
    assert all(r.label_probs for r in rows)
    assert all(len(r.label_probs) > 1 and all(0 <= p <= 1 for _, p in r.label_probs) for r in rows)
    # refused with a saved extractor: the soft labels need extractors fitted without each row
    load = [*args, "--out", str(tmp_path / "w2.jsonl"), "--load", str(tmp_path), "--soft-train", str(soft)]
    assert main(load) == 2
    assert "cannot be used with --load" in capsys.readouterr().err


def test_experiment_refuses_test_rows_without_gold(catalog, tmp_path, capsys):
    rows = [json.loads(line) for line in catalog["test"].read_text().splitlines() if line.strip()]
    for row in rows[1:]:
        row.pop("gold", None)
        row.pop("source", None)
    test = catalog["test"].with_name("test_without_gold.jsonl")  # beside the images its rows name
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "experiment",
        "--train",
        str(catalog["train"]),
        "--val",
        str(catalog["val"]),
        "--test",
        str(test),
        "--out",
        str(tmp_path / "exp"),
        "--variants",
        "weak_labels",
        "--seeds",
        "1",
    ]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{test}: {len(rows) - 1} row(s) have no 'gold' value (first: {rows[1]['id']})" in err
    assert not (tmp_path / "exp").exists()  # refused before anything is written
