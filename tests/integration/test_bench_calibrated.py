"""The benchmark's calibrated rows (cross-fitted over folds) and `pv2tea calibrate` / `predict --calibration`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_bench_implicitave import root  # noqa: F401  (the made-up ImplicitAVE layout, a fixture)

from conftest import tiny_overrides
from pv2tea.cli import main


def test_two_fold_bench_adds_cross_fitted_calibrated_rows(root, tiny_text_ckpt, tmp_path, capsys):  # noqa: F811
    from pv2tea.bench.calibrated import SCORES_FILE
    from pv2tea.data.validate import load_dataset
    from pv2tea.inference.predictor import Predictor

    out = tmp_path / "bench"
    args = [
        "bench",
        "implicitave",
        str(root),
        "--out",
        str(out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--variants",
        "pv2tea",
        "--no-gold-ceiling",
        "--warm-start-epochs",
        "1",
        "--text-rows",
        "4",
        *[x for o in tiny_overrides(tiny_text_ckpt) for x in ("--set", o)],
    ]
    assert main(args) == 0
    home = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["domains"]["Home"]
    assert {"pv2tea+calibrated", "warm_start+calibrated"} <= set(home)
    saved = json.loads((out / "bench.json").read_text())["domains"]["Home"]
    calibrated = saved["pv2tea+calibrated"]
    assert calibrated["runs"] == 2  # one per fold
    # the toy extractor is right on every row: no model share can gain on it, so the guard keeps the extractor
    assert home["text_extractor"]["accuracy"] == 100.0
    assert home["pv2tea+calibrated"]["accuracy"] == 100.0 and home["warm_start+calibrated"]["accuracy"] == 100.0
    detail = calibrated["calibration"]
    assert all(w == 0.0 for weights in detail["model_weight"].values() for w in weights)
    runs = out / "runs" / "Home"
    held = [
        json.loads((runs / f"fold_{k}" / "pv2tea" / "seed_0" / "test_report.json").read_text())["overall"]["n"]
        for k in range(2)
    ]
    assert detail["pool_rows"] == [held[1], held[0]]  # fold k is calibrated on the other fold's rows only
    assert set(detail["guard_z_f1"]) == {"0", "1", "1.645"} and "all" in detail["sample_size_f1"]
    assert "Calibrated rows" in (out / "tables.md").read_text()
    # the cached candidate scores are the model's log-probabilities over each row's options
    cache = json.loads((runs / "fold_0" / "pv2tea" / "seed_0" / SCORES_FILE).read_text())
    products = load_dataset(out / "data" / "Home" / "eval.jsonl", require_label=False).records
    by_id = {r.id: r for r in products}
    fold0 = [by_id[i] for i in _fold_ids(runs, 0, products)]
    options = json.loads((out / "data" / "Home" / "candidates.json").read_text())
    fresh = Predictor.from_checkpoint(runs / "fold_0" / "pv2tea" / "seed_0" / "final").candidate_log_probs(
        fold0, options
    )
    assert len(cache["rows"]) == len(fold0)
    for row, (cands, lp) in zip(cache["rows"], fresh):
        assert row["candidates"] == cands and np.allclose(row["model"], lp)
        assert np.exp(lp).sum() == pytest.approx(1.0)
    # and, to weigh the photo per attribute, the same model's scores with the photos withheld
    blind = Predictor.from_checkpoint(runs / "fold_0" / "pv2tea" / "seed_0" / "final").candidate_log_probs(
        [replace(r, images=()) for r in fold0], options
    )
    assert any(r.images for r in fold0)
    for row, (cands, lp) in zip(cache["rows"], blind):
        assert row["candidates"] == cands and np.allclose(row["text"], lp)
    assert set(detail["image"]) == set(detail["model_weight"])
    assert all(isinstance(p, bool) for reads in detail["image"].values() for p in reads)
    text_only = saved["warm_start+calibrated"]["calibration"]["image"]
    assert all(p is None for reads in text_only.values() for p in reads)  # no visual path: no photo to weigh
    assert "photo per fold" in (out / "tables.md").read_text()
    stamp = (runs / "fold_0" / "pv2tea" / "seed_0" / SCORES_FILE).stat().st_mtime_ns
    assert detail["objective"] == "accuracy" and "--objective accuracy" in (out / "tables.md").read_text()
    assert main([*args, "--calibration-objective", "balanced"]) == 0  # re-run: scores reused, calibrated anew
    assert (runs / "fold_0" / "pv2tea" / "seed_0" / SCORES_FILE).stat().st_mtime_ns == stamp
    again = json.loads((out / "bench.json").read_text())["domains"]["Home"]["pv2tea+calibrated"]["calibration"]
    assert again["objective"] == "balanced" and "--objective balanced" in (out / "tables.md").read_text()


def test_the_protocol_refuses_an_unknown_calibration_objective():
    from pv2tea.bench.protocol import ProtocolConfig

    assert ProtocolConfig().calibration_objective == "accuracy"
    with pytest.raises(ValueError, match="--calibration-objective must be one of balanced, accuracy, got 'f1'"):
        ProtocolConfig(calibration_objective="f1")  # type: ignore[arg-type]


def _fold_ids(runs, k, products):
    """The ids held out in fold k, in the benchmark's order (its product_folds over the weakly labelled rows)."""
    from pv2tea.bench.implicitave import product_folds

    return [products[i].id for i in sorted(product_folds(products, 2)[k])]


