"""CLI paths pinned by value (issue 24): evaluate's report, --num-beams, weak-label --kind transformer, data synth,
the experiment table's t-test column and an interrupted experiment resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from conftest import tiny_overrides
from markov_decoder import BEAM, GREEDY, install_markov_decoder
from png_checks import assert_drawn_png
from pv2tea.cli import main
from pv2tea.data.synth import make_catalog
from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.inference.predictor import Predictor


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EVAL_ROWS = [
    {"id": "e1", "text": "red mug", "category": "mug", "attribute": "color", "gold": ["red"], "source": "image"},
    {"id": "e2", "text": "scarlet mug", "category": "mug", "attribute": "color", "gold": ["red"], "source": "text"},
    {
        "id": "e3",
        "text": "striped shirt",
        "category": "shirt",
        "attribute": "pattern",
        "gold": ["striped"],
        "source": "text",
    },
    {"id": "bad", "text": "   ", "category": "mug", "attribute": "color", "gold": ["red"], "source": "text"},
]
PREDS = {"e1": ["red", "white"], "e2": ["scarlet"], "e3": ["dotted"]}


def test_evaluate_report_merges_multi_value_applies_synonyms_and_counts_skips(tiny_trained, tmp_path, monkeypatch):
    """evaluate: color is multi-value by the checkpoint (each eval row has a single gold), so {red, white} ⊇ {red}
    is right; --synonyms makes 'scarlet' red; --skip-invalid drops the blank row and counts it."""
    final, _ = tiny_trained
    saved_multi = json.loads((final / "preprocess.json").read_text())["multi_value"]
    assert saved_multi == {"color": True, "pattern": False}
    data = _write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)
    synonyms = tmp_path / "syn.json"
    synonyms.write_text(json.dumps({"scarlet": "red"}))
    asked = []

    def known_predictions(self, records, batch_size, num_beams, progress=False, candidates=None):
        asked.append(([r.id for r in records], num_beams))
        return [PREDS[r.id] for r in records]

    monkeypatch.setattr(Predictor, "predict", known_predictions)
    assert main(["evaluate", "--model", str(final), "--data", str(data)]) == 2  # the blank row is refused
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(final),
                "--data",
                str(data),
                "--out",
                str(out),
                "--skip-invalid",
                "--synonyms",
                str(synonyms),
                "--num-beams",
                "3",
            ]
        )
        == 0
    )
    assert asked == [(["e1", "e2", "e3"], 3)]
    report = json.loads(out.read_text())
    assert report["skipped_rows"] == 1
    assert report["overall"]["n"] == 3
    assert report["overall"]["accuracy"] == pytest.approx(200 / 3)  # e1 (multi-value), e2 (synonym) right
    assert report["by_attribute"]["color"]["overall"]["accuracy"] == 100.0
    assert report["by_attribute"]["pattern"]["overall"]["accuracy"] == 0.0
    multi = {"color": True, "pattern": False}
    examples = [
        Example(tuple(r["gold"]), tuple(PREDS[r["id"]]), r["source"], r["attribute"], multi[r["attribute"]])
        for r in EVAL_ROWS[:3]
    ]
    expected = source_aware_report(examples, {"scarlet": "red"})
    assert {k: v for k, v in report.items() if k != "skipped_rows"} == json.loads(json.dumps(expected))
    without = tmp_path / "plain.json"
    assert main(["evaluate", "--model", str(final), "--data", str(data), "--out", str(without), "--skip-invalid"]) == 0
    assert json.loads(without.read_text())["overall"]["accuracy"] == pytest.approx(100 / 3)  # scarlet ≠ red


def test_num_beams_reaches_the_search_in_predict_and_evaluate(tiny_trained, tmp_path, monkeypatch):
    """With a decoder of known next-token probabilities, greedy answers "red green" and 2-beam search "blue dark":
    --num-beams must reach the search from both commands."""
    final, _ = tiny_trained
    install_markov_decoder(monkeypatch, final)
    rows = [{**r, "gold": [BEAM]} for r in EVAL_ROWS[:3]]
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    for beams, answer in ((None, GREEDY), ("2", BEAM)):
        out = tmp_path / f"preds_{beams}.jsonl"
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(final),
                    "--data",
                    str(data),
                    "--out",
                    str(out),
                    *(["--num-beams", beams] if beams else []),
                ]
            )
            == 0
        )
        assert [json.loads(x)["values"] for x in out.read_text().splitlines()] == [[answer]] * 3
        report = tmp_path / f"report_{beams}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    str(final),
                    "--data",
                    str(data),
                    "--out",
                    str(report),
                    *(["--num-beams", beams] if beams else []),
                ]
            )
            == 0
        )
        assert json.loads(report.read_text())["overall"]["accuracy"] == (100.0 if beams else 0.0)


def test_weak_label_with_the_transformer_extractor(tiny_text_ckpt, tmp_path, capsys):
    from pv2tea.baselines import TransformerTextExtractor, load_extractor
    from pv2tea.data.validate import load_dataset

    catalog = make_catalog(tmp_path / "catalog", n_products=10, seed=1, image_size=32)
    out, saved = tmp_path / "weak.jsonl", tmp_path / "extractor"
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
                "transformer",
                "--text-path",
                str(tiny_text_ckpt),
                "--epochs",
                "1",
                "--save",
                str(saved),
            ]
        )
        == 0
    )
    extractor = load_extractor(saved)
    assert isinstance(extractor, TransformerTextExtractor)
    assert extractor.config.text_path == str(tiny_text_ckpt) and extractor.config.epochs == 1
    written = [json.loads(x) for x in out.read_text().splitlines()]
    test = load_dataset(catalog["test"]).records
    assert [r["id"] for r in written] == [r.id for r in test]
    labels_and_confidence = extractor.predict_with_confidence(test)
    assert [r["label"] for r in written] == [list(v) for v, _ in labels_and_confidence]
    assert [r["label_weight"] for r in written] == [round(c, 4) for _, c in labels_and_confidence]
    assert "text extractor vs gold" in capsys.readouterr().out


def test_data_synth_from_the_cli_is_make_catalog(tmp_path, capsys):
    assert (
        main(
            ["data", "synth", "--out", str(tmp_path / "cli"), "--n-products", "10", "--seed", "3", "--image-size", "32"]
        )
        == 0
    )
    expected = make_catalog(tmp_path / "api", n_products=10, seed=3, image_size=32)
    for split in ("train", "val", "test"):
        assert (tmp_path / "cli" / f"{split}.jsonl").read_text() == Path(expected[split]).read_text()
    images = sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*.png"))
    assert images and images == sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.png"))
    assert all((tmp_path / "cli" / p).read_bytes() == (tmp_path / "api" / p).read_bytes() for p in images[:5])
    other = make_catalog(tmp_path / "seed4", n_products=10, seed=4, image_size=32)
    assert Path(other["train"]).read_text() != (tmp_path / "cli" / "train.jsonl").read_text()


def test_experiment_table_p_column_is_the_paired_t_test_against_pv2tea():
    from pv2tea.experiment import format_tables, summarize

    def run(f1: float) -> dict:
        return {"overall": {"precision": f1, "recall": f1, "f1": f1, "accuracy": f1}}

    pv2tea, tea, weak = [50.0, 54.0, 55.0], [48.0, 49.0, 53.0], [30.0]
    summary = summarize(
        {"pv2tea": [run(x) for x in pv2tea], "tea": [run(x) for x in tea], "weak_labels": [run(x) for x in weak]}
    )
    diff = [a - b for a, b in zip(pv2tea, tea)]  # 2, 5, 2
    mean = sum(diff) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 2 * stats.t.sf(abs(t), df=2)
    assert summary["tea"]["ttest_vs_pv2tea"]["t"] == pytest.approx(t)
    assert summary["tea"]["ttest_vs_pv2tea"]["p"] == pytest.approx(p)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in format_tables(summary).split("### Source-aware")[0].splitlines()
        if line.startswith("| ")
    }
    assert rows["tea"][-1] == f"{p:.3g}"
    assert rows["tea"][2] == "50.00 ± 2.65"  # F1 mean ± sample std
    assert rows["pv2tea"][-1] == "–" and rows["weak_labels"][-1] == "–"  # itself; a single seed


def test_interrupted_experiment_resumes_its_run(tiny_text_ckpt, tmp_path, monkeypatch):
    """An experiment killed mid-training continues the run from its checkpoint when re-run: only the remaining
    steps are trained, and the run's log says where it resumed."""
    from pv2tea.models import checkpoint as ckpt
    from pv2tea.models.pv2tea import PV2TEA

    catalog = make_catalog(tmp_path / "catalog", n_products=10, seed=6, image_size=32)
    config = tmp_path / "defaults.yaml"
    config.write_text("train: {seed: 0}\n")
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
        "pv2tea",
        "--seeds",
        "1",
        "--config",
        str(config),
        *[
            a
            for o in tiny_overrides(tiny_text_ckpt) + ["train.epochs=1", "train.save_every_steps=2"]
            for a in ("--set", o)
        ],
    ]
    save = ckpt.save_checkpoint

    def killed_after_the_first_save(directory, *a, **kw):
        save(directory, *a, **kw)
        raise KeyboardInterrupt

    forwards = []
    forward = PV2TEA.forward

    def counting(model, batch, sample_weights=None):
        forwards.append(batch.index.tolist())
        return forward(model, batch, sample_weights)

    monkeypatch.setattr(PV2TEA, "forward", counting)
    monkeypatch.setattr(ckpt, "save_checkpoint", killed_after_the_first_save)
    assert main(args) == 130  # Ctrl-C's exit code
    assert len(forwards) == 2
    run = out / "pv2tea" / "seed_0"
    assert json.loads((run / "checkpoint" / ckpt.STATE_FILE).read_text())["step"] == 2
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    forwards.clear()
    assert main(args) == 0
    n_rows = len(Path(catalog["train"]).read_text().splitlines())
    assert len(forwards) == math.ceil(n_rows / 4) - 2
    assert f"resumed from {run / 'checkpoint'} at epoch 0 step 2" in (run / "train.log").read_text()
    assert (run / "test_report.json").is_file() and (run / "final").is_dir()
    # the report figures of the experiment and of its run: PNGs of a figure's size with something drawn on them
    assert main(["report", str(out)]) == 0
    assert main(["report", str(run), "--data", str(catalog["test"])]) == 0
    for png in [
        out / "report" / "variants_f1.png",
        out / "report" / "source_aware_variants.png",
        *[
            run / "report" / n
            for n in ("learning_curves.png", "source_aware.png", "attribute_f1.png", "attention_masks.png")
        ],
    ]:
        assert_drawn_png(png)
