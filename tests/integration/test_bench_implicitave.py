"""The ImplicitAVE benchmark protocol at micro size (tiny random backbones, a made-up dataset in the layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import tiny_overrides
from pv2tea.bench.implicitave import BenchConfig, gold_labelled, product_folds
from pv2tea.cli import main
from pv2tea.data.dataset import value_counts
from pv2tea.data.schema import Record
from pv2tea.data.validate import load_dataset
from pv2tea.models.checkpoint import warm_start_fingerprint

HEADER = "id\timages\tcategory\ttexts\tattribute_names\tattribute_values"
COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}


def _write(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [
        "\t".join((asin, f"{asin}.jpg", cat, text, attr, value)) for asin, cat, text, attr, value in rows
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One domain 'Home': 8 evaluation products with images, 16 text-only training rows, options."""
    base = tmp_path_factory.mktemp("implicitave")
    evaluation = base / "data" / "evaluation_data"
    rows, train = [], []
    for i in range(8):
        value = "Red" if i % 2 else "Blue"
        rows.append(
            (
                f"E{i:03d}",
                "Vase",
                f"[Title] Ceramic vase model {i} {'crimson' if i % 2 else 'navy'} glaze",
                "Color Family",
                value,
            )
        )
        (evaluation / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), COLOURS[value]).save(evaluation / "images" / f"E{i:03d}.jpg")
    for i in range(16):
        value = "Red" if i % 2 else "Blue"
        train.append(
            (f"T{i:03d}", "Vase", f"[Title] Vase {i} {'crimson' if i % 2 else 'navy'} finish", "Color Family", value)
        )
    _write(evaluation / "texts" / "Home_annotated_final.tsv", rows)
    _write(base / "data" / "training_data" / "texts" / "Home" / "train.tsv", train)
    (evaluation / "options_Home.json").write_text(json.dumps({"Color Family": ["Red", "Blue", "Green"]}))
    return base


def test_product_folds_partition_and_group():
    recs = [Record(f"r{i}", "t", (f"img{i // 2}.jpg",), "c", "a", ("v",)) for i in range(10)]
    folds = product_folds(recs, 3)
    assert sorted(i for f in folds for i in f) == list(range(10))
    for fold in folds:  # both rows of a product in the same fold
        assert all((i ^ 1) in fold for i in fold)
    assert folds == product_folds(recs, 3)  # deterministic


def test_gold_ceiling_rows_are_gold_labelled_and_fully_trusted():
    weak = [
        Record("r1", "t", (), "c", "a", ("Blue",), ("Red", "Green"), "image", label_weight=0.3),
        Record("r2", "t", (), "c", "a", ("Red",), ("Red",), "text"),
    ]
    gold = gold_labelled(weak)
    assert [(r.label, r.label_weight) for r in gold] == [(("Red", "Green"), None), (("Red",), None)]
    assert [(r.id, r.gold, r.source) for r in gold] == [(r.id, r.gold, r.source) for r in weak]


def test_bench_config_is_validated():
    with pytest.raises(ValueError, match="folds"):
        BenchConfig(root=Path("."), out=Path("."), folds=1)
    with pytest.raises(ValueError, match="unknown variant"):
        BenchConfig(root=Path("."), out=Path("."), variants=["nope"])


