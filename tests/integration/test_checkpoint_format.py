"""Model folders carry a format version: an older folder is upgraded on loading, one step at a time, and a folder of
a newer pv2tea is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from pv2tea.inference.predictor import Predictor
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.build import build_for_training, load_from_checkpoint, preprocess_state


def _save(cfg, directory, training=None):
    torch.manual_seed(0)
    model, pre = build_for_training(cfg, ["mug"])
    tensors = {"rng.torch": torch.get_rng_state()} if training is not None else None
    ckpt.save_checkpoint(
        directory, model, cfg, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer, training, tensors
    )
    return model


def _rewrite(directory, name, change):
    """Edit one JSON file of a model folder as an older (or newer) pv2tea would have written it; manifest kept true."""
    path = directory / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    ckpt.write_manifest(directory)


def _as_version_1(data):
    del data[ckpt.FORMAT_KEY]
    data["train"]["init_from"] = data["train"].pop("warm_start")


def test_a_new_folder_records_the_current_format_version(tiny_config, tmp_path):
    _save(tiny_config, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / ckpt.CONFIG_FILE).read_text())
    assert saved[ckpt.FORMAT_KEY] == ckpt.FORMAT_VERSION == 2
    assert {k: v for k, v in saved.items() if k != ckpt.FORMAT_KEY} == json.loads(json.dumps(tiny_config.to_dict()))
    assert ckpt.read_config(tmp_path / "m") == tiny_config


def test_every_older_version_has_one_migration_step():
    assert sorted(ckpt.MIGRATIONS) == list(range(1, ckpt.FORMAT_VERSION))


def test_a_version_1_folder_without_the_later_fields_loads(tiny_config, tmp_path):
    tiny_config.train.warm_start = "somewhere/final"
    model = _save(tiny_config, tmp_path / "m")
    _rewrite(tmp_path / "m", ckpt.CONFIG_FILE, _as_version_1)
    _rewrite(
        tmp_path / "m", ckpt.PREPROCESS_FILE, lambda d: [d.pop(k) for k in ("values", "multi_value", "value_counts")]
    )
    assert ckpt.read_config(tmp_path / "m").train.warm_start == "somewhere/final"
    assert ckpt.read_json(tmp_path / "m", ckpt.PREPROCESS_FILE)["value_counts"] == {}
    loaded, pre = load_from_checkpoint(tmp_path / "m")
    assert pre.values == {} and pre.value_counts == {}
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


def test_a_version_1_training_state_gets_the_fields_added_since(tiny_config, tmp_path):
    tiny_config.train.batch_size = 4
    state = {"step": 7, "epoch": 1, "step_in_epoch": 3, "optimizer": {}, "scheduler": {}, "rng": {}}
    _save(tiny_config, tmp_path / "m", training=state)
    _rewrite(tmp_path / "m", ckpt.CONFIG_FILE, _as_version_1)
    saved, _ = ckpt.load_training_state(tmp_path / "m")
    assert saved == {
        **state,
        "world_size": 1,
        "global_batch": 4,
        "rows_done": 12,  # 3 batches of 4 rows into the epoch
        "averaged_epochs": 0,
        "metrics_bytes": None,
        "epoch_sums": {},
        "epoch_stats": {},
    }


def test_a_current_training_state_is_read_as_written(tiny_config, tmp_path):
    state = {"step": 7, "epoch": 1, "step_in_epoch": 0, "rows_done": 0, "world_size": 2, "global_batch": 32}
    _save(tiny_config, tmp_path / "m", training=state)
    assert ckpt.load_training_state(tmp_path / "m")[0] == state


@pytest.mark.parametrize("load", [ckpt.read_config, Predictor.from_checkpoint, ckpt.load_training_state])
def test_a_folder_of_a_newer_format_is_refused_by_name(tiny_config, tmp_path, load):
    _save(tiny_config, tmp_path / "m", training={"step": 0, "epoch": 0, "step_in_epoch": 0})
    _rewrite(tmp_path / "m", ckpt.CONFIG_FILE, lambda d: d.update({ckpt.FORMAT_KEY: ckpt.FORMAT_VERSION + 1}))
    with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path / 'm'} is a model folder of format version 3.*upgrade"):
        load(tmp_path / "m")


@pytest.mark.parametrize("version", [0, "2", 1.5, True])
def test_a_format_version_that_is_not_a_positive_integer_is_refused(tiny_config, tmp_path, version):
    _save(tiny_config, tmp_path / "m")
    _rewrite(tmp_path / "m", ckpt.CONFIG_FILE, lambda d: d.update({ckpt.FORMAT_KEY: version}))
    with pytest.raises(ckpt.CheckpointError, match="format_version must be a positive integer"):
        ckpt.read_config(tmp_path / "m")
