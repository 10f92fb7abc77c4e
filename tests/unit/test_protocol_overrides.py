"""The benchmark protocol reads its recipe from the presets warm-start and from-warm-start: every run it trains
resolves to exactly the config it resolved to when the recipe was a list of overrides in the protocol's code."""

from __future__ import annotations

import warnings

import pytest

from pv2tea import renamed
from pv2tea.bench.protocol import FOLD_RUN_SETTINGS, ProtocolConfig, fold_run_overrides, warm_start_config
from pv2tea.config import load_config, with_settings_of
from pv2tea.experiment import VARIANTS

# the protocol's overrides as they were written out before the presets held them
OLD_BENCH = ["vision.freeze=true", "train.product_batches=true"]
OLD_REAL_DATA = ["decoder.head=classify"]
OLD_WARM_START = [
    "loss.soft_label_weight=0.5",
    "loss.distill_weight=1.0",
    "optim.warm_start_lr_scale=0.1",
    "fusion.visual_gate=0",
]


def _old_fold_run(warm: bool, per_epoch: list[str], user: list[str]) -> list[str]:
    warm_start = OLD_WARM_START
    if "decoder.head=generate" in user:
        warm_start = [o for o in warm_start if not o.startswith("loss.soft_label_weight=")]
    return [*OLD_BENCH, *OLD_REAL_DATA, *(warm_start if warm else []), "train.epochs=5", *per_epoch, *user]


def _old_warm_start(config: str, overrides: list[str]):
    run = [*overrides, *VARIANTS["tea"], "train.epochs=6", "train.image_less_per_epoch=null", "train.seed=0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", renamed.RenamedWarning)
        cfg = load_config(config, [*run, "train.init_from=null"])
    return with_settings_of(cfg, load_config(config, VARIANTS["tea"]), FOLD_RUN_SETTINGS)


CASES = [
    ("cpu", [], []),
    ("cpu", ["train.image_less_per_epoch=200"], []),
    ("cpu", [], ["decoder.head=generate"]),
    ("cpu", [], ["train.epochs=5", "schemes.text_dropout=0.1"]),
    ("paper", [], []),
]


def test_the_protocol_defaults_are_the_presets_epochs():
    cfg = ProtocolConfig()
    assert (cfg.warm_start_epochs, cfg.epochs) == (6, 5)


@pytest.mark.parametrize(("config", "per_epoch", "user"), CASES)
@pytest.mark.parametrize("warm", [True, False])
def test_a_fold_run_resolves_as_before(config, per_epoch, user, warm):
    cfg = ProtocolConfig(config=config, overrides=user, warm_start_epochs=6 if warm else 0)
    now = fold_run_overrides(cfg, per_epoch)
    before = _old_fold_run(warm, per_epoch, user)
    if warm:  # the warm start's folder, as the protocol adds it once trained
        now.append("train.warm_start=runs/Home/warm_start/final")
        before.append("train.warm_start=runs/Home/warm_start/final")
    assert load_config(config, now).to_dict() == load_config(config, before).to_dict()


@pytest.mark.parametrize(("config", "per_epoch", "user"), CASES)
def test_the_warm_start_resolves_as_before(config, per_epoch, user):
    cfg = ProtocolConfig(config=config, overrides=user)
    overrides = fold_run_overrides(cfg, per_epoch)
    assert warm_start_config(cfg, overrides).to_dict() == _old_warm_start(config, overrides).to_dict()


def test_the_warm_start_of_the_protocol_is_the_warm_start_preset_with_the_benchmarks_batches():
    cfg = ProtocolConfig()
    trained = warm_start_config(cfg, fold_run_overrides(cfg)).to_dict()
    assert trained == load_config("warm-start", ["train.product_batches=true"]).to_dict()


def test_a_fold_run_of_the_protocol_is_the_from_warm_start_preset_with_the_benchmarks_settings():
    cfg = ProtocolConfig()
    run = load_config("cpu", [*fold_run_overrides(cfg), "train.warm_start=w"]).to_dict()
    # the soft-label weight of the warm start rides along: the fold runs' rows carry no class probabilities
    expected = ["train.warm_start=w", *OLD_BENCH, "loss.soft_label_weight=0.5"]
    assert run == load_config("from-warm-start", expected).to_dict()


def test_the_warm_start_folder_of_an_older_run_is_reused(tmp_path):
    from pv2tea.bench.protocol import warm_start_dir

    assert warm_start_dir(tmp_path) == tmp_path / "warm_start"  # a new run
    (tmp_path / "text_pretrain").mkdir()
    assert warm_start_dir(tmp_path) == tmp_path / "text_pretrain"  # a run made before the rename
    (tmp_path / "warm_start").mkdir()
    assert warm_start_dir(tmp_path) == tmp_path / "warm_start"
