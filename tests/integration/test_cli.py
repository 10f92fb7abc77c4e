"""The CLI end to end: synth → validate → train → evaluate → predict, resume and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from pv2tea.cli import main
from pv2tea.data.synth import make_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict[str, Path]:
    return make_catalog(tmp_path_factory.mktemp("catalog"), n_products=24, seed=3, image_size=64)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _train(catalog, out: Path, overrides: list[str], *extra: str) -> int:
    return main(
        [
            "train",
            "--train",
            str(catalog["train"]),
            "--val",
            str(catalog["val"]),
            "--out",
            str(out),
            "--no-progress",
            *_sets(overrides),
            *extra,
        ]
    )


@pytest.mark.real_backbone
def test_cli_end_to_end_real_backbones(catalog, tmp_path, capsys):
    """Default offline backbones (EfficientNet-Lite0 + MiniLM), shrunk only in depth and image size."""
    run = tmp_path / "run"
    overrides = [
        "vision.image_size=64",
        "fusion.num_layers=1",
        "decoder.num_layers=1",
        "train.epochs=1",
        "train.batch_size=8",
        "schemes.queue_size=32",
        "schemes.knn_k=3",
    ]
    assert main(["data", "validate", str(catalog["train"])]) == 0
    assert _train(catalog, run, overrides) == 0
    for name in (
        "config.yaml",
        "environment.json",
        "metrics.jsonl",
        "train.log",
        "data_report.json",
        "val_report.json",
        "final/model.safetensors",
        "final/pv2tea_config.json",
        "checkpoint/trainer_state.json",
    ):
        assert (run / name).is_file(), name
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_gen", "loss_sc", "loss_ct", "weight_mean"} <= set(epoch)

    report_path = tmp_path / "report.json"
    assert (
        main(["evaluate", "--model", str(run / "final"), "--data", str(catalog["test"]), "--out", str(report_path)])
        == 0
    )
    report = json.loads(report_path.read_text())
    assert {"overall", "by_source", "gap", "by_attribute"} <= set(report)
    assert set(report["by_attribute"]) == {"color", "pattern"}
    assert "GAP" in capsys.readouterr().out

    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(run / "final"), "--data", str(catalog["test"]), "--out", str(preds)]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    n_test = len(Path(catalog["test"]).read_text().splitlines())
    assert len(lines) == n_test and all(isinstance(x["values"], list) for x in lines)


def test_validate_exit_codes(catalog, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(x) for x in Path(catalog["train"]).read_text().splitlines()[:3]]
    rows[1]["text"] = "   "
    rows[2]["images"] = [str(tmp_path / "nope.png")]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl row 2, field 'text'" in out and "bad.jsonl row 3, field 'images'" in out
    assert main(["data", "validate", str(catalog["val"])]) == 0
    extra = tmp_path / "extra.jsonl"
    rows = [json.loads(x) for x in Path(catalog["val"]).read_text().splitlines()[:2]]
    rows[1]["colour"] = "red"
    extra.write_text(
        "".join(
            json.dumps({**r, "images": [str(Path(catalog["val"]).parent / i) for i in r["images"]]}) + "\n"
            for r in rows
        )
    )
    capsys.readouterr()
    assert main(["data", "validate", str(extra)]) == 0  # a warning, not an error
    captured = capsys.readouterr()
    assert "field 'colour' is not part of the schema and is ignored (row 2)" in captured.out + captured.err


def test_train_refuses_bad_rows_then_skips_and_counts(catalog, tiny_text_ckpt, tmp_path, capsys):
    rows = Path(catalog["train"]).read_text().splitlines()
    broken = json.loads(rows[0])
    broken["label"] = []
    data = Path(catalog["train"]).parent / "train_with_bad_row.jsonl"  # same folder: relative images resolve
    data.write_text("\n".join([json.dumps(broken), *rows[1:]]) + "\n")
    overrides = tiny_overrides(tiny_text_ckpt) + ["train.epochs=1"]
    code = main(["train", "--train", str(data), "--out", str(tmp_path / "a"), "--no-progress", *_sets(overrides)])
    assert code == 2
    assert "row 1, field 'label'" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--train",
            str(data),
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
            "--skip-invalid",
            *_sets(overrides),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "b" / "data_report.json").read_text())
    assert report[str(data)]["rows_skipped"] == 1
    assert report[str(data)]["rows_loaded"] == len(rows) - 1


def test_unknown_config_key_is_a_clear_error(catalog, tiny_text_ckpt, tmp_path, capsys):
    code = _train(catalog, tmp_path / "r", tiny_overrides(tiny_text_ckpt) + ["schemes.alpah=0.2"])
    assert code == 2
    assert "schemes.alpah" in capsys.readouterr().err


def test_resume_equals_uninterrupted(catalog, tiny_text_ckpt, tmp_path):
    overrides = tiny_overrides(tiny_text_ckpt) + [
        "train.epochs=3",
        "schemes.prediction_nr=true",
        "schemes.prediction_nr_start_epoch=1",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(catalog, full, overrides) == 0
    # stop mid-epoch (epoch 1 has more than 5 steps), then resume to the end
    assert _train(catalog, part, overrides + ["train.max_steps=5"]) == 0
    assert not (part / "final").exists()
    assert _train(catalog, part, ["train.max_steps=null"], "--resume") == 0
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert json.loads((full / "val_report.json").read_text()) == json.loads((part / "val_report.json").read_text())


def test_weight_averaging_is_the_mean_of_the_last_epochs_and_resumes(catalog, tiny_text_ckpt, tmp_path):
    """train.average_epochs=2 of 3: final = (weights after epoch 2 + weights after epoch 3) / 2 for every trainable
    tensor, frozen ones untouched; a run stopped after epoch 2 and resumed ends with the same average."""
    base = tiny_overrides(tiny_text_ckpt) + ["train.epochs=3", "vision.freeze=true"]
    plain, averaged, part = tmp_path / "plain", tmp_path / "avg", tmp_path / "part"
    assert _train(catalog, plain, base) == 0
    steps_2 = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()][1]["step"]
    assert _train(catalog, plain / "two", base + [f"train.max_steps={steps_2}"]) == 0  # stops after epoch 2
    w2 = load_file(str(plain / "two" / "checkpoint" / "model.safetensors"))
    w3 = load_file(str(plain / "final" / "model.safetensors"))
    assert _train(catalog, averaged, base + ["train.average_epochs=2"]) == 0
    avg = load_file(str(averaged / "final" / "model.safetensors"))
    last = load_file(str(averaged / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(last[k], w3[k]) for k in w3)  # averaging does not change the trajectory
    moved = [k for k in avg if not torch.equal(w2[k], w3[k])]
    latest_keys = [k for k in moved if torch.equal(avg[k], w3[k])]  # not trained: momentum copies, S1 queues
    averaged_keys = [
        k
        for k in moved
        if k not in latest_keys
        and avg[k].is_floating_point()
        and torch.allclose(avg[k], (w2[k] + w3[k]) / 2, atol=1e-6)
    ]
    assert sorted(averaged_keys + latest_keys) == sorted(moved)
    assert "decoder.cls.predictions.transform.dense.weight" in averaged_keys
    assert any(k.startswith("text_encoder_m.") for k in latest_keys)
    assert all(torch.equal(avg[k], w3[k]) for k in avg if k.startswith("visual.backbone."))  # frozen
    assert [json.loads(x).get("averaged_epochs") for x in (averaged / "metrics.jsonl").read_text().splitlines()] == [
        None,
        1,
        2,
    ]
    assert _train(catalog, part, base + ["train.average_epochs=2", f"train.max_steps={steps_2}"]) == 0
    assert _train(catalog, part, ["train.max_steps=null"], "--resume") == 0
    resumed = load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(avg[k], resumed[k]) for k in avg)


def test_resume_needs_an_existing_run(catalog, tmp_path, capsys):
    assert _train(catalog, tmp_path / "none", [], "--resume") == 2
    assert "cannot resume" in capsys.readouterr().err


def test_mention_dropout_trains_on_mention_free_texts_from_the_cache(catalog, tiny_text_ckpt, tmp_path, monkeypatch):
    """schemes.mention_dropout=1: every training batch shows a row with an image whose label is in its text without
    the label's words (and the others unchanged), from the feature cache (the texts were cached up front)."""
    from pv2tea.data.dataset import Preprocessor
    from pv2tea.data.validate import load_dataset
    from pv2tea.regularize.grounding import label_in_text, mention_free_texts

    seen: dict[str, set[str]] = {}
    uncached = []
    collate = Preprocessor.collate

    def spy(self, records, pair_ids, indices, with_answers):
        batch = collate(self, records, pair_ids, indices, with_answers)
        if with_answers:  # training batches (evaluation and S3 predictions collate without answers)
            for r in records:
                seen.setdefault(r.id, set()).add(r.text)
            uncached.append(batch.text_hidden is None)
        return batch

    monkeypatch.setattr(Preprocessor, "collate", spy)
    run = tmp_path / "run"
    assert _train(catalog, run, tiny_overrides(tiny_text_ckpt) + ["schemes.mention_dropout=1.0"]) == 0
    rows = load_dataset(catalog["train"]).records
    free = mention_free_texts(rows)
    assert 0 < sum(t is not None for t in free) < len(rows)
    assert seen == {r.id: {t if t is not None else r.text} for r, t in zip(rows, free)}
    assert not any(label_in_text(r.label, t) for r, t in zip(rows, free) if t is not None)
    assert uncached and not any(uncached)
    assert (
        f"mention-free texts: {sum(t is not None for t in free)} of {len(rows)} rows" in (run / "train.log").read_text()
    )


