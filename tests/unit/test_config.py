"""Typed configuration: presets, dotted overrides, type checks and validation."""

from __future__ import annotations

import pytest

from pv2tea.config import Config, ConfigError, load_config, parse_override, preset_names, with_settings_of


def test_preset_names():
    assert {"cpu", "paper", "warm-start", "from-warm-start"} <= set(preset_names())


def test_paper_preset_matches_appendix_a():
    cfg = load_config("paper")
    assert cfg.optim.lr == 1e-5
    assert cfg.optim.weight_decay == 0.05
    assert cfg.train.batch_size == 8 and cfg.train.eval_batch_size == 8
    assert cfg.train.epochs == 10
    s = cfg.schemes
    assert s.queue_size == 57600
    assert s.temperature == 0.07
    assert s.alpha == 0.4
    assert s.knn_k == 10
    assert s.prediction_nr_start_epoch == 2
    assert isinstance(cfg.optim.lr, float) and isinstance(s.queue_size, int)
    # every scheme is on in the paper's setting
    assert s.contrastive and s.category_loss and s.attention_pruning and s.visual_nr and s.prediction_nr


def test_cpu_preset_loads():
    cfg = load_config("cpu")
    assert (
        cfg.train.batch_size == 16
        and cfg.optim.head_lr == 1e-3
        and cfg.optim.lr == 1e-4
        and cfg.vision.image_size == 128
    )
    assert cfg.vision.freeze and not cfg.text.freeze and cfg.text.train_layers == 2 and cfg.vision.extra_levels == [2]
    s = cfg.schemes
    assert s.nr_visual == "probe" and s.nr_features == "levels" and s.visual_nr and not s.prediction_nr


def test_defaults_without_source():
    cfg = load_config(None, None)
    assert isinstance(cfg, Config)
    assert cfg.fusion.num_layers is None and cfg.schemes.contrastive is True


def test_parse_override_nests_dotted_keys():
    assert parse_override("optim.lr=0.5") == {"optim": {"lr": 0.5}}
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
    assert parse_override("fusion.num_layers=null") == {"fusion": {"num_layers": None}}
    assert parse_override("schemes.contrastive=false") == {"schemes": {"contrastive": False}}
    # the value may itself contain '='
    assert parse_override("fusion.question_template=a=b {attribute}") == {
        "fusion": {"question_template": "a=b {attribute}"}
    }


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError):
        parse_override("optim.lr")


def test_lr_without_dot_becomes_float():
    # YAML 1.1 reads "1e-3" as a string; the schema must turn it into a float
    assert parse_override("optim.lr=1e-3") == {"optim": {"lr": "1e-3"}}
    cfg = load_config("paper", ["optim.lr=1e-3"])
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    cfg = load_config(None, ["optim.head_lr=2e-4"])  # float | None field
    assert cfg.optim.head_lr == 0.0002 and type(cfg.optim.head_lr) is float


def test_int_given_for_float_becomes_float():
    cfg = load_config(None, ["schemes.alpha=1"])
    assert cfg.schemes.alpha == 1.0 and type(cfg.schemes.alpha) is float


def test_overrides_apply_on_top_of_preset_in_order():
    cfg = load_config("paper", ["train.batch_size=4", "train.batch_size=2", "schemes.alpha=0.2"])
    assert cfg.train.batch_size == 2 and cfg.schemes.alpha == 0.2
    assert cfg.train.epochs == 10  # untouched keys keep the preset value
    assert cfg.optim.weight_decay == 0.05  # siblings of an overridden key survive the merge


def test_bool_and_none_overrides():
    cfg = load_config(
        None,
        [
            "schemes.contrastive=false",
            "schemes.attention_pruning=true",
            "fusion.num_layers=null",
            "decoder.num_layers=3",
            "optim.grad_clip=null",
        ],
    )
    assert cfg.schemes.contrastive is False and cfg.schemes.attention_pruning is True
    assert cfg.fusion.num_layers is None and cfg.decoder.num_layers == 3 and cfg.optim.grad_clip is None
    cfg = load_config(None, ["fusion.num_layers=2", "fusion.num_layers=null"])
    assert cfg.fusion.num_layers is None