def test_quick_bench_end_to_end_and_resume(root, tiny_text_ckpt, tmp_path, capsys):
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
        "3",
        "--text-rows",
        "6",
        "--text-pool",
        "-1",
        *[x for o in tiny_overrides(tiny_text_ckpt) if not o.startswith("train.epochs=") for x in ("--set", o)],
    ]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    home = result["domains"]["Home"]
    assert set(home) == {
        "text_extractor",
        "warm_start",
        "tea",
        "pv2tea",
        "pv2tea_gold",
        "tea+kept_labels",
        "pv2tea+kept_labels",
        "tea+extractor",
        "pv2tea+extractor",
        "pv2tea+no_images",
        # one fold: calibrated within it, each half of its held-out products on the other half's gold
        "warm_start+calibrated",
        "tea+calibrated",
        "pv2tea+calibrated",
    }
    for scores in home.values():
        assert 0.0 <= scores["f1"] <= 100.0 and 0.0 <= scores["accuracy"] <= 100.0
    fold = out / "runs" / "Home" / "fold_0"
    for variant in ("tea", "pv2tea", "pv2tea_gold"):  # quick: the headline is the one run's test report
        run_report = json.loads((fold / variant / "seed_0" / "test_report.json").read_text())
        assert home[variant] == {
            "f1": round(run_report["constrained"]["overall"]["f1"], 2),
            "accuracy": round(run_report["constrained"]["overall"]["accuracy"], 2),
            "f1_open": round(run_report["overall"]["f1"], 2),
        }, variant
    assert home["text_extractor"]["accuracy"] == 100.0  # crimson/navy decide the value in this toy
    saved = json.loads((out / "bench.json").read_text())
    assert saved["domains"]["Home"]["pv2tea"]["runs"] == 1  # quick: one fold, one seed
    fold_report = json.loads((out / "runs" / "Home" / "fold_0" / "pv2tea" / "seed_0" / "test_report.json").read_text())
    kept = saved["domains"]["Home"]["pv2tea+kept_labels"]
    assert kept["constrained"]["f1"]["mean"] == fold_report["kept_labels"]["constrained"]["overall"]["f1"]
    assert kept["open"]["f1"]["mean"] == fold_report["kept_labels"]["overall"]["f1"]
    blind = saved["domains"]["Home"]["pv2tea+no_images"]  # the same model, the test images withheld
    assert blind["constrained"]["f1"]["mean"] == fold_report["without_images"]["constrained"]["overall"]["f1"]
    assert fold_report["without_images"]["overall"]["n"] == fold_report["overall"]["n"]
    fused = saved["domains"]["Home"]["pv2tea+extractor"]  # ranking only: open and constrained are the same
    assert fused["constrained"]["f1"]["mean"] == fused["open"]["f1"]["mean"] == fold_report["fused"]["overall"]["f1"]
    # the extractor decides every toy row, so fusing the model with it cannot do worse than the extractor
    assert fused["constrained"]["accuracy"]["mean"] >= home["text_extractor"]["accuracy"] - 1e-9
    moved = saved["domains"]["Home"]["pv2tea"]["constrained"]["departures"]  # against the weak labels
    assert (
        moved == fold_report["constrained"]["departures"] and moved["n"] == fold_report["constrained"]["overall"]["n"]
    )
    assert moved["fixed"] == 0 and moved["either"] == 100.0  # the labels are all right here: nothing to fix
    assert moved["broke"] == moved["changed"] - moved["both"]
    ranked_acc = fold_report["constrained"]["overall"]["accuracy"]
    assert moved["net"] == pytest.approx((ranked_acc - 100.0) * moved["n"] / 100)
    assert saved["domains"]["Home"]["warm_start"]["constrained"]["departures"]["n"] == moved["n"]
    assert (
        saved["domains"]["Home"]["pv2tea+extractor"]["constrained"]["departures"] == fold_report["fused"]["departures"]
    )
    assert "| pv2tea | " + str(moved["n"]) + " | " + str(moved["changed"]) in (out / "tables.md").read_text()
    assert (out / "tables.md").read_text().startswith("### Home")
    run_cfg = yaml.safe_load((out / "runs" / "Home" / "fold_0" / "pv2tea" / "seed_0" / "config.yaml").read_text())
    assert run_cfg["train"]["epochs"] == 3  # quick: the full protocol's fold 0, the epochs as asked
    assert run_cfg["train"]["image_less_per_epoch"] == 6  # 6 of the 16 text-only rows, drawn afresh each epoch
    # the protocol's defaults: classify over the options, learn from the warm start (the ceiling from the gold alone)
    assert run_cfg["decoder"]["head"] == "classify" and run_cfg["loss"]["distill_weight"] == 1.0
    gold_cfg = yaml.safe_load((fold / "pv2tea_gold" / "seed_0" / "config.yaml").read_text())
    assert gold_cfg["decoder"]["head"] == "classify" and gold_cfg["loss"]["distill_weight"] == 0
    reports = sorted((out / "runs" / "Home" / "fold_0").glob("*/seed_0/test_report.json"))
    assert [p.parts[-3] for p in reports] == ["pv2tea", "pv2tea_gold", "tea"]
    stamps = [p.stat().st_mtime_ns for p in reports]
    assert main(args) == 0  # re-run: every finished run is reused, nothing retrains
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_unknown_domain_is_a_clear_error(root, tmp_path, capsys):
    assert main(["bench", "implicitave", str(root), "--out", str(tmp_path / "b"), "--domains", "Toys"]) == 2
    assert "Toys" in capsys.readouterr().err


