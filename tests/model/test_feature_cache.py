"""Frozen-backbone feature cache: cached states must reproduce the live computation exactly."""

from __future__ import annotations

import pytest
import torch
from test_model import build, image_paths, records, single_thread  # noqa: F401  (fixtures)

from pv2tea.data.dataset import RecordDataset, make_collate
from pv2tea.train.feature_cache import build_feature_cache

FROZEN = ["vision.freeze=true", "text.freeze=true", "vision.max_images=2"]


@pytest.mark.parametrize(
    "extra",
    [
        FROZEN,
        ["vision.freeze=true"],
        ["text.freeze=true"],
        ["vision.freeze=true", "vision.extra_levels=[1, 2]"],
        ["vision.freeze=true", "vision.image_size=64", "vision.token_grid=1"],
    ],
)
def test_cached_forward_equals_live_forward(tiny_text_ckpt, image_paths, extra):  # noqa: F811
    model, pre = build(tiny_text_ckpt, *extra)
    rows = records(image_paths)
    dataset = RecordDataset(rows)
    live = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    pre.cache = build_feature_cache(model, pre, rows, batch_size=2)
    cached = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    assert (cached.images is None) == ("vision.freeze=true" in extra)
    assert (cached.text_hidden is not None) == ("text.freeze=true" in extra)
    if "vision.token_grid=1" in extra:  # the cache holds the pooled grid: one token per image
        assert {tuple(t.shape[:1]) for t in pre.cache.images.values()} == {(1,)}
        assert live.images.shape[-1] == 64  # while the native 64 px map has 2 x 2 positions
    model.eval()  # dropout of the trainable parts off: compare deterministic outputs
    with torch.no_grad():
        a, b = model.encode(live), model.encode(cached)
        torch.testing.assert_close(a.question, b.question, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.memory, b.memory, atol=1e-5, rtol=1e-4)
        la, lb = model(live).terms, model(cached).terms
    for key in la:
        torch.testing.assert_close(la[key], lb[key], atol=1e-5, rtol=1e-4)


def test_frozen_encoders_stay_in_eval_mode_and_untrained(tiny_text_ckpt, image_paths):  # noqa: F811
    model, pre = build(tiny_text_ckpt, *FROZEN)
    model.train()
    assert not model.text_encoder.training and not model.visual.backbone.training
    assert model.visual.proj.training and model.fusion.training
    rows = records(image_paths)
    pre.cache = build_feature_cache(model, pre, rows, batch_size=4)
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    batch = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    out = model(batch)
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith(("text_encoder.", "visual.backbone.")) for n in trained)
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert (
        model.visual.proj[0].weight.grad is not None
        and model.fusion.layers[0].crossattention.self.query.weight.grad is not None
    )
    assert all(torch.equal(before[k], v) for k, v in model.text_encoder.state_dict().items())


def test_cache_refuses_mismatched_tokenization(tiny_text_ckpt, image_paths):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "text.freeze=true")
    rows = records(image_paths)
    pre.cache = build_feature_cache(model, pre, rows, batch_size=4)
    key = next(iter(pre.cache.texts))
    pre.cache.texts[key] = pre.cache.texts[key][:-1]  # one token short
    with pytest.raises(RuntimeError, match="cached text states"):
        make_collate(pre, RecordDataset(rows), with_answers=False)(list(range(len(rows))))


