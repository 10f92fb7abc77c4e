"""train.warm_start: a run starts from another run's text encoder, fusion and decoder (a text-only warm start)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from pv2tea.config import ConfigError, load_config, upgrade_saved
from pv2tea.data.schema import Record
from pv2tea.experiment import TEA, check_same_config
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.build import build_for_training, load_from_checkpoint
from pv2tea.train.loop import build_optimizer, train


def _products(tmp_path) -> list[Record]:
    from PIL import Image

    out = []
    for i, c in enumerate(["red", "blue"] * 3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), c).save(path)
        out.append(Record(f"p{i}", f"mug {i}", (str(path),), "mug", "color", (c,)))
    return out


def test_pv2tea_starts_from_a_text_only_run(tea_final, tiny_text_ckpt, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_text_ckpt))
    model, _ = build_for_training(cfg, ["mug"])
    visual_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("visual.")}
    source = load_file(str(tea_final / ckpt.MODEL_FILE))
    n = ckpt.load_warm_start(model, tea_final)
    state = model.state_dict()
    shared = [k for k in state if k.startswith(model.warm_start_prefixes)]
    assert n == len(shared) > 0
    saved = [k for k in shared if k in source]  # tied weights (decoder output = its word embeddings) are saved once
    assert len(saved) >= len(shared) - 2 and all(torch.equal(state[k], source[k]) for k in saved)
    # the TEA run trained its top text layers and decoder: the warm start is not the pretrained text model
    fresh, _ = build_for_training(cfg, ["mug"])
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in shared if k.startswith("decoder."))
    assert all(torch.equal(state[k], v) for k, v in visual_before.items())  # the visual side is left alone
    model.sync_momentum()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.text_encoder.state_dict().values(), model.text_encoder_m.state_dict().values())
    )


def test_training_with_warm_start_logs_and_uses_the_warm_start(tea_final, tiny_text_ckpt, tmp_path):
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_text_ckpt),
            f"train.warm_start={tea_final}",
            "train.epochs=1",
            "optim.lr=1e-30",
            "optim.head_lr=1e-30",
        ],
    )  # updates vanish in float32: the final model is the warm start
    run = tmp_path / "run"
    train(cfg, _products(tmp_path), run, progress=False)
    assert "warm start:" in (run / "train.log").read_text()
    source = load_file(str(tea_final / ckpt.MODEL_FILE))
    final = load_file(str(run / "final" / ckpt.MODEL_FILE))
    decoder = [k for k in final if k.startswith("decoder.") and k in source]
    assert decoder and all(torch.equal(final[k], source[k]) for k in decoder)

    # the run is recognized by the warm start's content: a moved copy of it matches, other weights do not
    moved = tmp_path / "moved" / "final"
    shutil.copytree(tea_final, moved)
    check_same_config(run, _with_warm_start(cfg, moved))
    other = tmp_path / "other"
    shutil.copytree(tea_final, other)
    weights = load_file(str(other / ckpt.MODEL_FILE))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(other / ckpt.MODEL_FILE))
    with pytest.raises(ConfigError, match="train.warm_start"):
        check_same_config(run, _with_warm_start(cfg, other))
    # retrained in place (same path, other weights): the finished run is not taken for one of the new warm start
    shutil.copy(other / ckpt.MODEL_FILE, moved / ckpt.MODEL_FILE)
    with pytest.raises(ConfigError, match="sha256.*weights have changed"):
        check_same_config(run, _with_warm_start(cfg, moved))

    # a run saved before optim.warm_start_lr existed trained its warm-started parts at head_lr: it is not taken for
    # a run of the new default, and resuming it keeps its optimizer groups
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["optim"]["warm_start_lr"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="optim.warm_start_lr: 'head_lr' there, 'lr' now"):
        check_same_config(run, cfg)
    old_default = copy.deepcopy(cfg)
    old_default.optim.warm_start_lr = "head_lr"
    check_same_config(run, old_default)
    assert load_config(None, base=upgrade_saved(saved)).optim.warm_start_lr == "head_lr"
    assert upgrade_saved({"optim": {}, "train": {}}) == {"optim": {}, "train": {}}  # no warm start: nothing to fill

    # a damaged record names its file instead of failing somewhere later
    (run / ckpt.WARM_START_FILE).write_text('{"sha256": null}')
    with pytest.raises(ConfigError, match=f"{ckpt.WARM_START_FILE} is unreadable"):
        check_same_config(run, old_default)


def _with_warm_start(cfg, path):
    out = copy.deepcopy(cfg)
    out.train.warm_start = str(path)
    return out


def test_warm_start_that_does_not_fit_names_the_checkpoint(tea_final, tiny_text_ckpt, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), "decoder.num_layers=2"])  # the TEA run has 1
    model, _ = build_for_training(cfg, ["mug"])
    with pytest.raises(ckpt.CheckpointError, match="does not fit.*decoder"):
        ckpt.load_warm_start(model, tea_final)
    with pytest.raises(ckpt.CheckpointError, match="not a pv2tea checkpoint"):
        ckpt.load_warm_start(model, tmp_path)


@pytest.mark.parametrize(("warm_start_lr", "scale"), [("lr", 1.0), ("head_lr", 1.0), ("lr", 0.1), ("head_lr", 0.5)])
def test_warm_started_parts_train_at_the_chosen_rate(tea_final, tiny_text_ckpt, warm_start_lr, scale):
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_text_ckpt),
            "optim.lr=1e-4",
            "optim.head_lr=1e-3",
            f"train.warm_start={tea_final}",
            f"optim.warm_start_lr={warm_start_lr}",
            f"optim.warm_start_lr_scale={scale}",
        ],
    )
    model, _ = build_for_training(cfg, ["mug"])
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    cross = [n for n in names if n.startswith("decoder.") and "crossattention" in n and names[n].requires_grad]
    visual_new = [
        n for n in names if n.startswith("visual.") and names[n].requires_grad and not n.startswith("visual.backbone.")
    ]
    assert cross and visual_new  # a new part of the decoder, and the visual side the warm start leaves alone
    text = [n for n in names if n.startswith("text_encoder.") and names[n].requires_grad]  # pretrained, then warm
    assert text
    expected = (1e-4 if warm_start_lr == "lr" else 1e-3) * scale
    assert sorted({lr_of[id(names[n])] for n in cross}) == pytest.approx([expected])
    assert sorted({lr_of[id(names[n])] for n in text}) == pytest.approx([1e-4 * scale])
    assert {lr_of[id(names[n])] for n in visual_new} == {1e-3}  # the scale is for what the warm start filled only
    cold = load_config(None, [*tiny_overrides(tiny_text_ckpt), "optim.lr=1e-4", "optim.head_lr=1e-3"])
    cold_model, _ = build_for_training(cold, ["mug"])
    cold_lr = {id(p): g["lr"] for g in build_optimizer(cold_model, cold, 10)[0].param_groups for p in g["params"]}
    cold_names = dict(cold_model.named_parameters())
    assert {cold_lr[id(cold_names[n])] for n in cross} == {1e-3}  # without a warm start they are new


def test_a_carried_over_head_is_scaled_with_the_warm_start_at_either_rate(tmp_path, tiny_text_ckpt):
    rows = [Record(f"t{i}", f"a {c} mug {i}", (), "mug", "color", (c,)) for i, c in enumerate(["red", "blue"] * 4)]
    base = [*tiny_overrides(tiny_text_ckpt), "decoder.head=classify", "optim.lr=1e-4", "optim.head_lr=1e-3"]
    train(load_config(None, [*base, *TEA, "train.epochs=1"]), rows, tmp_path / "warm", progress=False)
    for rate, expected in (("lr", 1e-5), ("head_lr", 1e-4)):
        cfg = load_config(
            None,
            [
                *base,
                f"train.warm_start={tmp_path / 'warm' / 'final'}",
                f"optim.warm_start_lr={rate}",
                "optim.warm_start_lr_scale=0.1",
            ],
        )
        model, _ = build_for_training(cfg, ["mug"], {"color": ["blue", "red"]})
        optimizer, _ = build_optimizer(model, cfg, total_steps=10)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        assert lr_of[id(model.value_head.weight)] == pytest.approx(expected), rate


def test_unknown_warm_start_lr_is_refused(tiny_text_ckpt):
    with pytest.raises(ConfigError, match="optim.warm_start_lr"):
        load_config(None, [*tiny_overrides(tiny_text_ckpt), "optim.warm_start_lr=fast"])
    with pytest.raises(ConfigError, match="optim.warm_start_lr_scale must be > 0"):
        load_config(None, [*tiny_overrides(tiny_text_ckpt), "optim.warm_start_lr_scale=0"])


def test_a_gated_visual_path_keeps_the_warm_start_until_its_gate_opens(tea_final, tiny_text_ckpt, tmp_path):
    """fusion.visual_gate=0: warm-started from a TEA, PV2TEA reads the products exactly as the TEA does (before
    training; in training, text dropout hides some rows' text)."""
    tea, tea_pre = load_from_checkpoint(tea_final)
    assert all(layer.visual_attention is None for layer in tea.fusion.layers)  # a TEA has no visual path
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), "fusion.visual_gate=0", f"train.warm_start={tea_final}"])
    model, pre = build_for_training(cfg, ["mug"])
    ckpt.load_warm_start(model, tea_final)  # the gated path is not in the TEA's checkpoint and is left new
    _, new = model.parameter_groups(warm_started=True)
    gated = {id(p) for n, p in model.named_parameters() if ".visual_" in n}
    assert gated and gated <= {id(p) for p in new}  # it trains at head_lr

    rows = [*_products(tmp_path), Record("t", "a red mug", (), "mug", "color", ("red",))]
    batch = pre.collate(rows, list(range(len(rows))), list(range(len(rows))), with_answers=True)
    tea_batch = tea_pre.collate(rows, list(range(len(rows))), list(range(len(rows))), with_answers=True)
    assert bool(batch.has_image[:-1].all()) and not bool(batch.has_image[-1])
    model.eval()
    tea.eval()
    with torch.no_grad():
        q_tea = tea.encode(tea_batch).question
        q = model.encode(batch).question
        torch.testing.assert_close(q, q_tea)
        tok = pre.tokenizer
        ids = dict(bos_id=tok.cls_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id)
        assert torch.equal(model.generate(batch, **ids), tea.generate(tea_batch, **ids))

        for layer in model.fusion.layers:
            layer.visual_gate.fill_(1.0)
        q_open = model.encode(batch).question
    assert not torch.allclose(q_open[:-1], q_tea[:-1])  # image rows now read their image
    torch.testing.assert_close(q_open[-1], q_tea[-1])  # the row without an image is untouched


