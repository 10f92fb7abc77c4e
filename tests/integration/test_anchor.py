"""optim.anchor_decay: a decoupled L2 pull of the warm-started parameters toward the warm start (L2-SP)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_overrides
from pv2tea.config import ConfigError, load_config
from pv2tea.data.schema import Record
from pv2tea.train.anchor import WeightAnchor
from pv2tea.train.loop import train

MODEL_FILE = "model.safetensors"


def test_pull_moves_anchored_parameters_a_fraction_lr_times_lambda_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    anchor = WeightAnchor(model, {"0.weight", "0.bias"}, decay=2.0)
    assert len(anchor) == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    anchor.pull(optimizer)  # rate = 0.1 · 2 = 0.2
    after = model.state_dict()
    for k in ("0.weight", "0.bias"):
        torch.testing.assert_close(after[k], moved[k] + 0.2 * (start[k] - moved[k]))
    for k in ("1.weight", "1.bias"):  # not anchored: untouched
        assert torch.equal(after[k], moved[k])
    # the anchor is a copy: it does not follow the model
    torch.testing.assert_close(anchor.anchors[model[0].weight], start["0.weight"])


def test_pull_uses_each_groups_lr_and_refuses_an_overshoot():
    model = nn.Linear(2, 2)
    anchor = WeightAnchor(model, {"weight", "bias"}, decay=5.0)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.0}])
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
    bias = model.bias.detach().clone()
    anchor.pull(optimizer)
    assert torch.equal(model.bias, bias)  # lr 0 in its group: no pull
    torch.testing.assert_close(model.weight, anchor.anchors[model.weight] + 0.5)  # half-way back
    optimizer.param_groups[0]["lr"] = 1.0
    with pytest.raises(ValueError, match="anchor_decay"):
        anchor.pull(optimizer)
    with pytest.raises(ValueError, match=">= 0"):
        WeightAnchor(model, {"weight"}, decay=-1.0)


def test_a_negative_anchor_decay_is_refused(tiny_text_ckpt):
    with pytest.raises(ConfigError, match="optim.anchor_decay"):
        load_config(None, [*tiny_overrides(tiny_text_ckpt), "optim.anchor_decay=-1"])


def _products(folder) -> list[Record]:
    from PIL import Image

    out = []
    for i, c in enumerate(["green", "black"] * 4):  # other labels than the warm start's: training pulls away
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), c).save(path)
        out.append(Record(f"p{i}", f"mug {i}", (str(path),), "mug", "color", (c,)))
    return out


def _distance_to(final, source) -> float:
    keys = [k for k in final if k.startswith(("decoder.", "text_encoder.")) and k in source]
    assert keys
    return sum(float((final[k].float() - source[k].float()).pow(2).sum()) for k in keys) ** 0.5


def test_training_with_an_anchor_stays_nearer_the_warm_start_and_resumes_exactly(tea_final, tiny_text_ckpt, tmp_path):
    products = _products(tmp_path)
    base = [*tiny_overrides(tiny_text_ckpt), f"train.warm_start={tea_final}", "train.epochs=3"]
    source = load_file(str(tea_final / MODEL_FILE))
    finals = {}
    for decay in (0, 500):
        run = tmp_path / f"run{decay}"
        train(load_config(None, [*base, f"optim.anchor_decay={decay}"]), products, run, progress=False)
        finals[decay] = load_file(str(run / "final" / MODEL_FILE))
    assert "anchored" in (tmp_path / "run500" / "train.log").read_text()
    free, anchored = _distance_to(finals[0], source), _distance_to(finals[500], source)
    assert anchored < 0.5 * free, (anchored, free)

    # stopped after 3 steps and resumed: the anchor is the warm start again, not the checkpoint's weights
    part = tmp_path / "part"
    cfg = load_config(None, [*base, "optim.anchor_decay=500", "train.max_steps=3", "train.save_every_steps=1"])
    train(cfg, products, part, progress=False)
    cfg = load_config(None, [*base, "optim.anchor_decay=500"])
    train(cfg, products, part, progress=False, resume=True)
    resumed = load_file(str(part / "final" / MODEL_FILE))
    assert resumed.keys() == finals[500].keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], finals[500][k], rtol=0, atol=1e-6, msg=k)