def test_constrain_keeps_only_options_of_the_rows_attribute():
    from pv2tea.experiment import constrain_to_candidates as _constrain

    rows = [Record("a", "t", (), "c", "Color", ("red",)), Record("b", "t", (), "c", "Size", ("big",))]
    preds = [["Red", "purple"], ["huge"]]
    assert _constrain(preds, rows, {"Color": ["red", "Blue"]}) == [["Red"], ["huge"]]  # Size has no list
    assert _constrain(preds, rows, None) == [["Red", "purple"], ["huge"]]


def test_ranked_departures_compare_with_the_extractors_closed_set_answers():
    from pv2tea.experiment import _add_departures

    # gold and weak label "purple" is not an option: the extractor's ranked answer is empty (wrong), so the
    # model's ranked "red" breaks nothing there, while in the open comparison the label was right
    rows = [
        Record("a", "t", (), "c", "Color", ("purple",), gold=("purple",), source="image"),
        Record("b", "t", (), "c", "Color", ("blue",), gold=("red",), source="image"),
    ]
    report = {"constrained": {}}
    _add_departures(report, rows, [["red"], ["red"]], [["red"], ["red"]], {}, {"Color": ["red", "blue"]})
    opened, ranked = report["departures"], report["constrained"]["departures"]
    assert (opened["changed"], opened["fixed"], opened["broke"], opened["neither"]) == (2, 1, 1, 0)
    assert (ranked["changed"], ranked["fixed"], ranked["broke"], ranked["neither"]) == (2, 1, 0, 1)
    assert ranked["either"] == 50.0 and opened["either"] == 100.0


def test_headline_and_tables_from_summaries():
    from pv2tea.bench.implicitave import format_tables, headline, summarize_runs

    def block(f1, acc):
        return {
            "overall": {"f1": f1, "accuracy": acc, "precision": f1, "recall": f1},
            "by_attribute": {"Color": {"overall": {"f1": f1, "accuracy": acc}}},
        }

    def report(f1, acc):  # free generation scores 10 under the ranked answers
        return {**block(f1 - 10, acc - 10), "constrained": block(f1, acc)}

    summary = summarize_runs([report(40.0, 50.0), report(60.0, 70.0)])
    assert summary["runs"] == 2
    assert summary["constrained"]["f1"]["mean"] == 50.0 and summary["open"]["f1"]["mean"] == 40.0
    assert summary["constrained"]["f1"]["std"] == pytest.approx(14.1421, abs=1e-3)
    results = {"domains": {"Home": {"pv2tea": summary}}}
    assert headline(results) == {"domains": {"Home": {"pv2tea": {"f1": 50.0, "accuracy": 60.0, "f1_open": 40.0}}}}
    assert "| pv2tea | 2 | 50.0 ± 14.1 |" in format_tables(results)


def test_fold_ttests_pair_folds_and_average_seeds():
    from pv2tea.bench.implicitave import add_fold_ttests, format_tables, per_fold_f1, summarize_runs

    def report(f1):
        block = {"overall": {"f1": f1, "accuracy": f1, "precision": f1, "recall": f1}, "by_attribute": {}}
        return {**block, "constrained": block}

    # 3 folds; the extractor once per fold, PV2TEA with 2 seeds per fold (fold-major)
    reports = {
        "text_extractor": [report(50.0), report(60.0), report(40.0)],
        "pv2tea": [report(52.0), report(54.0), report(61.0), report(63.0), report(41.0), report(45.0)],
    }
    assert per_fold_f1(reports["pv2tea"], 3) == [53.0, 62.0, 43.0]
    summaries = {name: summarize_runs(runs) for name, runs in reports.items()}
    add_fold_ttests(summaries, reports, 3)
    test = summaries["pv2tea"]["ttest_vs_text_extractor"]
    # extractor - pv2tea per fold: -3, -2, -3: mean -8/3, sd 0.57735, t = (-8/3) / (0.57735 / sqrt 3) = -8.0,
    # p = 0.0153 (df 2)
    assert (
        test["n"] == 3 and test["t"] == pytest.approx(-8.0, rel=1e-6) and test["p"] == pytest.approx(0.01527, abs=1e-4)
    )
    assert "ttest_vs_pv2tea" in summaries["text_extractor"] and "ttest_vs_pv2tea" not in summaries["pv2tea"]
    table = format_tables({"domains": {"Food": summaries}})
    assert "| pv2tea | 6 |" in table and "| 0.0153 | – |" in table
    one_fold = {name: summarize_runs(runs[:1]) for name, runs in reports.items()}
    add_fold_ttests(one_fold, {name: runs[:1] for name, runs in reports.items()}, 1)
    assert one_fold["pv2tea"]["ttest_vs_text_extractor"]["p"] is None  # undefined with one fold