def test_the_gate_learns_from_zero_and_then_trains_its_attention(tiny_text_ckpt, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), "fusion.visual_gate=0"])
    model, pre = build_for_training(cfg, ["mug"])
    rows = _products(tmp_path)
    batch = pre.collate(rows, list(range(len(rows))), list(range(len(rows))), with_answers=True)
    model.train()
    model(batch).loss.backward()
    layer = model.fusion.layers[0]
    assert float(layer.visual_gate.grad.abs()) > 0  # tanh'(0) = 1: the closed gate still hears the loss
    assert all(p.grad is None or not bool(p.grad.any()) for p in layer.visual_attention.parameters())
    model.zero_grad()
    with torch.no_grad():
        layer.visual_gate.fill_(0.5)
    model(batch).loss.backward()
    assert all(p.grad is not None and bool(p.grad.any()) for p in layer.visual_attention.parameters())

    run = tmp_path / "run"  # a training run records how far each layer's gate opened, epoch by epoch
    train(
        load_config(None, [*tiny_overrides(tiny_text_ckpt), "fusion.visual_gate=0", "train.epochs=1"]),
        rows,
        run,
        progress=False,
    )
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["visual_gate"]) == 1 and 0 < abs(record["visual_gate"][0]) < 1
    reloaded, _ = load_from_checkpoint(run / "final")  # the saved model is rebuilt with its gated path
    assert reloaded.fusion.gate_openings() == record["visual_gate"]
