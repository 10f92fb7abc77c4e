"""Old spellings still work after a rename, warn once naming the new one, and mean exactly what the new one means."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml

from pv2tea import renamed
from pv2tea.config import ConfigError, load_config, upgrade_saved


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a fresh process would: no old spelling warned about yet."""
    monkeypatch.setattr(renamed, "_WARNED", set())


def test_warn_renamed_warns_once_naming_the_new_spelling():
    with pytest.warns(renamed.RenamedWarning, match="--old is now --new"):
        renamed.warn_renamed("--old", "--new")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        renamed.warn_renamed("--old", "--new")  # the second time: silent


def test_old_config_key_in_an_override_warns_and_sets_the_new_key():
    with pytest.warns(renamed.RenamedWarning, match="train.init_from is now train.warm_start"):
        cfg = load_config("cpu", ["train.init_from=runs/warm/final"])
    assert cfg.train.warm_start == "runs/warm/final"
    assert cfg == load_config("cpu", ["train.warm_start=runs/warm/final"])
    assert "init_from" not in cfg.to_dict()["train"]


def test_old_config_key_in_a_yaml_file_warns_and_reads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"init_from": "w/final", "epochs": 3}}))
    with pytest.warns(renamed.RenamedWarning, match="train.warm_start"):
        cfg = load_config(str(path))
    assert (cfg.train.warm_start, cfg.train.epochs) == ("w/final", 3)


def test_a_later_new_spelling_overrides_an_earlier_old_one():
    with pytest.warns(renamed.RenamedWarning):
        cfg = load_config(None, ["train.init_from=a", "train.warm_start=b"])
    assert cfg.train.warm_start == "b"


def test_both_spellings_in_one_file_with_different_values_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"train": {"init_from": "a", "warm_start": "b"}}))
    with pytest.warns(renamed.RenamedWarning), pytest.raises(ConfigError, match="both train.init_from"):
        load_config(str(path))


def test_a_saved_run_config_with_the_old_key_upgrades_silently():
    saved = {"train": {"init_from": "w/final"}, "optim": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = upgrade_saved(saved)
        cfg = load_config(None, base=saved)
    assert data["train"] == {"warm_start": "w/final"}
    assert data["optim"]["warm_start_lr"] == "head_lr"  # how a warm-started run saved before that setting trained
    assert saved["train"] == {"init_from": "w/final"}  # not mutated
    assert cfg.train.warm_start == "w/final"


def test_the_old_attribute_name_reads_and_writes_the_new_field():
    cfg = load_config(None)
    with pytest.warns(renamed.RenamedWarning, match="TrainConfig.warm_start"):
        cfg.train.init_from = "x"
    assert cfg.train.warm_start == "x" and cfg.train.init_from == "x"


@pytest.mark.parametrize("module", ["pv2tea.baselines", "pv2tea.baselines.transformer"])
def test_the_old_name_of_the_transformer_extractors_config_imports_and_warns(module):
    import importlib

    from pv2tea.baselines import TransformerExtractorConfig

    with pytest.warns(renamed.RenamedWarning, match="TextExtractorConfig is now TransformerExtractorConfig"):
        old = importlib.import_module(module).TextExtractorConfig
    assert old is TransformerExtractorConfig
    with pytest.raises(AttributeError, match="no attribute 'NoSuchConfig'"):
        importlib.import_module(module).NoSuchConfig  # noqa: B018


def test_the_old_benchmark_flag_gives_the_warm_starts_epochs_and_warns():
    from pv2tea.cli.bench import _warm_start_epochs

    assert _warm_start_epochs(6, None) == 6
    with pytest.warns(renamed.RenamedWarning, match="--text-pretrain is now --warm-start-epochs"):
        assert _warm_start_epochs(6, 2) == 2


def _rows():
    from pv2tea.data.schema import Record

    return [
        Record("a", "Color: Red. A mug", (), "mug", "color", ("red",)),  # the text states its label: kept
        Record("b", "A plain mug", (), "mug", "color", ("white",)),  # it does not: the model answers
    ]


def test_the_old_predict_flag_keeps_labels_and_warns(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pv2tea.cli import app
    from pv2tea.data.readers import write_records
    from pv2tea.inference import predictor

    class Fixed:
        """Answers "blue" for every row."""

        def predict(self, chunk, *args, **kwargs):
            return [["blue"] for _ in chunk]

    monkeypatch.setattr(predictor.Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: Fixed()))
    data = tmp_path / "rows.jsonl"
    write_records(_rows(), data)
    answers = {}
    for flag in ("--keep-labels", "--keep-grounded"):
        out = tmp_path / f"{flag}.jsonl"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(
                app,
                ["predict", "--model", str(tmp_path), "--data", str(data), "--out", str(out), "--no-progress", flag],
            )
        assert result.exit_code == 0, result.output
        said = [str(w.message) for w in caught if issubclass(w.category, renamed.RenamedWarning)]
        assert said == (
            []
            if flag == "--keep-labels"
            else [f"{flag} is now --keep-labels; the old spelling still works but will be removed"]
        )
        answers[flag] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["values"] for a in answers["--keep-labels"]] == [["red"], ["blue"]]
    assert answers["--keep-grounded"] == answers["--keep-labels"]
    help_text = CliRunner().invoke(app, ["predict", "--help"], terminal_width=200).output
    assert "--keep-labels" in help_text and "--keep-grounded" not in help_text  # the old flag is hidden


