"""The on-disk feature cache (pv2tea.cache): equal to live encoding, extended for changed content, partial and stale
folders detected."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from test_model import build, image_paths, records, single_thread  # noqa: F401  (fixtures)

from pv2tea.cache import build as cache_build
from pv2tea.cache import store as cache_store
from pv2tea.cache.build import ensure_cache, run_cache_rows
from pv2tea.cache.store import FeatureCacheError, FeatureStore, inspect_folder, summary
from pv2tea.data.dataset import RecordDataset, make_collate

FROZEN = ["vision.freeze=true", "text.train_layers=1", "vision.max_images=2"]


def _ensure(folder, model, pre, rows, **kw):
    images, texts = run_cache_rows(model, pre, rows)
    return ensure_cache(folder, model, pre, images, texts, batch_size=2, **kw)


def test_disk_cache_batches_equal_live_ones(tiny_text_ckpt, image_paths, tmp_path):  # noqa: F811
    model, pre = build(tiny_text_ckpt, *FROZEN)
    rows = records(image_paths)
    dataset = RecordDataset(rows)
    live = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    store, counts = _ensure(tmp_path / "cache", model, pre, rows, shard_bytes=1)  # one row per shard
    assert counts == {"images_encoded": 4, "texts_encoded": 4}
    pre.cache = store
    cached = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    assert cached.images is None and cached.image_feats is not None and cached.extra_feats is not None
    assert cached.text_hidden is not None
    info = summary(tmp_path / "cache")
    assert info["complete"] and info["images"]["rows"] == 4 and info["images"]["shards"] == 4
    assert info["texts"]["rows"] == 4 and info["texts"]["identity"]["frozen_layers"] == 1
    model.eval()
    with torch.no_grad():
        a, b = model.encode(live), model.encode(cached)
        torch.testing.assert_close(a.question, b.question, atol=1e-5, rtol=1e-4)
        la, lb = model(live).terms, model(cached).terms
    for key in la:
        torch.testing.assert_close(la[key], lb[key], atol=1e-5, rtol=1e-4)
    # a second pass over the same rows encodes nothing and leaves the folder as it was
    before = sorted(os.listdir(tmp_path / "cache"))
    _, again = _ensure(tmp_path / "cache", model, pre, rows)
    assert again == {"images_encoded": 0, "texts_encoded": 0}
    assert sorted(os.listdir(tmp_path / "cache")) == before


def test_changed_image_bytes_get_new_features(tiny_text_ckpt, image_paths, tmp_path):  # noqa: F811
    folder = tmp_path / "images"
    shutil.copytree(os.path.dirname(image_paths[0]), folder)
    paths = [str(folder / os.path.basename(p)) for p in image_paths]
    model, pre = build(tiny_text_ckpt, "vision.freeze=true")
    rows = records(paths)
    store, _ = _ensure(tmp_path / "cache", model, pre, rows)
    old = store.image_tokens([paths[0]])
    Image.new("RGB", (40, 30), (10, 240, 10)).save(paths[0])  # same path, other bytes
    fresh = FeatureStore(tmp_path / "cache")
    assert not fresh.has_images(rows[:1], 1)  # the stale entry is not found under the new bytes
    store, counts = _ensure(tmp_path / "cache", model, pre, rows)
    assert counts["images_encoded"] == 1
    new = store.image_tokens([paths[0]])
    live = model.visual.backbone_tokens(pre.image_tensor(rows[0]).unsqueeze(0))
    torch.testing.assert_close(new, live, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(new, old)


def test_other_backbone_is_refused(tiny_text_ckpt, image_paths, tmp_path):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "vision.freeze=true")
    rows = records(image_paths)
    _ensure(tmp_path / "cache", model, pre, rows)
    other, other_pre = build(tiny_text_ckpt, "vision.freeze=true", seed=1)  # other random backbone weights
    with pytest.raises(FeatureCacheError, match="stale.*weights_sha256"):
        _ensure(tmp_path / "cache", other, other_pre, rows)
    bigger, bigger_pre = build(tiny_text_ckpt, "vision.freeze=true", "vision.image_size=48")
    with pytest.raises(FeatureCacheError, match="data_config"):
        FeatureStore(tmp_path / "cache", cache_build.wanted_identity(bigger, bigger_pre))
    _, counts = _ensure(tmp_path / "cache", other, other_pre, rows, rebuild=True)
    assert counts["images_encoded"] == 3  # the first image of each product (vision.max_images=1)


def test_interrupted_build_is_detected_and_resumed(tiny_text_ckpt, image_paths, tmp_path, monkeypatch):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "vision.freeze=true", "text.freeze=true")
    rows = records(image_paths)
    written = []
    real = cache_store.write_shard

    def dies_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(real(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(cache_store, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _ensure(tmp_path / "cache", model, pre, rows, shard_bytes=1)
    (tmp_path / "cache" / ".images-000002.safetensors.tmp").write_bytes(b"cut off")
    status = inspect_folder(tmp_path / "cache")
    assert status.state == "partial" and status.manifest is None and len(status.unlisted) == 2
    info = summary(tmp_path / "cache")
    assert not info["complete"] and "interrupted" in info["problem"]
    with pytest.raises(FeatureCacheError, match="not a complete feature cache"):
        FeatureStore(tmp_path / "cache")
    monkeypatch.setattr(cache_store, "write_shard", real)
    notes = []
    store, counts = _ensure(tmp_path / "cache", model, pre, rows, shard_bytes=1, notify=notes.append)
    assert any("interrupted" in n for n in notes)
    assert counts["images_encoded"] == 1  # of the 3 first images, the two finished shards are kept
    assert inspect_folder(tmp_path / "cache").state == "complete" and store.n_images == 3 and store.n_texts == 4


def test_damaged_shard_is_refused(tiny_text_ckpt, image_paths, tmp_path):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "vision.freeze=true")
    _ensure(tmp_path / "cache", model, pre, records(image_paths))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    shard = tmp_path / "cache" / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FeatureCacheError, match="damaged"):
        FeatureStore(tmp_path / "cache")
    assert summary(tmp_path / "cache")["state"] == "damaged"


def test_top_block_fine_tuning_caches_the_lower_part_under_its_own_identity(tiny_text_ckpt, image_paths, tmp_path):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "vision.train_blocks=1", "text.freeze=true")
    rows = records(image_paths)
    live = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    store, counts = _ensure(tmp_path / "cache", model, pre, rows)
    assert counts["images_encoded"] == 3
    assert summary(tmp_path / "cache")["images"]["identity"]["train_blocks"] == 1
    pre.cache = store
    cached = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(live).question, model.encode(cached).question, atol=1e-5, rtol=1e-4)
    # training the top block does not make the cache stale; the lower part's weights are its identity
    with torch.no_grad():
        for p in model.visual.top_modules()[0].parameters():
            p.add_(0.5)
    assert _ensure(tmp_path / "cache", model, pre, rows)[1]["images_encoded"] == 0
    whole, whole_pre = build(tiny_text_ckpt, "vision.freeze=true", "text.freeze=true")  # same weights, other split
    with pytest.raises(FeatureCacheError, match="train_blocks"):
        _ensure(tmp_path / "cache", whole, whole_pre, rows)
