"""decoder.prior_correction: candidates ranked by log p(c | x) − τ · log π(c), π the training label prior."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pv2tea.data.dataset import value_counts
from pv2tea.data.schema import Record


def test_value_counts_count_rows_per_normalized_value():
    rows = [
        Record("1", "t", (), "c", "Color", ("Red",)),
        Record("2", "t", (), "c", "Color", ("red ", "Blue")),
        Record("3", "t", (), "c", "Size", ("XL",)),
        Record("4", "t", (), "c", "Color", ("red", "RED")),
    ]
    assert value_counts(rows) == {"Color": {"blue": 1, "red": 3}, "Size": {"xl": 1}}


def test_label_log_prior_is_add_one_smoothed_over_the_candidates():
    from types import SimpleNamespace

    from pv2tea.decoding.generate import label_log_prior

    pre = SimpleNamespace(value_counts={"Color": {"red": 3, "blue": 1}})
    assert np.exp(label_log_prior(pre, "Color", ["Red", "Blue", "Green"])) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert np.exp(label_log_prior(pre, "Size", ["S", "M"])) == pytest.approx([0.5, 0.5])  # no counts: uniform


def test_models_save_their_label_counts_and_rank_with_the_correction(tiny_trained):
    from pv2tea.data.validate import load_dataset
    from pv2tea.decoding.generate import label_log_prior
    from pv2tea.experiment import load_predictor

    final, catalog = tiny_trained
    train = load_dataset(catalog["train"]).records
    saved = json.loads((final / "preprocess.json").read_text())["value_counts"]
    assert saved == value_counts(train)  # the rows the model trained on
    test = [r for r in load_dataset(catalog["test"], require_label=False).records if r.attribute == "pattern"]
    options = {"pattern": sorted(saved["pattern"]) + ["never seen"]}
    plain = load_predictor(final, prior_correction=0.0).candidate_log_probs(test, options)
    corrected_predictor = load_predictor(final, prior_correction=1.0)
    corrected = corrected_predictor.candidate_log_probs(test, options)
    for (cands, lp0), (_, lp1) in zip(plain, corrected):
        expected = lp0 - label_log_prior(corrected_predictor.pre, "pattern", cands)  # (C,)
        expected -= np.log(np.exp(expected).sum())
        assert lp1 == pytest.approx(expected, abs=1e-9)
    # the ranked answers follow the corrected scores: a prior that makes the plain favourite very common moves them
    favourite = plain[0][0][int(np.argmax(plain[0][1]))]
    corrected_predictor.pre.value_counts = {"pattern": {favourite: 10**6}}
    corrected = corrected_predictor.candidate_log_probs(test, options)
    ranked = corrected_predictor.predict(test, candidates=options)
    assert ranked == [[c[int(np.argmax(lp))]] for c, lp in corrected]
    assert ranked[0] != [favourite]
    # a model saved without counts (older pv2tea) ranks by likelihood alone, or takes the counts it is given
    corrected_predictor.pre.value_counts = {}
    assert corrected_predictor.predict(test, candidates=options) == [[c[int(np.argmax(lp))]] for c, lp in plain]
    given = load_predictor(final, prior_correction=1.0, trained_on=train)
    assert given.pre.value_counts == saved


def test_prior_correction_is_validated():
    from pv2tea.config import ConfigError, load_config

    assert (
        load_config("cpu", []).decoder.prior_correction == 1.0
        and load_config("paper", []).decoder.prior_correction == 0.0
    )
    with pytest.raises(ConfigError, match="prior_correction"):
        load_config("cpu", ["decoder.prior_correction=-1"])
