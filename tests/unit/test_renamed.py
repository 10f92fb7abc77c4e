"""Old spellings still work after a rename, warn once naming the new one, and mean exactly what the new one means."""

from __future__ import annotations

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
