"""Hand-computed cases for value normalization, correctness and macro P/R/F1 (paper §4.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pv2tea.data.dataset import answer_text
from pv2tea.eval.metrics import (
    Example,
    Scores,
    confidence_reliability,
    departures,
    harmonic_f1,
    is_correct,
    merge_departures,
    score,
    source_aware_report,
)
from pv2tea.eval.normalize import (
    SynonymFileError,
    drop_attribute_name,
    load_synonyms,
    mention_position,
    normalize_value,
    normalize_values,
    split_answer,
)

APPROX = {"abs": 1e-9}


def ex(
    gold: tuple[str, ...],
    pred: tuple[str, ...],
    source: str | None = "text",
    attribute: str = "item_form",
    multi_value: bool = False,
) -> Example:
    return Example(gold, pred, source, attribute, multi_value)


# --- normalization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Red", "red"),
        ("  Navy-Blue!! ", "navy blue"),
        ("multi\t \ncolor", "multi color"),
        ("100% Cotton, (organic)", "100 cotton organic"),
        ("ROT/Grün", "rot grün"),
        ("ＢＬＵＥ", "blue"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),
        ("?!", ""),
    ],
)
def test_normalize_value_case_punctuation_whitespace(raw: str, expected: str) -> None:
    assert normalize_value(raw) == expected


def test_normalize_value_keeps_letters_and_marks_of_other_scripts() -> None:
    assert normalize_value("हिंदी, 红色") == "हिंदी 红色"


def test_synonym_keys_and_values_are_normalized() -> None:
    synonyms = {"Grey": "Gray", "Navy Blue": "BLUE!"}
    assert normalize_value("GREY.", synonyms) == "gray"
    assert normalize_value("navy-blue", synonyms) == "blue"
    assert normalize_value("Gray", synonyms) == "gray"
    assert normalize_value("Greyish", synonyms) == "greyish"


def test_conflicting_synonyms_after_normalization_are_rejected() -> None:
    with pytest.raises(ValueError, match="grey"):
        normalize_value("grey", {"Grey": "gray", "grey!": "silver"})


def test_normalize_values_dedupes_and_drops_empty() -> None:
    assert normalize_values(["Red", "red!", "  ", "?", "Grey"], {"grey": "gray"}) == frozenset({"red", "gray"})


def test_split_answer() -> None:
    assert split_answer(" red; Yellow ;; red ;") == ["red", "Yellow"]
    assert split_answer("red, green", delimiter=",") == ["red", "green"]
    assert split_answer("  ;  ") == []


def test_drop_attribute_name() -> None:
    assert drop_attribute_name(["Brown", "Color", " color! "], "color") == ["Brown"]
    assert drop_attribute_name(["short", "sleeve style"], "sleeve_style") == ["short"]
    assert drop_attribute_name(["colorful", "multi color"], "color") == ["colorful", "multi color"]
    assert drop_attribute_name([], "color") == []


def test_load_synonyms_json_variant_form(tmp_path: Path) -> None:
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Grey": "gray", "navy": "blue"}), encoding="utf-8")
    synonyms = load_synonyms(path)
    assert synonyms == {"Grey": "gray", "navy": "blue"}
    assert normalize_value("grey", synonyms) == "gray"


def test_load_synonyms_yaml_canonical_list_form(tmp_path: Path) -> None:
    path = tmp_path / "syn.yaml"
    path.write_text("gray: [Grey, GRAY-ish]\nblue: navy\n", encoding="utf-8")
    synonyms = load_synonyms(path)
    assert synonyms == {"Grey": "gray", "GRAY-ish": "gray", "blue": "navy"}
    assert normalize_value("gray ish", synonyms) == "gray"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "not valid JSON/YAML"),
        ("list.yaml", "- a\n- b\n", "expected a mapping"),
        ("nested.yaml", "gray: {grey: 1}\n", "must be a string or a list"),
        ("number.yaml", "1: one\n", "not a string"),
        ("conflict.yaml", "gray: [grey]\nsilver: [grey]\n", "mapped to both"),
        ("normconflict.yaml", "Grey: gray\ngrey!: silver\n", "already mapped"),
    ],
)
def test_load_synonyms_malformed_names_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SynonymFileError, match=message) as info:
        load_synonyms(path)
    assert str(path) in str(info.value)


# --- correctness of one example ------------------------------------------------------------


def test_single_value_exact_match_after_normalization() -> None:
    assert is_correct(ex(("Liquid",), ("liquid.",)))
    assert is_correct(ex(("gray",), ("Grey",)), {"grey": "gray"})
    assert not is_correct(ex(("gray",), ("Grey",)))


def test_single_value_extra_value_is_wrong() -> None:
    assert not is_correct(ex(("liquid",), ("liquid", "gel")))


def test_multi_value_all_gold_present_is_correct_even_with_extras() -> None:
    example = ex(("red", "blue"), ("Blue", "green", "RED"), attribute="color", multi_value=True)
    assert is_correct(example)


def test_multi_value_one_gold_missing_is_wrong() -> None:
    example = ex(("red", "blue"), ("red", "green"), attribute="color", multi_value=True)
    assert not is_correct(example)


def test_empty_prediction_is_never_correct() -> None:
    assert not is_correct(ex(("liquid",), ()))
    assert not is_correct(ex(("liquid",), ("!!",)))


def test_example_validation() -> None:
    with pytest.raises(ValueError, match="source"):
        ex(("red",), ("red",), source="audio")
    with pytest.raises(ValueError, match="no gold"):
        ex((), ("red",))
    with pytest.raises(ValueError, match="empty after normalization"):
        score([ex(("?!",), ("red",))])
    values: list[str] = ["red"]
    listed = Example(values, values, None, "c", False)  # type: ignore[arg-type]
    assert listed.gold == ("red",) and listed.pred == ("red",)


# --- aggregation ---------------------------------------------------------------------------


def test_empty_prediction_lowers_recall_not_precision() -> None:
    # groups: liquid {e1 correct, e2 empty}, powder {e3 correct, e4 wrong}
    #   liquid: P = 1/1, R = 1/2; powder: P = 1/2, R = 1/2
    #   macro P = 0.75, R = 0.5, F1 = 2*.75*.5/1.25 = 0.6 ; accuracy 2/4
    examples = [
        ex(("liquid",), ("liquid",)),
        ex(("liquid",), ()),
        ex(("powder",), ("powder",)),
        ex(("powder",), ("cream",)),
    ]
    assert score(examples) == Scores(
        precision=pytest.approx(75.0, **APPROX),
        recall=pytest.approx(50.0, **APPROX),
        f1=pytest.approx(60.0, **APPROX),
        accuracy=pytest.approx(50.0, **APPROX),
        n=4,
        n_predicted=3,
        n_values=2,
    )
    # A wrong non-empty prediction instead of the empty one costs precision (liquid P = 1/2).
    wrong = score([*examples[:1], ex(("liquid",), ("gel",)), *examples[2:]])
    assert wrong.precision == pytest.approx(50.0, **APPROX)
    assert wrong.recall == pytest.approx(50.0, **APPROX)


def test_f1_is_harmonic_mean_of_macro_p_r_not_mean_of_group_f1() -> None:
    # Same case as above: mean of group F1s would be (2/3 + 1/2) / 2 = 58.33, not 60.
    examples = [
        ex(("liquid",), ("liquid",)),
        ex(("liquid",), ()),
        ex(("powder",), ("powder",)),
        ex(("powder",), ("cream",)),
    ]
    assert score(examples).f1 == pytest.approx(60.0, **APPROX)


def test_macro_differs_from_micro_on_imbalanced_values() -> None:
    # 9 x red all correct, 1 x blue wrong: groups red P=R=1, blue P=R=0 -> macro 50; micro 9/10.
    examples = [ex(("red",), ("red",), attribute="color") for _ in range(9)]
    examples.append(ex(("blue",), ("red",), attribute="color"))
    result = score(examples)
    assert result.precision == pytest.approx(50.0, **APPROX)
    assert result.recall == pytest.approx(50.0, **APPROX)
    assert result.f1 == pytest.approx(50.0, **APPROX)
    assert result.accuracy == pytest.approx(90.0, **APPROX)
    assert (result.n, result.n_predicted, result.n_values) == (10, 10, 2)


def test_multi_value_example_joins_every_gold_value_group() -> None:
    # red {A correct, B wrong}: P=R=1/2 ; blue {B wrong}: P=R=0 -> macro 25
    examples = [
        ex(("red",), ("red",), attribute="color", multi_value=True),
        ex(("red", "blue"), ("red",), attribute="color", multi_value=True),
    ]
    result = score(examples)
    assert result.precision == pytest.approx(25.0, **APPROX)
    assert result.recall == pytest.approx(25.0, **APPROX)
    assert result.accuracy == pytest.approx(50.0, **APPROX)
    assert result.n_values == 2


def test_same_value_of_different_attributes_is_a_different_group() -> None:
    examples = [ex(("red",), ("red",), attribute="color"), ex(("red",), ("x",), attribute="tag")]
    result = score(examples)
    assert result.n_values == 2
    assert result.precision == pytest.approx(50.0, **APPROX)


def test_paper_f1_from_precision_and_recall() -> None:
    # Table 2, PV2TEA on Item Form; Table 3, PV2TEA text / image rows and their F1 gap.
    assert round(harmonic_f1(82.46, 75.40), 2) == 78.77
    text_f1, image_f1 = harmonic_f1(82.64, 75.71), harmonic_f1(75.00, 62.50)
    assert (round(text_f1, 2), round(image_f1, 2)) == (79.02, 68.18)
    assert round(text_f1 - image_f1, 2) == 10.84
    assert harmonic_f1(0.0, 0.0) == 0.0


def test_score_of_no_examples_is_undefined_not_zero() -> None:
    result = score([])
    assert result == Scores(None, None, None, None, n=0, n_predicted=0, n_values=0)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["f1"] is None


# --- source-aware report -------------------------------------------------------------------

SYNONYMS = {"Stripes": "striped"}


def _source_case() -> list[Example]:
    """Seven examples; hand-computed scores are in the test below."""
    color = {"attribute": "color", "multi_value": True}
    pattern = {"attribute": "pattern", "multi_value": False}
    return [
        Example(("red",), ("red",), "text", **color),  # A correct
        Example(("red",), (), "text", **color),  # B empty
        Example(("blue", "white"), ("blue",), "image", **color),  # C misses white
        Example(("blue",), ("Blue", "green"), "image", **color),  # D correct (superset)
        Example(("striped",), ("Stripes",), "text", **pattern),  # E correct via synonym
        Example(("floral",), ("floral", "solid"), "image", **pattern),  # F extra value
        Example(("solid",), ("solid",), None, **pattern),  # G correct, no source
    ]


def _metrics(block: dict, *keys: str) -> tuple:
    return tuple(block[k] for k in keys)


def test_source_aware_split_and_gap() -> None:
    report = source_aware_report(_source_case(), SYNONYMS)
    # overall groups (P, R): color/red (1, 1/2), color/blue (1/2, 1/2), color/white (0, 0),
    # pattern/striped (1, 1), pattern/floral (0, 0), pattern/solid (1, 1)
    # -> P = 3.5/6 = 7/12, R = 3/6, F1 = 7/13; accuracy 4/7
    overall = report["overall"]
    assert overall["precision"] == pytest.approx(700 / 12, **APPROX)
    assert overall["recall"] == pytest.approx(50.0, **APPROX)
    assert overall["f1"] == pytest.approx(700 / 13, **APPROX)
    assert overall["accuracy"] == pytest.approx(400 / 7, **APPROX)
    assert _metrics(overall, "n", "n_predicted", "n_values") == (7, 6, 6)
    # text {A, B, E}: red (1, 1/2), striped (1, 1) -> P 100, R 75, F1 600/7, acc 2/3
    text = report["by_source"]["text"]
    assert text["precision"] == pytest.approx(100.0, **APPROX)
    assert text["recall"] == pytest.approx(75.0, **APPROX)
    assert text["f1"] == pytest.approx(600 / 7, **APPROX)
    assert text["accuracy"] == pytest.approx(200 / 3, **APPROX)
    assert _metrics(text, "n", "n_predicted", "n_values") == (3, 2, 2)
    # image {C, D, F}: blue (1/2, 1/2), white (0, 0), floral (0, 0) -> P = R = F1 = 50/3
    image = report["by_source"]["image"]
    for metric in ("precision", "recall", "f1"):
        assert image[metric] == pytest.approx(50 / 3, **APPROX)
    assert image["accuracy"] == pytest.approx(100 / 3, **APPROX)
    assert _metrics(image, "n", "n_predicted", "n_values") == (3, 3, 3)
    # gap = text - image
    gap = report["gap"]
    assert gap["precision"] == pytest.approx(250 / 3, **APPROX)
    assert gap["recall"] == pytest.approx(175 / 3, **APPROX)
    assert gap["f1"] == pytest.approx(1450 / 21, **APPROX)
    assert gap["accuracy"] == pytest.approx(100 / 3, **APPROX)


def test_synonyms_change_the_source_aware_scores() -> None:
    without = source_aware_report(_source_case())
    assert without["by_source"]["text"]["precision"] == pytest.approx(50.0, **APPROX)


def test_by_attribute() -> None:
    by_attribute = source_aware_report(_source_case(), SYNONYMS)["by_attribute"]
    assert list(by_attribute) == ["color", "pattern"]
    color = by_attribute["color"]
    # {A, B, C, D}: red (1, 1/2), blue (1/2, 1/2), white (0, 0) -> P 50, R 100/3, F1 40
    assert color["overall"]["precision"] == pytest.approx(50.0, **APPROX)
    assert color["overall"]["recall"] == pytest.approx(100 / 3, **APPROX)
    assert color["overall"]["f1"] == pytest.approx(40.0, **APPROX)
    assert color["overall"]["n"] == 4
    # text {A, B}: P 100, R 50, F1 200/3 ; image {C, D}: P = R = F1 = 25
    assert color["by_source"]["text"]["f1"] == pytest.approx(200 / 3, **APPROX)
    assert color["by_source"]["image"]["f1"] == pytest.approx(25.0, **APPROX)
    assert color["gap"]["precision"] == pytest.approx(75.0, **APPROX)
    assert color["gap"]["recall"] == pytest.approx(25.0, **APPROX)
    assert color["gap"]["f1"] == pytest.approx(125 / 3, **APPROX)
    pattern = by_attribute["pattern"]
    # {E, F, G}: striped (1, 1), floral (0, 0), solid (1, 1); G (no source) only in overall
    assert pattern["overall"]["f1"] == pytest.approx(200 / 3, **APPROX)
    assert pattern["overall"]["n"] == 3
    assert pattern["by_source"]["text"]["n"] + pattern["by_source"]["image"]["n"] == 2
    assert pattern["gap"]["f1"] == pytest.approx(100.0, **APPROX)


def test_missing_source_gives_null_metrics_and_null_gap() -> None:
    report = source_aware_report([ex(("liquid",), ("liquid",)), ex(("gel",), ("gel",), None)])
    assert report["by_source"]["image"] == {
        "precision": None,
        "recall": None,
        "f1": None,
        "accuracy": None,
        "n": 0,
        "n_predicted": 0,
        "n_values": 0,
    }
    assert report["by_source"]["text"]["f1"] == pytest.approx(100.0, **APPROX)
    assert report["gap"] == {"precision": None, "recall": None, "f1": None, "accuracy": None}
    assert report["by_attribute"]["item_form"]["gap"]["f1"] is None


def test_report_keys_are_stable_and_json_serializable() -> None:
    block_keys = {"overall", "by_source", "gap"}
    for examples in (_source_case(), []):
        report = source_aware_report(examples, SYNONYMS)
        assert set(report) == block_keys | {"by_attribute"}
        assert set(report["by_source"]) == {"text", "image"}
        assert set(report["gap"]) == {"precision", "recall", "f1", "accuracy"}
        for block in report["by_attribute"].values():
            assert set(block) == block_keys
        assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert source_aware_report([])["overall"]["n"] == 0


def test_mention_position_is_whole_word_after_normalization() -> None:
    text = "Navy-Blue shirt; also in RED (blue trim)"
    assert mention_position("navy blue", text) == 0
    assert mention_position("red", text) == mention_position("Red!", text) == len("navy blue shirt also in ")
    assert mention_position("blue", text) == len("navy ")  # first whole-word occurrence
    assert mention_position("re", text) is None and mention_position("", text) is None


def test_answer_text_orders_by_first_mention_then_sorted() -> None:
    values = ["yellow", "white", "green", "white", " "]
    assert answer_text(values, ";") == "green ; white ; yellow"
    assert answer_text(values, ";", "Available in Yellow, green and white.") == "yellow ; green ; white"
    assert answer_text(values, "|", "A white vase") == "white | green | yellow"  # unmentioned ones sorted, last
    assert answer_text(values, ";", "") == "green ; white ; yellow"


def _ex(gold, pred, multi=False):
    return Example(gold=gold, pred=pred, source="image", attribute="color", multi_value=multi)


def test_departures_count_fixed_broke_neither_and_both():
    examples = [
        _ex(("red",), ("Red",)),  # same answer as the label (after normalization): not changed
        _ex(("red",), ("red",)),  # fixed: the label was wrong
        _ex(("red",), ("blue",)),  # broke: the label was right
        _ex(("red",), ("green",)),  # neither
        _ex(("red", "blue"), ("red", "blue", "white"), multi=True),  # both correct, different sets
        _ex(("red",), ()),  # broke: an empty answer is never correct
    ]
    labels = [("red ",), ("blue",), ("red",), ("blue",), ("red", "blue"), ("red",)]
    d = departures(examples, labels)
    assert {k: d[k] for k in ("n", "changed", "fixed", "broke", "neither", "both")} == {
        "n": 6,
        "changed": 5,
        "fixed": 1,
        "broke": 2,
        "neither": 1,
        "both": 1,
    }
    assert d["net"] == -1  # one more row right for the labels than for the model
    assert d["fix_rate"] == pytest.approx(20.0, **APPROX)
    assert d["either"] == pytest.approx(100.0 * 5 / 6, **APPROX)  # only the "neither" row is wrong for both
    # net is the difference of the two accuracies in rows
    model_acc = score(examples).accuracy
    label_acc = score([_ex(e.gold, ref, e.multi_value) for e, ref in zip(examples, labels)]).accuracy
    assert d["net"] == pytest.approx((model_acc - label_acc) * 6 / 100, **APPROX)


def test_departures_edge_cases_and_pooling():
    empty = departures([], [])
    assert empty["n"] == 0 and empty["fix_rate"] is None and empty["either"] is None
    same = departures([_ex(("red",), ("red",))], [("red",)])
    assert same["changed"] == 0 and same["fix_rate"] is None and same["either"] == 100.0
    with pytest.raises(ValueError, match="2 examples but 1"):
        departures([_ex(("red",), ("red",))] * 2, [("red",)])
    a = departures([_ex(("red",), ("red",)), _ex(("red",), ("blue",))], [("blue",), ("blue",)])
    b = departures([_ex(("red",), ("blue",))], [("red",)])
    pooled = merge_departures([a, b])
    assert (pooled["n"], pooled["changed"], pooled["fixed"], pooled["broke"], pooled["net"]) == (3, 2, 1, 1, 0)
    assert pooled["fix_rate"] == pytest.approx(50.0, **APPROX)
    assert pooled["either"] == pytest.approx(100.0 * 2 / 3, **APPROX)


def test_confidence_reliability_literal():
    # right answers at 0.9, 0.8, 0.6, 1.0; wrong ones at 0.7, 0.3: of the 4 x 2 (right, wrong) pairs, all but
    # (0.6, 0.7) rank the right answer higher
    result = confidence_reliability([0.9, 0.8, 0.6, 0.7, 0.3, 1.0], [True, True, True, False, False, True])
    assert result["auc"] == pytest.approx(7 / 8)
    assert [(b["low"], b["high"], b["n"]) for b in result["bins"]] == [
        (0.0, 0.5, 1),
        (0.5, 0.7, 1),
        (0.7, 0.9, 2),
        (0.9, 0.95, 1),
        (0.95, 1.0, 1),
    ]
    assert [b["accuracy"] for b in result["bins"]] == [0.0, 100.0, 50.0, 100.0, 100.0]
    assert confidence_reliability([0.2, 0.9], [True, True])["auc"] is None  # nothing to tell apart
    assert confidence_reliability([], [], edges=(0.5,))["bins"][0]["accuracy"] is None
    with pytest.raises(ValueError, match="2 confidences but 1"):
        confidence_reliability([0.1, 0.2], [True])