def test_calibrate_then_predict_with_the_calibration(tiny_trained, tmp_path, capsys):
    from pv2tea.baselines import TfidfExtractorConfig, TfidfTextExtractor
    from pv2tea.data.readers import write_records
    from pv2tea.data.validate import load_dataset
    from pv2tea.decoding.calibration import load_calibration

    final, catalog = tiny_trained
    # the gold sample: every row of the tiny catalogue, so that the model and the extractor disagree on some (the
    # share checks below could not fail on rows where they agree)
    records = [r for split in ("train", "val", "test") for r in load_dataset(catalog[split]).records]
    sample = write_records(records, tmp_path / "gold.jsonl")
    extractor_dir = tmp_path / "extractor"
    TfidfTextExtractor(TfidfExtractorConfig()).fit(load_dataset(catalog["train"]).records).save(extractor_dir)
    values = sorted({v for r in records if r.attribute == "pattern" for v in (*r.gold, *r.label)})
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps({"pattern": values}))
    out = tmp_path / "calibration.json"
    base = ["--model", str(final), "--extractor", str(extractor_dir), "--candidates", str(cands)]
    calibrate = ["calibrate", *base, "--data", str(sample), "--out", str(out), "--min-rows", "1", "--z", "0.25"]
    assert main(calibrate) == 0
    captured = capsys.readouterr()
    assert "no candidate list" in captured.err  # the color rows: counted, named, left to the model
    calibration = load_calibration(out)
    n_pattern = sum(r.attribute == "pattern" for r in records)
    assert calibration.meta["sample_rows"] == n_pattern
    assert calibration.meta["rows_without_candidates"] == len(records) - n_pattern
    assert calibration.attributes["pattern"].rows == n_pattern and "pattern" in captured.out
    # --z and --min-rows reach the calibration: saved with it, and the attribute (fewer rows than the default 20)
    # has its own choice rather than the pooled one
    assert (calibration.config.z, calibration.config.min_rows) == (0.25, 1) and n_pattern < 20
    assert calibration.attributes["pattern"].source == "attribute"
    # predict with it: pattern rows get the calibrated fused answer, computed here independently
    pred = tmp_path / "pred.jsonl"
    assert main(["predict", *base, "--data", str(sample), "--out", str(pred), "--calibration", str(out)]) == 0
    got = {row["id"]: row["values"] for row in map(json.loads, pred.read_text().splitlines())}
    from pv2tea.baselines import load_extractor
    from pv2tea.decoding.calibration import calibrated_answer, scored_rows
    from pv2tea.inference.predictor import Predictor

    pattern = [r for r in records if r.attribute == "pattern"]
    predictor = Predictor.from_checkpoint(final)
    rows, _ = scored_rows(
        pattern,
        predictor.candidate_log_probs(pattern, {"pattern": values}),
        load_extractor(extractor_dir).value_probabilities(pattern),
        predictor.candidate_log_probs([replace(r, images=()) for r in pattern], {"pattern": values}),
    )
    assert all(row.model_text is not None for row in rows) and any(r.images for r in pattern)
    # the photo moves the model's scores, so withholding it is seen in the answers checked below
    assert any(not np.allclose(row.model, row.model_text) for row in rows)
    disagree = sum(int(np.argmax(row.model)) != int(np.argmax(row.extractor)) for row in rows)
    assert 0 < disagree < len(rows), disagree  # shares 0 and 1 give other answers on these rows
    assert [got[r.id] for r in pattern] == [[calibrated_answer(row, calibration)] for row in rows]
    # a share of 0 gives the extractor's ranked answer, a share of 1 the model's ranked answer, with the photo or, where
    # the calibration does not trust it, without
    data = json.loads(out.read_text())
    for share, photo, expect in (
        (0.0, True, lambda row: int(np.argmax(row.extractor))),
        (1.0, True, lambda row: int(np.argmax(row.model))),
        (1.0, False, lambda row: int(np.argmax(row.model_text))),
    ):
        data["attributes"]["pattern"]["model_weight"] = share
        data["attributes"]["pattern"]["image"] = photo
        out.write_text(json.dumps(data))
        pred.unlink()
        assert main(["predict", *base, "--data", str(sample), "--out", str(pred), "--calibration", str(out)]) == 0
        got = {row["id"]: row["values"] for row in map(json.loads, pred.read_text().splitlines())}
        assert [got[r.id] for r in pattern] == [[row.candidates[expect(row)]] for row in rows]
    # usage errors are one clear line
    assert (
        main(
            [
                "predict",
                "--model",
                str(final),
                "--data",
                str(catalog["test"]),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--candidates",
                str(cands),
                "--calibration",
                str(out),
            ]
        )
        == 2
    )
    assert "needs --extractor" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert (
        main(
            [
                "predict",
                *base,
                "--data",
                str(catalog["test"]),
                "--out",
                str(tmp_path / "y.jsonl"),
                "--calibration",
                str(tmp_path / "bad.json"),
            ]
        )
        == 2
    )
    assert "bad.json" in capsys.readouterr().err


