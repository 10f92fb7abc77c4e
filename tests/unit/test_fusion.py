"""Late fusion of the model's candidate scores with a text extractor's probabilities, on literal cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pv2tea.decoding.fusion import PRIOR_FLOOR, check_weight, fuse_scores, log_normalize, prior_log_probs


def test_log_normalize_is_a_log_distribution_of_any_scale():
    out = log_normalize(np.array([-30.0, -30.0 + math.log(3)]))  # sequence log-likelihoods: 1 : 3
    assert np.exp(out) == pytest.approx([0.25, 0.75])


def test_prior_is_renormalized_over_the_candidates_by_normalized_value():
    prior = prior_log_probs(["Red", "BLUE!", "green"], {"red": 0.2, "blue": 0.6, "black": 0.2})
    # green is unknown to the extractor: it gets the floor; black is no candidate: its mass is dropped
    total = 0.2 + 0.6 + PRIOR_FLOOR
    assert np.exp(prior) == pytest.approx([0.2 / total, 0.6 / total, PRIOR_FLOOR / total])


def test_product_of_experts_picks_the_candidate_both_find_likely():
    model = np.log([0.5, 0.4, 0.1])  # the model slightly prefers candidate 0
    prior = np.log([0.1, 0.6, 0.3])  # the extractor clearly prefers candidate 1
    fused = fuse_scores(model, prior)
    assert np.exp(fused) == pytest.approx([0.05, 0.24, 0.03])  # p_model · q, unnormalized
    assert int(np.argmax(fused)) == 1
    assert int(np.argmax(fuse_scores(model, prior, weight=0.0))) == 0  # weight 0: the model alone
    assert int(np.argmax(fuse_scores(model, prior, weight=0.1))) == 0  # a light prior does not overturn it


def test_mismatched_lengths_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="2 model scores but 3"):
        fuse_scores([0.0, 1.0], [0.0, 0.0, 0.0])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="extractor weight"):
            check_weight(bad)
    assert check_weight(0) == 0.0