def test_prediction_nr_predicts_from_mention_free_texts(catalog, tiny_text_ckpt, tmp_path, monkeypatch):
    """schemes.prediction_nr_text=mention_free: S3's prediction level predicts a row whose label its text states
    from the text without the statement, every other row from its own text; training batches are untouched
    (no mention dropout)."""
    import pv2tea.train.loop as loop
    from pv2tea.data.validate import load_dataset
    from pv2tea.regularize.grounding import mention_free_texts

    shown: list[list[str]] = []
    generate = loop.generate_values

    def spy(model, pre, records, batch_size, **kwargs):
        if kwargs.get("desc") == "S3 predictions":
            shown.append([r.text for r in records])
        return generate(model, pre, records, batch_size, **kwargs)

    monkeypatch.setattr(loop, "generate_values", spy)
    overrides = tiny_overrides(tiny_text_ckpt) + [
        "schemes.prediction_nr_text=mention_free",
        "train.epochs=3",
        "schemes.prediction_nr=true",
        "schemes.prediction_nr_start_epoch=1",
    ]
    assert _train(catalog, tmp_path / "run", overrides) == 0
    rows = load_dataset(catalog["train"]).records
    free = mention_free_texts(rows)
    assert 0 < sum(t is not None for t in free) < len(rows)
    assert shown == [[t if t is not None else r.text for r, t in zip(rows, free)]] * 2  # epochs 2 and 3