def test_the_warm_start_starts_every_fold_run(root, tiny_text_ckpt, tmp_path, capsys, monkeypatch):
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
        "2",
        "--variants",
        "pv2tea",
        "--no-gold-ceiling",
        "--warm-start-epochs",
        "1",
        *[x for o in tiny_overrides(tiny_text_ckpt) for x in ("--set", o)],
    ]
    assert main(args) == 0
    pretrain = out / "runs" / "Home" / "warm_start"
    pre_cfg = yaml.safe_load((pretrain / "config.yaml").read_text())
    assert pre_cfg["vision"]["enabled"] is False and pre_cfg["train"]["epochs"] == 1  # a TEA, on the text rows
    assert pre_cfg["train"]["warm_start"] is None
    epochs = [
        json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines() if '"finished"' in line
    ]
    assert [e["step"] for e in epochs] == [4]  # all 16 text-only rows at batch size 4, one epoch
    run = out / "runs" / "Home" / "fold_0" / "pv2tea" / "seed_0"
    run_cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert run_cfg["train"]["warm_start"] == str(pretrain / "final")
    assert pre_cfg["decoder"]["head"] == "classify" and pre_cfg["loss"]["distill_weight"] == 0
    run_log = (run / "train.log").read_text()
    assert "warm start:" in run_log and "classification head's rows of" in run_log
    assert "distilling the warm start" in run_log and run_cfg["loss"]["distill_weight"] == 1.0
    # the warm start learned the extractor's out-of-fold probabilities with its labels; the fold runs move it slowly
    assert pre_cfg["loss"]["soft_label_weight"] == 0.5 and run_cfg["optim"]["warm_start_lr_scale"] == 0.1
    # and read the image through a gate that starts closed (the run starts at its warm start); the log shows it
    assert run_cfg["fusion"]["visual_gate"] == 0 and pre_cfg["fusion"]["visual_gate"] is None
    epoch_records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("visual_gate" in r for r in epoch_records)
    soft = json.loads((out / "runs" / "Home" / "soft_labels.json").read_text())
    text_rows = load_dataset(out / "data" / "Home" / "train_text.jsonl").records
    assert len(soft["label_probs"]) == len(text_rows) and all(soft["label_probs"])
    assert all(abs(sum(p for _, p in probs) - 1) < 1e-3 for probs in soft["label_probs"])  # single-value attributes
    pre_counts = json.loads((pretrain / "final" / "preprocess.json").read_text())["value_counts"]
    assert pre_counts != value_counts(text_rows)  # its prior follows the soft targets, not the labels alone
    assert sum(sum(c.values()) for c in pre_counts.values()) == pytest.approx(len(text_rows))
    soft_stamp = (out / "runs" / "Home" / "soft_labels.json").stat().st_mtime_ns
    stamp = (pretrain / "final" / "model.safetensors").stat().st_mtime_ns
    # the warm start scored alone on the held-out fold, next to the runs it started
    results = json.loads((out / "bench.json").read_text())["domains"]["Home"]
    assert results["warm_start"]["runs"] == 1 and results["warm_start"]["constrained"]["f1"]["mean"] is not None
    scored_path = out / "runs" / "Home" / "fold_0" / "warm_start" / "test_report.json"
    scored = json.loads(scored_path.read_text())
    assert scored["warm_start_sha256"] == warm_start_fingerprint(pretrain / "final")
    assert "constrained" in scored and len(scored["products_sha256"]) == 64
    scored_stamp = scored_path.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # re-run: the pretraining is reused too, and the warm start's score
    assert (pretrain / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "runs" / "Home" / "soft_labels.json").stat().st_mtime_ns == soft_stamp  # reused too
    assert scored_path.stat().st_mtime_ns == scored_stamp
    scored_path.write_text("{damaged")
    assert main(args) == 0  # a damaged score is computed again, not a crash
    assert json.loads(scored_path.read_text()) == scored
    # a benchmark that differs only in what a text-only run ignores shares the pretraining
    other = tmp_path / "other"
    image_size = run_cfg["vision"]["image_size"]
    shutil.copytree(pretrain, other / "runs" / "Home" / "warm_start")
    assert (
        main(
            [
                *args[:4],
                str(other),
                *args[5:],
                "--set",
                "loss.weight_sc=0.5",
                "--set",
                "schemes.text_dropout=0.1",
                "--set",
                "optim.warm_start_lr=head_lr",
                "--set",
                "fusion.visual_gate=0.5",
                "--set",
                f"vision.image_size={image_size + 16}",
            ]
        )
        == 0
    )
    copied = other / "runs" / "Home" / "warm_start" / "final" / "model.safetensors"
    assert copied.stat().st_mtime_ns == stamp  # copied with its time stamp, and not retrained
    other_run = yaml.safe_load((other / "runs" / "Home" / "fold_0" / "pv2tea" / "seed_0" / "config.yaml").read_text())
    assert other_run["optim"]["warm_start_lr"] == "head_lr"  # the fold runs still get it
    assert other_run["fusion"]["visual_gate"] == 0.5 and other_run["vision"]["image_size"] == image_size + 16
    with pytest.raises(ValueError, match="warm-start-epochs"):
        BenchConfig(root=Path("."), out=Path("."), warm_start_epochs=-1)
    # a run made before the rename (its warm start in text_pretrain/, the old flag) is reused as it is, and shows the
    # warm start's row under its current name
    for parent in (out / "runs" / "Home", out / "runs" / "Home" / "fold_0"):
        (parent / "warm_start").rename(parent / "text_pretrain")
    old_args = [("--text-pretrain" if a == "--warm-start-epochs" else a) for a in args]
    old_run_cfg = (run / "config.yaml").read_text()
    old_cfg = yaml.safe_load(old_run_cfg)
    old_cfg["train"]["init_from"] = str(out / "runs" / "Home" / "text_pretrain" / "final")
    del old_cfg["train"]["warm_start"]
    (run / "config.yaml").write_text(yaml.safe_dump(old_cfg, sort_keys=False))  # as a run of that time saved it
    capsys.readouterr()
    monkeypatch.setattr("pv2tea.renamed._WARNED", set())  # as in a fresh process
    with pytest.warns(FutureWarning, match="--text-pretrain is now --warm-start-epochs"):
        assert main(old_args) == 0
    err = capsys.readouterr().err
    assert "warm start: TEA on" not in err and "seed 0: F1" in err  # nothing trained again
    assert not (out / "runs" / "Home" / "warm_start").exists()
    saved = json.loads((out / "bench.json").read_text())
    assert "warm_start" in saved["domains"]["Home"] and "text_pretrain" not in saved["domains"]["Home"]


