"""S3 two-level neighbourhood reliability (paper §3.3, Eq. 10–15), worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pv2tea.regularize.neighbors import (
    chance_corrected,
    combine,
    expected_agreement,
    expected_prediction_agreement,
    knn_indices,
    prediction_reliability,
    rescale_to_mean_one,
    visual_reliability,
)


def polar(deg: float, r: float) -> list[float]:
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


# Two clusters by angle: A at 0°, 10°, 25° and B at 90°, 100°, 115°. The lengths differ on purpose:
# neighbours are by cosine, so only the angles matter.
ANGLES = [0, 10, 25, 90, 100, 115]
FEATURES = np.array([polar(a, r) for a, r in zip(ANGLES, [1.0, 3.0, 0.5, 2.0, 1.0, 4.0])], dtype=np.float32)
# A2 sits in the A cluster but carries the B cluster's label (a noisy weak label)
LABELS = ["red", "red", "blue", "blue", "blue", "blue"]


def test_knn_by_angle_k2():
    # angular gaps: A0-A1 10°, A1-A2 15°, A0-A2 25°, A2-B0 65° (same pattern in B)
    found = knn_indices(FEATURES, 2)
    assert found.tolist() == [[1, 2], [0, 2], [1, 0], [4, 5], [3, 5], [4, 3]]


def test_knn_uses_cosine_not_euclidean():
    # row 0 (1,0): row 1 is 5.7° away but 99 units; row 2 is 45° away but 0.9 units
    x = np.array([[1.0, 0.0], [100.0, 10.0], [0.1, 0.1]], dtype=np.float32)
    assert knn_indices(x, 1).tolist() == [[1], [0], [1]]


def test_knn_excludes_self_even_with_duplicates():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    found = knn_indices(x, 2)
    for i in range(3):
        assert i not in found[i]
        assert set(found[i]) == {0, 1, 2} - {i}


def test_knn_does_not_modify_input():
    x = FEATURES.copy()
    knn_indices(x, 2)
    assert np.array_equal(x, FEATURES)


def test_visual_reliability_k2_by_hand():
    # A0: {A1 red ✓, A2 blue ✗} → 1/2      A1: {A0 ✓, A2 ✗} → 1/2      A2 (blue): {A1 ✗, A0 ✗} → 0
    # B0: {B1 ✓, B2 ✓} → 1                 B1: {B0, B2} → 1            B2: {B1, B0} → 1
    s_v = visual_reliability(FEATURES, LABELS, 2)
    assert s_v.tolist() == pytest.approx([0.5, 0.5, 0.0, 1.0, 1.0, 1.0])


def test_visual_reliability_k3_by_hand():
    # third neighbours: A0→B0 (90°), A1→B0 (80°), A2→B0 (65°), B0→A2 (65°), B1→A2 (75°), B2→A2 (90° vs A1 105°)
    # A0: red? A1 ✓ A2 ✗ B0 ✗ → 1/3; A1: A0 ✓ A2 ✗ B0 ✗ → 1/3; A2 (blue): A1 ✗ A0 ✗ B0 ✓ → 1/3
    # B*: both B neighbours ✓ and A2 (blue) ✓ → 1
    s_v = visual_reliability(FEATURES, LABELS, 3)
    assert s_v.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 1.0])


def test_visual_reliability_with_multi_value_labels():
    labels = [
        frozenset({"red"}),
        frozenset({"red"}),
        frozenset({"red", "blue"}),
        frozenset({"blue", "red"}),
        frozenset({"blue"}),
        frozenset({"blue"}),
    ]
    # A2 and B0 share the label {red, blue} (set equality, order-free)
    # A0: {A1 ✓, A2 ✗} 1/2; A1: {A0 ✓, A2 ✗} 1/2; A2: {A1 ✗, A0 ✗} 0
    # B0: {B1 ✗, B2 ✗} 0;   B1: {B0 ✗, B2 ✓} 1/2; B2: {B1 ✓, B0 ✗} 1/2
    s_v = visual_reliability(FEATURES, labels, 2)
    assert s_v.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0, 0.5, 0.5])
    # k=3 adds B0 to A2's neighbours and A2 to B0's: now the shared {red, blue} label counts
    # A0: {A1 ✓, A2 ✗, B0 ✗}; A2: {A1 ✗, A0 ✗, B0 ✓}; B0: {B1 ✗, B2 ✗, A2 ✓}; B2: {B1 ✓, B0 ✗, A2 ✗} …
    assert visual_reliability(FEATURES, labels, 3).tolist() == pytest.approx([1 / 3] * 6)


def test_k_larger_than_n_minus_one_is_clipped():
    x = FEATURES[:3]  # A0, A1, A2 only
    assert knn_indices(x, 10).shape == (3, 2)
    # every sample's neighbours are the other two: A0 {A1 ✓, A2 ✗}, A1 {A0 ✓, A2 ✗}, A2 {✗, ✗}
    s_v = visual_reliability(x, ["red", "red", "blue"], 10)
    assert s_v.tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_single_sample_is_fully_reliable():
    s_v = visual_reliability(np.array([[0.3, 0.4]], dtype=np.float32), ["x"], 10)
    assert s_v.tolist() == [1.0]
    assert knn_indices(np.array([[0.3, 0.4]], dtype=np.float32), 5).shape == (1, 0)


def test_visual_reliability_length_mismatch():
    with pytest.raises(ValueError):
        visual_reliability(FEATURES, LABELS[:5], 2)


# Prediction neighbours: Y_n = same training label, Ŷ_n = same previous prediction (both contain n).
P_LABELS = ["r", "r", "b", "b", "b", "g"]
P_PREDS = ["r", "b", "b", "b", "r", "g"]
# label sets: r {0,1}, b {2,3,4}, g {5}; prediction sets: r {0,4}, b {1,2,3}, g {5}
# n=0: Y {0,1} Ŷ {0,4}   ∩ {0}     ∪ {0,1,4}     → 1/3
# n=1: Y {0,1} Ŷ {1,2,3} ∩ {1}     ∪ {0,1,2,3}   → 1/4
# n=2: Y {2,3,4} Ŷ {1,2,3} ∩ {2,3} ∪ {1,2,3,4}   → 2/4
# n=3: same sets as n=2                          → 2/4
# n=4: Y {2,3,4} Ŷ {0,4} ∩ {4}     ∪ {0,2,3,4}   → 1/4
# n=5: Y {5} Ŷ {5}                               → 1
S_P = [1 / 3, 1 / 4, 1 / 2, 1 / 2, 1 / 4, 1.0]


def test_prediction_reliability_by_hand():
    assert prediction_reliability(P_LABELS, P_PREDS).tolist() == pytest.approx(S_P)


def test_prediction_reliability_agreeing_predictions_is_one():
    assert prediction_reliability(P_LABELS, P_LABELS).tolist() == [1.0] * 6


def test_prediction_reliability_frozensets():
    labels = [frozenset({"a", "b"}), frozenset({"b", "a"}), frozenset({"c"})]
    preds = [frozenset({"a", "b"}), frozenset({"c"}), frozenset({"c"})]
    # label sets: {0,1}, {0,1}, {2}; prediction sets: ab {0}, c {1,2}
    # n=0: ∩ {0} ∪ {0,1} → 1/2; n=1: ∩ {1} ∪ {0,1,2} → 1/3; n=2: ∩ {2} ∪ {1,2} → 1/2
    assert prediction_reliability(labels, preds).tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2])


def test_prediction_reliability_length_mismatch():
    with pytest.raises(ValueError):
        prediction_reliability(["a", "b"], ["a"])


def test_combine_is_average_eq15():
    s_v = np.array([0.5, 0.5, 0.0, 1.0, 1.0, 1.0])
    s_p = np.array(S_P)
    # (1/2 + 1/3)/2 = 5/12, (1/2 + 1/4)/2 = 3/8, (0 + 1/2)/2 = 1/4, (1 + 1/2)/2 = 3/4, (1 + 1/4)/2 = 5/8, 1
    assert combine(s_v, s_p).tolist() == pytest.approx([5 / 12, 3 / 8, 1 / 4, 3 / 4, 5 / 8, 1.0])


def test_combine_one_side_missing_returns_the_other():
    s_v = np.array([0.5, 0.25])
    s_p = np.array([1.0, 0.0])
    assert combine(s_v, None).tolist() == [0.5, 0.25]
    assert combine(None, s_p).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        combine(None, None)


def test_end_to_end_worked_example():
    # visual level k=2 on the clusters, prediction level with predictions that fix A2's label
    s_v = visual_reliability(FEATURES, LABELS, 2)  # [1/2, 1/2, 0, 1, 1, 1]
    preds = ["red", "red", "red", "blue", "blue", "blue"]
    # label sets: red {0,1}, blue {2,3,4,5}; prediction sets: red {0,1,2}, blue {3,4,5}
    # n=0,1: ∩ {0,1} ∪ {0,1,2} → 2/3;  n=2: ∩ {2} ∪ {0,1,2,3,4,5} → 1/6;  n=3..5: ∩ {3,4,5} ∪ {2,3,4,5} → 3/4
    s_p = prediction_reliability(LABELS, preds)
    assert s_p.tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 6, 3 / 4, 3 / 4, 3 / 4])
    s = combine(s_v, s_p)
    assert s.tolist() == pytest.approx([7 / 12, 7 / 12, 1 / 12, 7 / 8, 7 / 8, 7 / 8])
    assert int(np.argmin(s)) == 2  # the mislabelled sample gets the smallest weight


# --- "overlap" label matching (Jaccard of value sets), the default in training ---------------


def test_overlap_equals_exact_for_single_values():
    singles = [frozenset({v}) for v in LABELS]
    for k in (1, 2, 3, 5):
        assert visual_reliability(FEATURES, singles, k, "overlap").tolist() == pytest.approx(
            visual_reliability(FEATURES, LABELS, k).tolist()
        )
    labels, preds = [frozenset({v}) for v in P_LABELS], [frozenset({v}) for v in P_PREDS]
    assert prediction_reliability(labels, preds, "overlap").tolist() == pytest.approx(S_P)


def test_visual_reliability_overlap_by_hand():
    labels = [
        frozenset({"red"}),
        frozenset({"red"}),
        frozenset({"red", "blue"}),
        frozenset({"blue", "red"}),
        frozenset({"blue"}),
        frozenset({"blue"}),
    ]
    # k=2 neighbours: A0 {A1, A2}, A1 {A0, A2}, A2 {A1, A0}, B0 {B1, B2}, B1 {B0, B2}, B2 {B1, B0}
    # J({red},{red}) = 1, J({red},{red,blue}) = J({blue},{red,blue}) = 1/2
    # A0: (1 + 1/2)/2; A2: (1/2 + 1/2)/2; B0: (1/2 + 1/2)/2; B1: (1/2 + 1)/2
    s_v = visual_reliability(FEATURES, labels, 2, "overlap")
    assert s_v.tolist() == pytest.approx([0.75, 0.75, 0.5, 0.5, 0.75, 0.75])


def test_prediction_reliability_overlap_by_hand():
    labels = [frozenset({"a", "b"}), frozenset({"a"}), frozenset({"c"})]
    preds = [frozenset({"a", "b"}), frozenset({"a", "b"}), frozenset({"c"})]
    # memberships in Y_0: [1, 1/2, 0], in Ŷ_0: [1, 1, 0] → Σmin 1.5 / Σmax 2
    # Y_1: [1/2, 1, 0], Ŷ_1: [1, 1, 0] → 1.5 / 2;  n=2 agrees only with itself → 1
    assert prediction_reliability(labels, preds, "overlap").tolist() == pytest.approx([0.75, 0.75, 1.0])
    from pv2tea.regularize.neighbors import _fuzzy_prediction_reliability  # chunked rows: same result

    assert _fuzzy_prediction_reliability(labels, preds, chunk=1).tolist() == pytest.approx([0.75, 0.75, 1.0])


# ------------------------------------------------------------------ chance correction


def test_expected_agreement_exact_by_hand():
    # group a: labels x, x, y -> the x's agree with 1 of the 2 others, y with none; group b: alone -> 0
    labels = ["x", "x", "y", "x"]
    groups = ["a", "a", "a", "b"]
    np.testing.assert_allclose(expected_agreement(labels, groups), [0.5, 0.5, 0.0, 0.0])


def test_expected_agreement_without_groups_uses_everyone():
    np.testing.assert_allclose(expected_agreement(["x", "x", "y", "x"]), [2 / 3, 2 / 3, 0.0, 2 / 3])


def test_expected_agreement_overlap_by_hand():
    labels = [frozenset({"red"}), frozenset({"red", "blue"}), frozenset({"blue"})]
    # Jaccard: (0,1) = 1/2, (0,2) = 0, (1,2) = 1/2
    np.testing.assert_allclose(expected_agreement(labels, match="overlap"), [0.25, 0.5, 0.25])


def test_expected_agreement_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        expected_agreement(["x", "y"], ["a"])


def test_chance_corrected_clip_is_kappa_clipped_to_unit_interval():
    s = np.array([0.8, 0.8, 0.2, 1.0, 1.0, 0.5])
    e = np.array([0.8, 0.6, 0.6, 0.5, 1.0, 0.0])
    # kappa: 0, 0.5, -1 -> 0, 1, e = 1 (all labels alike) -> 1, 0.5
    np.testing.assert_allclose(chance_corrected(s, e, "clip"), [0.0, 0.5, 0.0, 1.0, 1.0, 0.5], atol=1e-12)


def test_chance_corrected_soft_maps_kappa_to_half_at_chance():
    s = np.array([0.8, 0.8, 0.2, 0.0, 1.0, 0.5])
    e = np.array([0.8, 0.6, 0.6, 0.9, 1.0, 0.0])
    # kappa: 0, 0.5, -1, -9 -> -1, e = 1 -> 1, 0.5; weight (1 + kappa) / 2
    np.testing.assert_allclose(chance_corrected(s, e), [0.5, 0.75, 0.0, 0.0, 1.0, 0.75], atol=1e-12)


def test_chance_corrected_rejects_unknown_mapping():
    with pytest.raises(ValueError, match="mapping"):
        chance_corrected(np.ones(2), np.zeros(2), "sharp")


def test_chance_correction_ranks_a_rare_agreeing_label_above_a_default_value():
    # Both samples agree with 2 of their 3 neighbours, but "white" is what 80% of the category carries,
    # "pink" 20%: only the pink agreement is above chance.
    labels = ["white"] * 8 + ["pink"] * 2
    e = expected_agreement(labels, ["mug"] * 10)
    s = np.full(10, 2 / 3)
    # white: e = 7/9, kappa = -0.5; pink: e = 1/9, kappa = 0.625
    np.testing.assert_allclose(chance_corrected(s, e, "soft")[[0, -1]], [0.25, 0.8125])
    np.testing.assert_allclose(chance_corrected(s, e, "clip")[[0, -1]], [0.0, 0.625])


def test_expected_prediction_agreement_exact_by_hand():
    labels = ["a", "a", "b", "b"]
    preds = ["a", "b", "b", "b"]
    # n=0: |Y|=2, |P|=1 -> inter 0.5 -> 0.5 / 2.5 ; n=1: |Y|=2, |P|=3 -> 1.5 / 3.5 ; n=2,3: |Y|=2,|P|=3
    np.testing.assert_allclose(expected_prediction_agreement(labels, preds), [0.2, 1.5 / 3.5, 1.5 / 3.5, 1.5 / 3.5])


def test_expected_prediction_agreement_overlap_equals_exact_for_single_values():
    labels = [frozenset({v}) for v in "aabbc"]
    preds = [frozenset({v}) for v in "abbcc"]
    np.testing.assert_allclose(
        expected_prediction_agreement(labels, preds, "overlap"), expected_prediction_agreement(labels, preds, "exact")
    )


def test_perfect_predictions_are_above_chance():
    labels = ["a", "a", "b", "c"]
    w = chance_corrected(prediction_reliability(labels, labels), expected_prediction_agreement(labels, labels), "clip")
    assert (w > 0).all()


def test_rescale_to_mean_one_overall_and_per_group():
    w = np.array([1.0, 3.0, 0.0, 0.0, 2.0])
    assert np.allclose(rescale_to_mean_one(w), w / 1.2)
    assert np.allclose(rescale_to_mean_one(w, ["a", "a", "b", "b", "c"]), [0.5, 1.5, 1.0, 1.0, 1.0])  # b: all zero
    assert np.allclose(rescale_to_mean_one(np.zeros(3)), np.ones(3))