def test_a_ranking_change_rescores_finished_runs_without_retraining(root, tiny_text_ckpt, tmp_path, capsys):  # noqa: F811
    from pv2tea.data.validate import load_dataset
    from pv2tea.eval.metrics import source_aware_report
    from pv2tea.experiment import gold_examples, load_predictor

    out = tmp_path / "bench"
    args = [
        "bench",
        "implicitave",
        str(root),
        "--out",
        str(out),
        "--quick",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--variants",
        "tea",
        "--no-gold-ceiling",
        "--warm-start-epochs",
        "0",
        "--text-rows",
        "4",
        *[x for o in tiny_overrides(tiny_text_ckpt) for x in ("--set", o)],
    ]
    assert main([*args, "--set", "decoder.prior_correction=0"]) == 0
    run = out / "runs" / "Home" / "fold_0" / "tea" / "seed_0"
    assert json.loads((run / "test_report.json").read_text())["prior_correction"] == 0.0
    stamp = (run / "final" / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--set", "decoder.prior_correction=1"]) == 0  # only the ranking changes
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    report = json.loads((run / "test_report.json").read_text())
    assert report["prior_correction"] == 1.0
    # the ranked answers are those of the model with the correction, scored afresh here
    products = load_dataset(out / "data" / "Home" / "eval.jsonl", require_label=False).records
    test = [r for r in products if r.id in set(_fold_ids(None, 0, products))]
    options = json.loads((out / "data" / "Home" / "candidates.json").read_text())
    ranked = load_predictor(run / "final", 1.0).predict(test, candidates=options)
    expected = source_aware_report(gold_examples(test, ranked, {}))
    assert report["constrained"]["overall"]["f1"] == pytest.approx(expected["overall"]["f1"])


def test_the_service_answers_with_the_calibration(tiny_trained):
    from fastapi.testclient import TestClient
    from test_server import _inline

    from pv2tea.baselines import TfidfTextExtractor
    from pv2tea.data.validate import load_dataset
    from pv2tea.decoding.calibration import Calibration, Choice
    from pv2tea.inference.predictor import Predictor
    from pv2tea.serve.server import create_app

    final, catalog = tiny_trained
    predictor = Predictor.from_checkpoint(final)
    raw = [json.loads(line) for line in open(catalog["train"]).read().splitlines()][:12]
    records = load_dataset(catalog["train"]).records[:12]
    extractor = TfidfTextExtractor().fit(load_dataset(catalog["train"]).records)
    cands = {
        a: sorted({v for r in records if r.attribute == a for v in r.label}) for a in {r.attribute for r in records}
    }
    # the model alone on color, the extractor alone on pattern
    calibration = Calibration(
        Choice(0.0, 0.0, 0, 0, 0, 0, 0, False, "pooled"), {"color": Choice(1.0, 1.0, 30, 0, 0, 0, 0, True)}
    )
    client = TestClient(create_app(predictor, candidates=cands, extractor=extractor, calibration=calibration))
    response = client.post("/predict", json={"products": [_inline(r, catalog) for r in raw]})
    assert response.status_code == 200, response.text
    got = [a["values"] for a in response.json()["predictions"]]
    priors = extractor.value_probabilities(records)
    assert got == predictor.predict(records, candidates=cands, priors=priors, calibration=calibration)
    model_alone = predictor.predict(records, candidates=cands)
    for r, g, m, prior in zip(records, got, model_alone, priors):
        if r.attribute == "color":
            assert g == m
        else:  # the extractor's most probable option
            assert g == [max(cands[r.attribute], key=lambda c: prior.get(c.lower(), 0.0))]
    with pytest.raises(ValueError, match="needs --extractor"):
        create_app(predictor, candidates=cands, calibration=calibration)


def test_one_fold_is_calibrated_within_itself_each_half_on_the_other():
    """The quick protocol has one fold: each half of its held-out products is answered with the calibration fitted on
    the other half's gold, never on its own rows."""
    from pv2tea.bench.calibrated import halves_calibrated_report, product_halves
    from pv2tea.data.schema import Record
    from pv2tea.decoding.calibration import ScoredRow

    records, rows = [], []
    for i in range(120):
        for attribute in ("colour", "sleeve"):
            gold = "red"
            records.append(Record(f"p{i}-{attribute}", "t", (f"img/{i}.jpg",), "c", attribute, ("blue",), gold=(gold,)))
            # the model is right on every row, the extractor wrong: every half's calibration trusts the model
            rows.append(
                ScoredRow(attribute, ("red", "blue"), np.log([0.9, 0.1]), np.log([0.3, 0.7]), frozenset({gold}))
            )
    half = product_halves(records)
    assert set(half) == {0, 1}
    assert all(half[2 * i] == half[2 * i + 1] for i in range(120))  # a product's rows in one half
    report, detail = halves_calibrated_report(rows, records, {"colour": False, "sleeve": False}, {})
    assert detail["halves"] and detail["pool_rows"] == [half.count(1), half.count(0)]
    assert all(w == [pytest.approx(w[0])] * 2 and w[0] > 0 for w in detail["model_weight"].values())
    assert report["overall"]["f1"] == 100.0
    # a half whose own rows would say "trust the model" but whose other half says "keep the extractor" keeps the
    # extractor: the calibration is never fitted on the rows it answers
    flipped = [
        ScoredRow(r.attribute, r.candidates, r.model, r.extractor, frozenset({"blue"})) if k == 1 else r
        for r, k in zip(rows, half)
    ]
    flipped_records = [replace(r, gold=("blue",)) if k == 1 else r for r, k in zip(records, half)]
    report, detail = halves_calibrated_report(flipped, flipped_records, {"colour": False, "sleeve": False}, {})
    weights = detail["model_weight"]["colour"]
    assert weights[0] == 0.0 and weights[1] > 0  # half 0 calibrated on half 1 (model wrong there), and the reverse
    assert report["overall"]["accuracy"] == 0.0  # so each half gets the other half's choice, wrong on its own rows