def test_partial_text_fine_tuning_trains_only_the_top_layers(tiny_text_ckpt, image_paths):  # noqa: F811
    """text.train_layers=1: the cache holds the frozen bottom's output, the top layer runs (and learns) per step,
    and the cached forward equals the live one."""
    model, pre = build(tiny_text_ckpt, "vision.freeze=true", "text.train_layers=1")
    layers = model.text_encoder.encoder.layer
    assert model.text_frozen_layers == len(layers) - 1 >= 1
    model.train()
    assert layers[-1].training and not layers[0].training and not model.text_encoder.embeddings.training
    rows = records(image_paths)
    dataset = RecordDataset(rows)
    live = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    pre.cache = build_feature_cache(model, pre, rows, batch_size=2)
    cached = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    assert cached.text_hidden is not None
    model.eval()
    with torch.no_grad():
        real = live.text_mask.bool()  # padding positions differ (zeros in the cache) and are masked everywhere
        a, b = model.encode(live), model.encode(cached)
        torch.testing.assert_close(a.text_hidden[real], b.text_hidden[real], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.question, b.question, atol=1e-5, rtol=1e-4)
    model.train()
    model(cached).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("text_encoder.")}
    top = f"text_encoder.encoder.layer.{len(layers) - 1}."
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(top))
    assert all(g is None for n, g in grads.items() if not n.startswith(top))
    assert not model.fusion.embeddings.word_embeddings.weight.requires_grad


def test_train_layers_must_be_positive_and_freeze_wins(tiny_text_ckpt):  # noqa: F811
    from pv2tea.config import ConfigError

    with pytest.raises(ConfigError, match="text.train_layers"):
        build(tiny_text_ckpt, "text.train_layers=0")
    model, _ = build(tiny_text_ckpt, "text.freeze=true", "text.train_layers=1")
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_train_layers_beyond_the_encoder_is_refused(tiny_text_ckpt):  # noqa: F811
    with pytest.raises(ValueError, match="text.train_layers=9"):
        build(tiny_text_ckpt, "text.train_layers=9")


def test_train_layers_equal_to_the_encoder_caches_the_embeddings(tiny_text_ckpt, image_paths):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "text.train_layers=2")  # the tiny encoder has 2 layers: all of them train
    assert model.text_frozen_layers == 0 and model.text_cached
    assert not model.text_encoder.embeddings.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for p in model.text_encoder.encoder.parameters())
    rows = records(image_paths)
    pre.cache = build_feature_cache(model, pre, rows, batch_size=4)
    batch = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    live = make_collate(pre, RecordDataset(rows), with_answers=True)
    pre.cache = None
    live_batch = live(list(range(len(rows))))
    assert batch.text_hidden is not None and live_batch.text_hidden is None
    model.eval()
    with torch.no_grad():
        real = batch.text_mask.bool()
        torch.testing.assert_close(
            model.encode(batch).text_hidden[real], model.encode(live_batch).text_hidden[real], atol=1e-5, rtol=1e-4
        )


def test_top_block_fine_tuning_caches_the_lower_part_and_trains_the_top(tiny_text_ckpt, image_paths):  # noqa: F811
    """vision.train_blocks=1: the cache holds the backbone's frozen lower part, the top block runs (and learns) per
    step and stays in training mode, and the cached forward equals the live one."""
    model, pre = build(tiny_text_ckpt, "vision.train_blocks=1", "vision.extra_levels=[1]", "text.freeze=true")
    visual = model.visual
    assert model.visual_cached and visual.cut == len(visual.backbone.blocks) - 1
    model.train()
    assert visual.backbone.blocks[-1].training and not visual.backbone.blocks[0].training
    rows = records(image_paths)
    dataset = RecordDataset(rows)
    live = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    pre.cache = build_feature_cache(model, pre, rows, batch_size=2)
    cached = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    assert cached.images is None and cached.image_feats is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(live).question, model.encode(cached).question, atol=1e-5, rtol=1e-4)
    model.train()
    model(cached).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("visual.backbone.")}
    top = f"visual.backbone.blocks.{visual.cut}."
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(top))
    assert all(
        g is None for n, g in grads.items() if n.startswith(("visual.backbone.blocks.0.", "visual.backbone.conv_stem"))
    )
    assert all(g is not None for n, g in grads.items() if n.startswith("visual.backbone.conv_head"))


def test_train_blocks_must_be_positive(tiny_text_ckpt):  # noqa: F811
    from pv2tea.config import ConfigError

    with pytest.raises(ConfigError, match="vision.train_blocks=0"):
        build(tiny_text_ckpt, "vision.train_blocks=0")
