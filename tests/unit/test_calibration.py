"""Per-attribute calibration of late fusion with its guard, on hand-made rows."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pv2tea.decoding.calibration import (
    Calibration,
    CalibrationConfig,
    CalibrationError,
    Choice,
    ScoredRow,
    apply_calibration,
    choose,
    fit_calibration,
    fused_pick,
    load_calibration,
    passes_guard,
    row_weights,
    scored_rows,
)

CANDS = ("red", "blue")


def row(attribute: str, model_p: float, extractor_p: float, gold: str) -> ScoredRow:
    """Two candidates; the model gives 'red' model_p, the extractor gives it extractor_p."""
    return ScoredRow(
        attribute, CANDS, np.log([model_p, 1 - model_p]), np.log([extractor_p, 1 - extractor_p]), frozenset({gold})
    )


def test_fused_pick_interpolates_between_extractor_and_model():
    r = row("a", 0.9, 0.3, "red")  # the model says red, the extractor blue
    assert fused_pick(r, 0.0) == 1 and fused_pick(r, 1.0) == 0
    # λ·log(.9/.1) + (1-λ)·log(.3/.7) > 0  <=>  λ > 0.8473/(2.1972+0.8473) = 0.2783
    assert fused_pick(r, 0.27) == 1 and fused_pick(r, 0.29) == 0


def test_guard_is_a_sign_test_on_discordant_rows():
    assert passes_guard(10, 2, 1.0)  # 8 >= sqrt(12) = 3.46
    assert not passes_guard(5, 3, 1.0)  # 2 < sqrt(8) = 2.83
    assert passes_guard(5, 3, 0.0) and not passes_guard(3, 3, 0.0)  # z = 0: any strict gain
    assert not passes_guard(0, 0, 0.0)
    assert passes_guard(9, 1, 2.5) and not passes_guard(9, 1, 2.6)  # 8 vs z·sqrt(10): 7.91, 8.22


def test_choose_keeps_the_model_only_beyond_noise():
    # 12 rows where the model is right and the extractor wrong, 2 the reverse, 6 both right
    rows = [row("a", 0.9, 0.2, "red")] * 12 + [row("a", 0.1, 0.8, "red")] * 2 + [row("a", 0.8, 0.8, "red")] * 6
    c = choose(rows, CalibrationConfig())
    # the 12 flip to the model once λ·log 9 > (1-λ)·log 4, i.e. λ > 0.387, and the 2 flip away at the same λ
    # (symmetric): from λ = 0.4 on, 12 fixed and 2 broke; ties go to the smallest λ
    assert (c.best_weight, c.fixed, c.broke, c.rows, c.extractor_correct) == (0.4, 12, 2, 20, 8)
    assert c.accepted and c.model_weight == 0.4 and c.fused_correct == 18
    # the same gain on fewer rows does not pass a z of 3
    strict = choose(rows, CalibrationConfig(z=3.0))
    assert strict.best_weight == 0.4 and not strict.accepted and strict.model_weight == 0.0


def test_the_deployed_share_is_the_guarded_one_not_the_best_on_the_sample(tmp_path):
    """Issue 38: Calibration.model_weight answering the unguarded best λ went through. Here the best λ (0.4) fails a
    z of 3, for the attribute and for the pooled sample: the deployed share is 0 and the answers are the extractor's,
    also after a save and load."""
    rows = [row("a", 0.9, 0.2, "red")] * 12 + [row("a", 0.1, 0.8, "red")] * 2 + [row("a", 0.8, 0.8, "red")] * 6
    calibration = fit_calibration(rows, CalibrationConfig(z=3.0, min_rows=1))
    for choice in (calibration.attributes["a"], calibration.pooled):
        assert (choice.best_weight, choice.accepted, choice.model_weight) == (0.4, False, 0.0)
    for loaded in (calibration, load_calibration(calibration.save(tmp_path / "c.json"))):
        assert loaded.model_weight("a") == 0.0 and loaded.model_weight("never seen") == 0.0
        # the 12 rows the unguarded λ would flip to the model keep the extractor's answer
        assert apply_calibration([rows[0], row("never seen", 0.9, 0.2, "red")], loaded) == ["blue", "blue"]


def test_ties_stay_with_the_extractor():
    rows = [row("a", 0.9, 0.2, "red"), row("a", 0.9, 0.2, "blue")]  # the model fixes one and breaks one
    c = choose(rows, CalibrationConfig(z=0.0))
    assert c.best_weight == 0.0 and c.model_weight == 0.0 and not c.accepted


def test_small_attributes_take_the_pooled_choice_and_unknown_attributes_too():
    good = [row("big", 0.9, 0.2, "red")] * 30  # the model fixes all 30
    few = [row("small", 0.1, 0.8, "red")] * 3  # the model breaks all 3
    calibration = fit_calibration(good + few, CalibrationConfig(min_rows=20, objective="accuracy"))
    assert calibration.attributes["big"].source == "attribute" and calibration.attributes["big"].model_weight > 0
    small = calibration.attributes["small"]
    assert small.source == "pooled" and small.model_weight == calibration.pooled.model_weight
    assert (small.rows, small.extractor_correct, small.broke) == (3, 3, 3)  # its own counts under the pooled λ
    assert calibration.model_weight("never seen") == calibration.pooled.model_weight
    answers = apply_calibration([row("big", 0.9, 0.2, "red"), row("small", 0.1, 0.8, "red")], calibration)
    assert answers[0] == "red"


@pytest.mark.parametrize("objective", ["accuracy", "balanced"])
def test_calibration_never_below_the_extractor_on_its_own_sample(objective):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        m, e = rng.uniform(0.05, 0.95, size=2)
        rows.append(row(f"a{i % 4}", float(m), float(e), "red" if rng.random() < 0.8 else "blue"))
    calibration = fit_calibration(rows, CalibrationConfig(z=0.0, min_rows=1, objective=objective))
    answers = apply_calibration(rows, calibration)
    extractor = [r.candidates[fused_pick(r, 0.0)] for r in rows]
    for attribute in {r.attribute for r in rows}:  # on the objective's own measure, attribute by attribute
        mine = [i for i, r in enumerate(rows) if r.attribute == attribute]
        weights = row_weights([rows[i] for i in mine], objective)
        right = sum(w for w, i in zip(weights, mine) if answers[i] in rows[i].gold)
        assert right >= sum(w for w, i in zip(weights, mine) if extractor[i] in rows[i].gold) - 1e-9
        choice = calibration.attributes[attribute]
        assert choice.fused_score == pytest.approx(100 * right / len(mine))
        assert choice.fused_score >= choice.extractor_score


def test_row_weights_make_each_value_weigh_alike():
    rows = [row("a", 0.5, 0.5, "red")] * 6 + [row("a", 0.5, 0.5, "blue")] * 2 + [row("b", 0.5, 0.5, "red")] * 2
    assert list(row_weights(rows, "accuracy")) == [1.0] * 10
    w = row_weights(rows, "balanced")
    assert w.mean() == pytest.approx(1.0)
    # three (attribute, value) classes, each a third of the total weight
    assert w[:6].sum() == pytest.approx(w[6:8].sum()) == pytest.approx(w[8:].sum()) == pytest.approx(10 / 3)
    assert len(row_weights([], "balanced")) == 0


def test_balanced_choice_weighs_a_rare_value_as_much_as_a_frequent_one():
    # the extractor answers 'red' always: right on the 40 red rows, wrong on the 6 blue ones; the model fixes the 6
    # blue rows and breaks 6 red ones (the same scores: one λ flips both)
    rows = (
        [row("a", 0.9, 0.8, "red")] * 34  # both right
        + [row("a", 0.1, 0.8, "red")] * 6  # the model breaks these
        + [row("a", 0.1, 0.8, "blue")] * 6  # and fixes these
    )
    counted = choose(rows, CalibrationConfig(objective="accuracy"))
    # counted alike, no λ answers more than the extractor's 40 rows (from λ = 0.4 on, 40 as well): it stays at 0
    assert (counted.best_weight, counted.model_weight, counted.fused_correct, counted.extractor_correct) == (
        0,
        0,
        40,
        40,
    )
    balanced = choose(rows, CalibrationConfig(objective="balanced"))
    assert (balanced.fixed, balanced.broke) == (6, 6) and balanced.accepted and balanced.model_weight == 0.4
    # balanced accuracy: the extractor (100 + 0) / 2, the deployed answers (34/40 · 100 + 100) / 2
    assert balanced.extractor_score == pytest.approx(50.0) and balanced.fused_score == pytest.approx(92.5)
    # the guard on the weights: fixed 6 · 46/12, broke 6 · 46/80; spread the sum of their squares
    fixed, broke = 6 * 46 / 12, 6 * 46 / 80
    spread = 6 * (46 / 12) ** 2 + 6 * (46 / 80) ** 2
    assert (fixed - broke) / math.sqrt(spread) == pytest.approx(2.05, abs=0.01)
    assert choose(rows, CalibrationConfig(z=2.0, objective="balanced")).accepted
    assert not choose(rows, CalibrationConfig(z=2.1, objective="balanced")).accepted


def test_the_weighted_guard_with_equal_weights_is_the_sign_test():
    assert passes_guard(8, 2, 1.0, spread=10) == passes_guard(8, 2, 1.0)
    assert passes_guard(8.0, 2.0, 1.0, spread=36.0) and not passes_guard(8.0, 2.0, 1.1, spread=36.0)  # 6 vs z·6


def test_version_1_files_read_as_chosen_by_accuracy_and_newer_versions_are_refused(tmp_path):
    calibration = fit_calibration([row("a", 0.9, 0.2, "red")] * 25)
    path = tmp_path / "c.json"
    assert calibration.config.objective == "accuracy"  # the default
    balanced = fit_calibration([row("a", 0.9, 0.2, "red")] * 25, CalibrationConfig(objective="balanced"))
    assert load_calibration(balanced.save(tmp_path / "b.json")).config.objective == "balanced"
    old = calibration.to_json()
    old["version"] = 1
    del old["config"]["objective"]
    for c in [old["pooled"], *old["attributes"].values()]:
        del c["extractor_score"], c["fused_score"]
    path.write_text(json.dumps(old))
    loaded = load_calibration(path)
    assert loaded.config.objective == "accuracy" and loaded.model_weight("a") == calibration.model_weight("a")
    assert loaded.pooled.fused_score is None
    path.write_text(json.dumps({**calibration.to_json(), "version": 3}))
    with pytest.raises(CalibrationError, match="c.json: version 3, this pv2tea reads versions 1 to 2"):
        load_calibration(path)
    broken = calibration.to_json()
    broken["config"]["objective"] = "f1"
    path.write_text(json.dumps(broken))
    with pytest.raises(CalibrationError, match="objective must be one of balanced, accuracy, got 'f1'"):
        load_calibration(path)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    rows = [row("a", 0.9, 0.2, "red")] * 25
    calibration = fit_calibration(rows, meta={"model": "m", "sample_rows": 25})
    path = calibration.save(tmp_path / "c.json")
    loaded = load_calibration(path)
    assert loaded.attributes == calibration.attributes and loaded.pooled == calibration.pooled
    assert loaded.config == calibration.config and loaded.meta["model"] == "m"
    path.write_text("{nope")
    with pytest.raises(CalibrationError, match="c.json"):
        load_calibration(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CalibrationError, match="pv2tea calibrate"):
        load_calibration(path)
    data = calibration.to_json()
    data["attributes"]["a"]["model_weight"] = 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=r"attributes\.a\.model_weight"):
        load_calibration(path)


def test_config_and_rows_are_validated():
    with pytest.raises(ValueError, match="grid"):
        CalibrationConfig(grid=(0.0, 1.5))
    with pytest.raises(ValueError, match="z"):
        CalibrationConfig(z=-1)
    with pytest.raises(ValueError, match="one model and one extractor score per candidate"):
        ScoredRow("a", CANDS, np.zeros(3), np.zeros(2), frozenset())
    with pytest.raises(CalibrationError, match="at least one"):
        fit_calibration([])


def test_scored_rows_renormalize_the_extractor_and_skip_rows_without_candidates():
    from pv2tea.data.schema import Record

    records = [
        Record("1", "t", (), "c", "Color", ("Red",), gold=("Red",)),
        Record("2", "t", (), "c", "Size", ("big",), gold=("big",)),
    ]
    scores = [(["Red", "Blue"], np.log([0.7, 0.3])), None]
    priors = [{"red": 0.2, "blue": 0.6, "green": 0.2}, {"big": 1.0}]
    rows, skipped = scored_rows(records, scores, priors)
    assert skipped == [1] and len(rows) == 1
    assert np.exp(rows[0].extractor) == pytest.approx([0.25, 0.75])
    assert rows[0].gold == frozenset({"red"}) and rows[0].candidates == ("Red", "Blue")
    assert math.isclose(float(np.exp(rows[0].model).sum()), 1.0)
    assert isinstance(Calibration(Choice(0, 0, 0, 0, 0, 0, 0, False), {}).model_weight("x"), (int, float))


def photo_row(attribute: str, with_photo: float, without: float, extractor_p: float, gold: str) -> ScoredRow:
    """Two candidates; 'red' gets with_photo from the model reading the photo, without from it with the photo withheld."""
    return ScoredRow(
        attribute,
        CANDS,
        np.log([with_photo, 1 - with_photo]),
        np.log([extractor_p, 1 - extractor_p]),
        frozenset({gold}),
        np.log([without, 1 - without]),
    )


def test_the_photo_is_kept_for_an_attribute_only_where_it_beats_the_text_beyond_noise():
    # sleeve: the photo right on 12 rows the text model and the extractor miss; colour: the photo misleads on 10
    sleeve = [photo_row("sleeve", 0.9, 0.2, 0.2, "red")] * 12 + [photo_row("sleeve", 0.8, 0.8, 0.8, "red")] * 8
    colour = [photo_row("colour", 0.1, 0.9, 0.2, "red")] * 10 + [photo_row("colour", 0.9, 0.9, 0.2, "red")] * 10
    cal = fit_calibration(sleeve + colour)
    s, c = cal.attributes["sleeve"], cal.attributes["colour"]
    assert s.image and cal.uses_image("sleeve") and (s.image_fixed, s.image_broke) == (12, 0)
    assert s.model_weight > 0 and s.fused_correct == 20
    assert not c.image and not cal.uses_image("colour") and (c.image_fixed, c.image_broke) == (0, 10)
    assert c.model_weight > 0 and c.fused_correct == 20  # the text-only model, trusted over the extractor
    answers = apply_calibration(sleeve + colour, cal)
    assert answers == ["red"] * 40
    # without scores with the photo withheld the choice is as before: the photo, always
    plain = [replace(r, model_text=None) for r in colour]
    assert choose(plain, CalibrationConfig()).image
    # a gain with the photo too small for the guard: answered without it
    # (the photo right on 2 rows where the text is wrong, wrong on 1 where it is right: 1 < sqrt(3))
    small = (
        [photo_row("a", 0.9, 0.2, 0.2, "red")] * 2
        + [photo_row("a", 0.1, 0.9, 0.2, "red")]
        + [photo_row("a", 0.9, 0.9, 0.9, "red")] * 17
    )
    assert not choose(small, CalibrationConfig()).image
    assert choose(small, CalibrationConfig(z=0.0)).image


def test_photo_choices_survive_the_calibration_file(tmp_path):
    rows = [photo_row("colour", 0.1, 0.9, 0.2, "red")] * 20 + [photo_row("sleeve", 0.9, 0.2, 0.2, "red")] * 30
    cal = fit_calibration(rows)
    back = load_calibration(cal.save(tmp_path / "c.json"))
    assert back.uses_image("sleeve") and not back.uses_image("colour")
    data = json.loads((tmp_path / "c.json").read_text())
    for choice in (data["pooled"], *data["attributes"].values()):
        choice.pop("image")  # a file written before the photo choice: the photo is read
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_calibration(tmp_path / "old.json").uses_image("colour")
    data["attributes"]["colour"]["image"] = "no"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=r"attributes\.colour\.image"):
        load_calibration(tmp_path / "bad.json")


def test_scored_rows_carry_the_scores_without_photos():
    from pv2tea.data.schema import Record

    records = [Record("p", "t", (), "c", "colour", ("red",), gold=("red",))]
    with_photo = [(["red", "blue"], np.log([0.9, 0.1]))]
    without = [(["red", "blue"], np.log([0.3, 0.7]))]
    rows, _ = scored_rows(records, with_photo, [{"red": 0.5, "blue": 0.5}], without)
    np.testing.assert_allclose(rows[0].model_text, np.log([0.3, 0.7]))
    with pytest.raises(ValueError, match="different candidates"):
        scored_rows(records, with_photo, [{"red": 0.5, "blue": 0.5}], [(["blue", "red"], np.log([0.3, 0.7]))])