def test_demo_at_micro_size(tiny_text_ckpt, tmp_path, capsys):
    """`pv2tea demo`: catalog, training, the source-aware table and the comparison with the weak labels and with
    --keep-labels, whose predictions are the weak label where the text states it and PV2TEA's elsewhere."""
    from pv2tea.eval.metrics import Example, source_aware_report

    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--n-products",
                "20",
                "--epochs",
                "1",
                "--no-progress",
                *_sets(tiny_overrides(tiny_text_ckpt)),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "PV2TEA on the test split" in printed and "+ kept labels: a weak label" in " ".join(printed.split())
    run = out / "run"
    rows = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    test = {json.loads(x)["id"]: json.loads(x) for x in (out / "catalog" / "test.jsonl").read_text().splitlines()}
    from pv2tea.regularize.grounding import label_in_text

    for row in rows:
        stated = label_in_text(row["weak_label"], test[row["id"]]["text"])
        assert row["pred_kept_labels"] == (row["weak_label"] if stated else row["pred"])
    kept = json.loads((run / "kept_labels_test_report.json").read_text())
    multi = {"color": True, "pattern": False}
    assert kept == source_aware_report(
        [
            Example(
                tuple(r["gold"]),
                tuple(r["pred_kept_labels"]),
                r["source"],
                test[r["id"]]["attribute"],
                multi[test[r["id"]]["attribute"]],
            )
            for r in rows
        ]
    )
    assert main(["demo", "--out", str(out), "--n-products", "20", "--no-progress"]) == 2  # never over a run


