"""Checkpoint round trip: the reloaded model predicts exactly what the saved one did."""

from __future__ import annotations

import torch

from pv2tea.data.schema import Record
from pv2tea.inference.predictor import Predictor, build_for_training, generate_values, preprocess_state
from pv2tea.train import checkpoint as ckpt


def test_round_trip_identical_predictions(tiny_config, tmp_path):
    from PIL import Image

    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), color).save(p)
        paths.append(str(p))
    records = [Record(id=f"r{i}", text=f"a {c} mug with dots", images=(p,) if i < 2 else (), category="mug",
                      attribute="color", label=(c,)) for i, (c, p) in enumerate(zip(["red", "blue", "green"], paths))]
    torch.manual_seed(0)
    model, pre = build_for_training(tiny_config, ["mug", "vase"])
    with torch.no_grad():  # make the decoder's outputs depend on the inputs in a non-trivial way
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    before = generate_values(model, pre, records, batch_size=2)
    ids_before = model.generate(pre.collate(records, [0, 1, 2], [0, 1, 2], False), 101, 102, 0)
    ckpt.save_checkpoint(tmp_path / "ckpt", model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre),
                         pre.tokenizer)
    loaded = Predictor.from_checkpoint(tmp_path / "ckpt")
    assert loaded.predict(records, batch_size=2) == before
    ids_after = loaded.model.generate(loaded.pre.collate(records, [0, 1, 2], [0, 1, 2], False), 101, 102, 0)
    assert torch.equal(ids_before, ids_after)
    sd_a, sd_b = model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    masks = loaded.attention_masks(records)
    assert masks[2] is None and masks[0].ndim == 2 and float(masks[0].min()) > 0


def test_atomic_save_keeps_previous_checkpoint_on_failure(tiny_config, tmp_path, monkeypatch):
    model, pre = build_for_training(tiny_config, ["mug"])
    target = tmp_path / "ckpt"
    ckpt.save_checkpoint(target, model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer)
    before = (target / ckpt.MODEL_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pre.tokenizer, "save_pretrained", boom)
    try:
        ckpt.save_checkpoint(target, model, tiny_config, model.bert_config.to_dict(), preprocess_state(pre),
                             pre.tokenizer)
    except OSError:
        pass
    assert (target / ckpt.MODEL_FILE).read_bytes() == before