def test_a_generating_protocol_warm_starts_without_soft_labels(root, tiny_text_ckpt, tmp_path):
    """Soft labels need the classification head: `--set decoder.head=generate` drops them from the defaults; a
    decoder that reads the context (`decoder.attend_context=true`) drops the visual gate it would read past."""
    out = tmp_path / "bench"
    args = ["bench", "implicitave", str(root), "--out", str(out), "--quick", "--folds", "2", "--variants", "pv2tea"]
    sets = [*tiny_overrides(tiny_text_ckpt), "decoder.head=generate", "decoder.attend_context=true"]
    assert main([*args, "--no-gold-ceiling", "--warm-start-epochs", "1", *[x for o in sets for x in ("--set", o)]]) == 0
    pre_cfg = yaml.safe_load((out / "runs" / "Home" / "warm_start" / "config.yaml").read_text())
    assert pre_cfg["decoder"]["head"] == "generate" and pre_cfg["loss"]["soft_label_weight"] == 0
    assert not (out / "runs" / "Home" / "soft_labels.json").exists()
    run_cfg = yaml.safe_load((out / "runs" / "Home" / "fold_0" / "pv2tea" / "seed_0" / "config.yaml").read_text())
    assert run_cfg["decoder"]["attend_context"] is True and run_cfg["fusion"]["visual_gate"] is None
    assert run_cfg["optim"]["warm_start_lr_scale"] == 0.1  # the other defaults stay