def test_string_fields():
    cfg = load_config(None, ["vision.name=test_vit", "vision.weights=none"])
    assert cfg.vision.name == "test_vit" and cfg.vision.weights == "none"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="nosuchsection"):
        load_config(None, ["nosuchsection.x=1"])


@pytest.mark.parametrize(
    "override",
    [
        "train.batch_size=2.5",  # float for int
        "train.batch_size=true",  # bool is not an int
        "train.epochs=ten",  # string for int
        "schemes.contrastive=1",  # int for bool
        "schemes.contrastive=maybe",  # string for bool
        "optim.lr=fast",  # not a number
        "vision.name=123",  # int for str
        "optim=1",  # scalar for a section
        "fusion.num_layers=two",  # int | None
        "vision.extra_levels=2",  # scalar for a list
        "vision.extra_levels=[two]",  # list of strings for a list of ints
    ],
)
def test_wrong_type_raises(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


@pytest.mark.parametrize("grid", ["0", "-2"])
def test_token_grid_must_be_positive(grid):
    with pytest.raises(ConfigError, match="vision.token_grid must be >= 1"):
        load_config(None, [f"vision.token_grid={grid}"])


@pytest.mark.parametrize("alpha", ["-0.1", "1.5", "2"])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        load_config(None, [f"schemes.alpha={alpha}"])


@pytest.mark.parametrize("alpha", ["0", "0.0", "1.0", "0.4"])
def test_alpha_bounds_allowed(alpha):
    assert load_config(None, [f"schemes.alpha={alpha}"]).schemes.alpha == float(alpha)


@pytest.mark.parametrize(
    "override",
    [
        "schemes.temperature=0",
        "schemes.queue_size=0",
        "schemes.knn_k=0",
        "schemes.momentum=1.0",
        "train.epochs=0",
        "train.batch_size=0",
        "optim.lr=0",
        "optim.lr=-1e-3",
        "vision.max_images=0",
        "fusion.question_template=What is it?",
        "schemes.text_dropout=1.0",
        "schemes.text_dropout=-0.1",
        "schemes.image_dropout=1.0",
        "schemes.image_dropout=-0.1",
        "vision.extra_levels=[-1]",
        "vision.extra_levels=[2, 2]",
        "schemes.ungrounded_weight=1.5",
        "schemes.ungrounded_weight=-0.1",
        "schemes.mention_dropout=1.5",
        "schemes.mention_dropout=-0.1",
        "schemes.mention_removal=tokens",
        "decoder.value_order=random",
        "train.average_epochs=-1",
        "train.average_epochs=11",
        "schemes.prediction_nr_text=half",
        "schemes.normalize_within=category",
        "schemes.nr_sharpness=0",
        "schemes.nr_visual=svm",
        "schemes.nr_features=levels",
    ],
)
def test_invalid_values_raise(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_yaml_file_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-4\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(path), ["train.epochs=5"])
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 5


def test_missing_source_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_config(str(bad))


def test_base_dict_is_not_mutated():
    base = {"train": {"epochs": 3}}
    cfg = load_config(None, ["train.epochs=4", "train.batch_size=2"], base=base)
    assert cfg.train.epochs == 4 and cfg.train.batch_size == 2
    assert base == {"train": {"epochs": 3}}


def test_nan_learning_rate_rejected():
    with pytest.raises(ConfigError):
        load_config(None, ["optim.lr=nan"])


def test_list_field_from_override_and_yaml(tmp_path):
    assert load_config(None, ["vision.extra_levels=[2, 3]"]).vision.extra_levels == [2, 3]
    path = tmp_path / "cfg.yaml"
    path.write_text("vision: {extra_levels: [1]}\n")
    assert load_config(str(path)).vision.extra_levels == [1]
    assert Config().vision.extra_levels == [] and Config().vision.extra_levels is not Config().vision.extra_levels


def test_config_differences_literal():
    from pv2tea.config import config_differences

    saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": True}
    requested = {"a": 1, "b": {"c": [1, 3], "d": "x", "new": 0.5}}
    assert config_differences(saved, requested) == [("b.c", [1, 2], [1, 3]), ("b.new", None, 0.5), ("gone", True, None)]
    assert config_differences(requested, requested) == []


def test_image_less_per_epoch_bounds():
    assert load_config(None, ["train.image_less_per_epoch=0"]).train.image_less_per_epoch == 0
    assert load_config(None, ["train.image_less_per_epoch=null"]).train.image_less_per_epoch is None
    with pytest.raises(ConfigError, match="image_less_per_epoch"):
        load_config(None, ["train.image_less_per_epoch=-1"])


def test_with_settings_of_takes_a_field_or_a_whole_section_from_the_reference():
    cfg = load_config("cpu", ["schemes.alpha=0.8", "schemes.knn_k=3", "loss.weight_sc=0.5", "optim.lr=0.002"])
    reference = load_config("cpu")
    out = with_settings_of(cfg, reference, ["schemes", "loss.weight_sc"])
    assert out.schemes == reference.schemes and out.loss.weight_sc == reference.loss.weight_sc
    assert out.optim.lr == 0.002  # not named: kept
    assert cfg.schemes.alpha == 0.8 and cfg.loss.weight_sc == 0.5  # the input is not changed
    out.schemes.alpha = 0.1
    assert reference.schemes.alpha != 0.1  # a copy, not the reference's section itself
    with pytest.raises(KeyError, match="loss.weight_nope"):
        with_settings_of(cfg, reference, ["loss.weight_nope"])


def test_the_warm_start_preset_is_tea_on_the_cpu_preset_with_the_recipes_settings():
    from pv2tea.experiment import VARIANTS

    recipe = ["decoder.head=classify", "train.epochs=6", "loss.soft_label_weight=0.5"]
    assert load_config("warm-start") == load_config("cpu", [*VARIANTS["tea"], *recipe])


def test_the_from_warm_start_preset_is_the_cpu_preset_with_the_recipes_settings():
    recipe = [
        "decoder.head=classify",
        "train.epochs=5",
        "loss.distill_weight=1",
        "optim.warm_start_lr_scale=0.1",
        "fusion.visual_gate=0",
    ]
    assert load_config("from-warm-start") == load_config("cpu", recipe)
    assert load_config("from-warm-start").train.warm_start is None  # the folder is the user's: --warm-start


def test_a_file_extends_a_preset_or_a_file_beside_it(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: cpu\ntrain: {epochs: 3, seed: 4}\n")
    (tmp_path / "mine.yaml").write_text("extends: base.yaml\ntrain: {epochs: 7}\n")
    assert load_config(str(tmp_path / "mine.yaml")) == load_config("cpu", ["train.epochs=7", "train.seed=4"])


def test_extends_that_goes_round_or_names_nothing_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="goes round in a circle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: [cpu]\n")
    with pytest.raises(ConfigError, match="extends must name a preset"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("extends: nothing_here\n")
    with pytest.raises(ConfigError, match="nothing_here' is neither a preset"):
        load_config(str(tmp_path / "d.yaml"))


def test_the_readme_quickstart_trains_the_recipe_by_its_presets_into_one_folder_per_run():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart") : readme.index("## Data format")]
    assert "--config warm-start" in quickstart and "--config from-warm-start --warm-start runs/warm/final" in quickstart
    assert "--set" not in quickstart.replace("--set key=value", "")  # the recipe is the presets, not flags
    outs = re.findall(r"pv2tea train .*?--out (\S+)", quickstart.replace("\\\n", " "))
    assert len(outs) == 4 and len(set(outs)) == 4, outs
