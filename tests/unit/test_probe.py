"""S3's cross-fitted probe (regularize/probe.py): literal cases."""

from __future__ import annotations

import numpy as np
import pytest

from pv2tea.regularize.probe import cross_fitted_probe, probe_reliability


def _two_clusters(n: int = 40, seed: int = 0) -> tuple[np.ndarray, list[frozenset[str]]]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-3, 1, (n // 2, 4)), rng.normal(3, 1, (n // 2, 4))])  # (N, 4)
    labels = [frozenset({"red"})] * (n // 2) + [frozenset({"blue"})] * (n // 2)
    return x, labels


def test_a_label_the_image_contradicts_gets_a_low_probability():
    x, labels = _two_clusters()
    labels[3] = frozenset({"blue"})  # a red-looking row labelled blue
    s = probe_reliability(x, labels)
    assert s.shape == (40,) and ((0 <= s) & (s <= 1)).all()
    assert s[3] < 0.2 and np.delete(s, 3).min() > 0.7


def test_multi_value_rows_average_their_values_and_unseen_values_get_zero():
    x, labels = _two_clusters()
    labels[0] = frozenset({"red", "blue"})  # half explained by the image
    labels[25] = frozenset({"green"})  # a value no other row carries: its fold's probe has never seen it
    labels[30] = frozenset()  # nothing left after normalization: nothing to judge
    s = probe_reliability(x, labels)
    assert 0.3 < s[0] < 0.7
    assert s[25] == 0.0 and s[30] == 1.0


def test_cross_fitting_is_deterministic_and_small_inputs():
    x, labels = _two_clusters()
    assert np.array_equal(probe_reliability(x, labels, seed=1), probe_reliability(x, labels, seed=1))
    assert np.array_equal(probe_reliability(x[:1], labels[:1]), np.ones(1))
    with pytest.raises(ValueError, match="feature rows"):
        probe_reliability(x[:3], labels)


def test_gain_says_whether_the_features_explain_the_labels():
    """The probe against the other folds' value frequencies: positive when the features separate the labels,
    not when the labels are independent of them; ``prior`` is each row's value frequency in the other folds."""
    x, labels = _two_clusters()
    fit = cross_fitted_probe(x, labels)
    assert fit.gain > 0.3
    assert np.allclose(fit.reliability, probe_reliability(x, labels))
    assert ((0.4 <= fit.prior) & (fit.prior <= 0.6)).all()  # each value is about half of the other folds
    shuffled = list(np.random.default_rng(1).permutation(np.array(labels, dtype=object)))
    assert cross_fitted_probe(x, shuffled).gain < 0
    constant = [frozenset({"red"})] * 40  # one value everywhere: the probe cannot beat its frequency (1)
    assert cross_fitted_probe(x, constant).gain == pytest.approx(0.0, abs=1e-5)