def test_image_less_rows_drawn_per_epoch_train_and_resume(catalog, tiny_text_ckpt, tmp_path):
    """Half the rows lose their image; each epoch trains on the image rows plus 4 of the others."""
    rows = [json.loads(x) for x in Path(catalog["train"]).read_text().splitlines()]
    for row in rows[::2]:
        row["images"] = []
    data = Path(catalog["train"]).parent / "train_half_text_only.jsonl"  # same folder: relative images resolve
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_image = sum(bool(r["images"]) for r in rows)
    overrides = tiny_overrides(tiny_text_ckpt) + [
        "train.epochs=2",
        "train.image_less_per_epoch=4",
        "schemes.prediction_nr=true",
        "schemes.prediction_nr_start_epoch=1",
    ]

    def run(out: Path, extra: list[str], *flags: str) -> int:
        return main(["train", "--train", str(data), "--out", str(out), "--no-progress", *_sets(extra), *flags])

    assert run(tmp_path / "full", overrides) == 0
    epochs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = -(-(n_image + 4) // 4)  # ceil((image rows + 4) / batch size 4)
    assert [e["step"] for e in epochs] == [per_epoch, 2 * per_epoch]
    assert run(tmp_path / "part", overrides + ["train.max_steps=3"]) == 0
    assert run(tmp_path / "part", ["train.max_steps=null"], "--resume") == 0
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_warm_start_pipeline_of_the_readme(catalog, tiny_text_ckpt, tmp_path, capsys):
    """Soft labels from the extractor (weak-label --soft-train), a text-only warm start on them (--variant tea)
    classifying among the values, then a run started and taught by it, its warm-started parts slower."""
    soft = tmp_path / "text_only_soft.jsonl"
    weak = ["weak-label", "--train", str(catalog["train"]), "--data", str(catalog["val"]), "--kind", "tfidf"]
    assert main([*weak, "--out", str(tmp_path / "weak.jsonl"), "--soft-train", str(soft)]) == 0
    overrides = [*tiny_overrides(tiny_text_ckpt), "train.epochs=1"]
    warm = ["train", "--train", str(soft), "--out", str(tmp_path / "warm"), "--no-progress", "--config", "warm-start"]
    assert main([*warm, *_sets(overrides)]) == 0
    import yaml

    warm_cfg = yaml.safe_load((tmp_path / "warm" / "config.yaml").read_text())
    assert warm_cfg["vision"]["enabled"] is False and warm_cfg["decoder"]["head"] == "classify"
    assert warm_cfg["loss"]["soft_label_weight"] == 0.5
    counts = json.loads((tmp_path / "warm" / "final" / "preprocess.json").read_text())["value_counts"]
    assert any(not float(n).is_integer() for c in counts.values() for n in c.values())  # the soft targets' prior
    capsys.readouterr()
    assert _train(catalog, tmp_path / "cold", overrides, "--config", "from-warm-start") == 2
    assert "pv2tea train --warm-start RUN/final" in capsys.readouterr().err
    taught = ["--config", "from-warm-start", "--warm-start", str(tmp_path / "warm" / "final")]
    assert _train(catalog, tmp_path / "run", overrides, *taught) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "classification head's rows of" in log and "distilling the warm start" in log
    run_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_cfg["vision"]["enabled"] is True and run_cfg["fusion"]["visual_gate"] == 0
    assert run_cfg["train"]["warm_start"] == str(tmp_path / "warm" / "final")
    assert (run_cfg["loss"]["distill_weight"], run_cfg["optim"]["warm_start_lr_scale"]) == (1.0, 0.1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gates = [r["visual_gate"] for r in records if "visual_gate" in r]  # how far the image was let in, per layer
    assert gates and all(g and all(-1 <= x <= 1 for x in g) for g in gates)
    capsys.readouterr()
    assert _train(catalog, tmp_path / "bad", overrides, "--variant", "teaa") == 2
    assert "--variant 'teaa' is not a variant; known: pv2tea, tea, " in capsys.readouterr().err
