"""Checkpoint round trip: the reloaded model predicts exactly what the saved one did."""

from __future__ import annotations

import json

import pytest
import torch

from pv2tea.data.schema import Record
from pv2tea.decoding.generate import generate_values
from pv2tea.inference.predictor import Predictor
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.build import build_for_training, preprocess_state


def test_round_trip_identical_predictions(tiny_config, tmp_path):
    from PIL import Image

    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), color).save(p)
        paths.append(str(p))
    records = [
        Record(
            id=f"r{i}",
            text=f"a {c} mug with dots",
            images=(p,) if i < 2 else (),
            category="mug",
            attribute="color",
            label=(c,),
        )
        for i, (c, p) in enumerate(zip(["red", "blue", "green"], paths))
    ]
    torch.manual_seed(0)
    model, pre = build_for_training(tiny_config, ["mug", "vase"])
    with torch.no_grad():  # make the decoder's outputs depend on the inputs in a non-trivial way
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    before = generate_values(model, pre, records, batch_size=2)
    ids_before = model.generate(pre.collate(records, [0, 1, 2], [0, 1, 2], False), 101, 102, 0)
    ckpt.save_checkpoint(
        tmp_path / "ckpt", model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer
    )
    loaded = Predictor.from_checkpoint(tmp_path / "ckpt")
    assert loaded.predict(records, batch_size=2) == before
    ids_after = loaded.model.generate(loaded.pre.collate(records, [0, 1, 2], [0, 1, 2], False), 101, 102, 0)
    assert torch.equal(ids_before, ids_after)
    sd_a, sd_b = model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    masks = loaded.attention_masks(records)
    assert masks[2] is None and masks[0].ndim == 2 and float(masks[0].min()) > 0


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_atomic_save_keeps_previous_checkpoint_on_failure(tiny_config, tmp_path, monkeypatch):
    """A save that fails after writing the new weights (here: the tokenizer, the last file but the training state)
    raises, and leaves the previous checkpoint in place, loadable, with the previous weights."""
    model, pre = build_for_training(tiny_config, ["mug"])
    target = tmp_path / "ckpt"
    ckpt.save_checkpoint(
        target,
        model,
        tiny_config,
        model.bert_config.to_dict(),
        preprocess_state(pre),
        pre.tokenizer,
        {"step": 1},
        {"x": torch.ones(2)},
    )
    first = _state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the failed save would have written different weights

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pre.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(
            target,
            model,
            tiny_config,
            model.bert_config.to_dict(),
            preprocess_state(pre),
            pre.tokenizer,
            {"step": 2},
            {"x": torch.zeros(2)},
        )
    for name in (
        ckpt.MODEL_FILE,
        ckpt.CONFIG_FILE,
        ckpt.TEXT_CONFIG_FILE,
        ckpt.PREPROCESS_FILE,
        ckpt.STATE_FILE,
        ckpt.OPTIM_FILE,
    ):
        assert (target / name).is_file(), name
    reloaded = Predictor.from_checkpoint(target).model.state_dict()
    assert reloaded.keys() == first.keys()
    assert all(torch.equal(reloaded[k], first[k]) for k in first)
    assert not all(torch.equal(model.state_dict()[k], first[k]) for k in first)  # the live model had moved on
    state, tensors = ckpt.load_training_state(target)
    assert state == {"step": 1} and torch.equal(tensors["x"], torch.ones(2))


def test_crash_between_the_renames_keeps_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    model, pre = build_for_training(tiny_config, ["mug"])
    target = tmp_path / "ckpt"
    ckpt.save_checkpoint(target, model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer)
    replace = ckpt.os.replace

    def crash_on_moving_the_new_folder_in(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt  # the process dies here
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_moving_the_new_folder_in)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(
            target, model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer
        )
    monkeypatch.setattr(ckpt.os, "replace", replace)
    old = target.with_name("ckpt.old")
    assert not target.exists() and old.is_dir()  # the crash fell between the two renames
    Predictor.from_checkpoint(target)  # the previous checkpoint, moved back under its own name
    assert target.is_dir() and not old.exists()
    target.rename(old)  # the same state once more: a resume check and the next save recover it too
    assert ckpt.checkpoint_exists(target) and not old.exists()
    target.rename(old)
    ckpt.save_checkpoint(target, model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer)
    assert target.is_dir() and not old.exists() and not list(tmp_path.glob("ckpt.tmp-*"))


def test_a_folder_with_the_copy_decoders_old_key_bias_loads_and_answers_the_same(tiny_config, tmp_path):
    """Older model folders hold a bias of the copy decoder's keys; it adds one score to every position of a row, which
    the softmax cancels: loading ignores it and the answers stay those of the model that had it."""
    records = [
        Record(id=f"r{i}", text=f"a {c} mug with dots", images=(), category="mug", attribute="color", label=(c,))
        for i, c in enumerate(["red", "blue", "green"])
    ]
    tiny_config.decoder.copy = True
    torch.manual_seed(0)
    model, pre = build_for_training(tiny_config, ["mug"])
    assert model.decoder.copy_key.bias is None
    hidden = model.decoder.copy_key.out_features
    model.decoder.copy_key.bias = torch.nn.Parameter(torch.randn(hidden))  # as older folders were trained
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = pre.collate(records, [0, 1, 2], [0, 1, 2], False)
    ids_before = model.generate(batch, 101, 102, 0)
    ckpt.save_checkpoint(
        tmp_path / "old", model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old" / ckpt.MODEL_FILE), "pt") as f:
        assert "decoder.copy_key.bias" in f.keys()
    with pytest.raises(ckpt.CheckpointError, match="copy_key.bias"):  # a current folder has no such weight
        Predictor.from_checkpoint(tmp_path / "old")
    config = json.loads((tmp_path / "old" / ckpt.CONFIG_FILE).read_text())
    del config[ckpt.FORMAT_KEY]  # as the folders written before format versions
    (tmp_path / "old" / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    ckpt.write_manifest(tmp_path / "old")
    loaded = Predictor.from_checkpoint(tmp_path / "old")
    assert loaded.model.decoder.copy_key.bias is None
    assert torch.equal(loaded.model.generate(batch, 101, 102, 0), ids_before)