def test_the_old_keyword_of_prediction_rows_keeps_labels_and_warns():
    from pv2tea.inference.predictor import prediction_rows

    rows, preds = _rows(), [["blue"], ["blue"]]
    new = prediction_rows(rows, preds, keep_labels=True)
    assert [(r["values"], r["kept_label"]) for r in new] == [(["red"], True), (["blue"], False)]
    with pytest.warns(renamed.RenamedWarning, match="keep_grounded is now keep_labels"):
        assert prediction_rows(rows, preds, keep_grounded=True) == new
    assert prediction_rows(rows, preds, keep_grounded=False) == prediction_rows(rows, preds)
    with pytest.raises(TypeError, match="both keep_grounded .* and keep_labels"):
        prediction_rows(rows, preds, keep_labels=True, keep_grounded=False)


def test_the_old_keyword_of_predict_to_file_keeps_labels_and_warns(tmp_path):
    from pv2tea.inference.batch import predict_to_file

    class Fixed:
        def predict(self, chunk, *args, **kwargs):
            return [["blue"] for _ in chunk]

    with pytest.warns(renamed.RenamedWarning, match="keep_grounded is now keep_labels"):
        old = predict_to_file(Fixed(), _rows(), tmp_path / "old.jsonl", keep_grounded=True, progress=False)
    new = predict_to_file(Fixed(), _rows(), tmp_path / "new.jsonl", keep_labels=True, progress=False)
    assert old.kept == new.kept == 1
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("pv2tea.regularize.grounding", "keep_grounded", "keep_labels"),
        ("pv2tea.experiment", "keep_grounded_report", "kept_labels_report"),
    ],
)
def test_the_old_names_of_the_kept_labels_functions_import_and_warn(module, old, new):
    import importlib

    imported = importlib.import_module(module)
    with pytest.warns(renamed.RenamedWarning, match=f"{old} is now {new}"):
        assert getattr(imported, old) is getattr(imported, new)
    with pytest.raises(AttributeError, match="no attribute 'keep_nothing'"):
        imported.keep_nothing  # noqa: B018


def test_a_saved_report_and_row_with_the_old_kept_labels_names_read_under_the_new_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed.current_report({"overall": 1, "keep_grounded": 2}) == {"overall": 1, "kept_labels": 2}
        assert renamed.current_report({"keep_grounded": 2, "kept_labels": 3}) == {"kept_labels": 3}
        assert renamed.current_row_name("pv2tea+keep_grounded") == "pv2tea+kept_labels"
        assert renamed.current_row_name("keep_grounded") == "keep_grounded"  # a suffix only
        assert renamed.current_row_name("pv2tea+no_images") == "pv2tea+no_images"


def test_an_experiment_run_saved_with_the_old_kept_labels_key_is_reused_under_the_new(tmp_path):
    from pv2tea.eval.metrics import Example, source_aware_report
    from pv2tea.experiment import Split, run_experiment

    rows = _rows()
    report = source_aware_report([Example(("red",), ("red",), "text", "color", True)])
    kept = source_aware_report([Example(("red",), ("blue",), "text", "color", True)])
    saved = tmp_path / "weak_labels" / "seed_0" / "test_report.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({**report, "keep_grounded": kept}))
    summary = run_experiment(Split(rows, [], rows), tmp_path, ["weak_labels"], [0], log=lambda _: None)
    assert summary["weak_labels+kept_labels"]["overall"]["f1"]["mean"] == kept["overall"]["f1"]
    assert summary["weak_labels"]["overall"]["f1"]["mean"] == report["overall"]["f1"]
    assert "weak_labels+keep_grounded" not in summary
