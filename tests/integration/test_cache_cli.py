"""pv2tea cache build / info and training on the cache folder (train.feature_cache_dir): the same losses as the
in-memory cache; a partial folder completed with a warning, a stale one refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import tiny_overrides
from pv2tea.cli import main

FROZEN = ["vision.freeze=true", "text.train_layers=1", "train.epochs=1", "schemes.mention_dropout=0.5"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_ckpt):
    from pv2tea.data.synth import make_catalog

    root = tmp_path_factory.mktemp("cache_cli")
    catalog = make_catalog(root / "catalog", n_products=16, seed=4, image_size=48)
    overrides = [*tiny_overrides(tiny_text_ckpt), *FROZEN]
    return root, catalog, overrides


def _train(root, catalog, overrides, name, *extra):
    out = root / name
    code = main(
        [
            "train",
            "--train",
            str(catalog["train"]),
            "--val",
            str(catalog["val"]),
            "--out",
            str(out),
            "--no-progress",
            "-c",
            "cpu",
            *_sets([*overrides, *extra]),
        ]
    )
    return code, out


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_build_info_then_train_on_it_gives_the_same_loss(setup, capsys):
    root, catalog, overrides = setup
    cache = root / "features"
    args = ["cache", "build", "--data", str(catalog["train"]), "--data", str(catalog["val"]), "--out", str(cache)]
    assert main([*args, "-c", "cpu", "--workers", "2", "--no-progress", *_sets(overrides)]) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["complete"] and info["images"]["rows"] > 0 and info["texts"]["rows"] > info["images"]["rows"]
    assert info["images"]["identity"]["backbone"] == "test_efficientnet"
    manifest = (cache / "manifest.json").read_text()

    code, in_memory = _train(root, catalog, overrides, "in_memory")
    assert code == 0
    code, on_disk = _train(root, catalog, overrides, "on_disk", f"train.feature_cache_dir={cache}")
    assert code == 0
    assert (cache / "manifest.json").read_text() == manifest  # the run found everything it needed: nothing added
    assert _losses(on_disk) == pytest.approx(_losses(in_memory), rel=1e-4)
    assert "feature(s) of the frozen backbone(s)" in (on_disk / "train.log").read_text()

    # prediction reads the same folder: the same answers as encoding every row
    args = ["predict", "--model", str(on_disk / "final"), "--data", str(catalog["val"]), "--batch-size", "4"]
    assert main([*args, "--out", str(root / "live.jsonl")]) == 0
    assert main([*args, "--out", str(root / "cached.jsonl"), "--feature-cache", str(cache)]) == 0
    assert (root / "cached.jsonl").read_text() == (root / "live.jsonl").read_text()
    assert main([*args, "--out", str(root / "other.jsonl"), "--feature-cache", str(root / "nowhere")]) == 2


def test_partial_cache_is_completed_and_stale_cache_refused(setup, capsys):
    root, catalog, overrides = setup
    cache = root / "partial"
    args = ["cache", "build", "--data", str(catalog["train"]), "--out", str(cache), "--no-progress", "-c", "cpu"]
    assert main([*args, *_sets(overrides)]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").unlink()  # as if the build had died before writing it
    (cache / "building.json").write_text(json.dumps({"identity": manifest["identity"]}))
    capsys.readouterr()
    assert main(["cache", "info", str(cache)]) == 1
    assert "interrupted" in capsys.readouterr().err

    code, run = _train(root, catalog, overrides, "on_partial", f"train.feature_cache_dir={cache}")
    assert code == 0
    assert "interrupted build" in capsys.readouterr().err
    assert main(["cache", "info", str(cache)]) == 0  # completed (with the val rows the build had not seen)

    stale = root / "stale"
    shutil.copytree(cache, stale)
    capsys.readouterr()
    code, _ = _train(root, catalog, overrides, "stale_run", f"train.feature_cache_dir={stale}", "train.seed=1")
    err = capsys.readouterr().err
    assert code == 2 and "stale" in err and "weights_sha256" in err  # another random backbone
    assert not os.path.exists(root / "stale_run" / "checkpoint")


def test_top_block_fine_tuning_trains_over_the_cache_as_over_pixels(setup, tmp_path):
    """vision.train_blocks=1: training over the cached lower part gives the losses of training from pixels; the top
    block and final convolution move, the lower blocks keep the weights a frozen backbone keeps; prediction over a
    cache folder gives the answers of encoding every image."""
    import torch
    from safetensors.torch import load_file

    root, catalog, overrides = setup
    top = [*overrides, "vision.freeze=false", "vision.train_blocks=1"]
    code, cached = _train(tmp_path, catalog, top, "cached")
    assert code == 0
    code, live = _train(tmp_path, catalog, top, "live", "train.cache_features=false")
    assert code == 0
    assert _losses(cached) == pytest.approx(_losses(live), rel=1e-4)
    code, frozen = _train(tmp_path, catalog, overrides, "frozen")
    assert code == 0
    tuned, still = load_file(cached / "final" / "model.safetensors"), load_file(frozen / "final" / "model.safetensors")
    lower = [k for k in still if k.startswith(("visual.backbone.conv_stem.", "visual.backbone.blocks.0."))]
    upper = [k for k in still if k.startswith("visual.backbone.conv_head.")]
    assert lower and upper
    assert all(torch.equal(tuned[k], still[k]) for k in lower)
    assert not all(torch.equal(tuned[k], still[k]) for k in upper)
    cache = tmp_path / "features"
    args = ["cache", "build", "--data", str(catalog["val"]), "--out", str(cache), "-c", "cpu", "--no-progress"]
    assert main([*args, *_sets(top)]) == 0
    args = ["predict", "--model", str(cached / "final"), "--data", str(catalog["val"]), "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "live.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "cached.jsonl"), "--feature-cache", str(cache)]) == 0
    assert (tmp_path / "cached.jsonl").read_text() == (tmp_path / "live.jsonl").read_text()
