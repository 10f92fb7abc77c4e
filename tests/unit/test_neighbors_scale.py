"""S3 at scale: the approximate neighbour path against the exact one, value-index agreements against the dense
computation they replaced, the scaled probe, and the neighbour benchmark's JSON line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pv2tea.regularize.neighbors as nb
from pv2tea.bench.neighbors import clustered_features, growth_exponent, synthetic_labels
from pv2tea.regularize.neighbors import (
    approximate_knn,
    exact_knn_rows,
    expected_agreement,
    expected_prediction_agreement,
    knn_indices,
    prediction_reliability,
    visual_reliability,
)
from pv2tea.regularize.probe import cross_fitted_probe


def _dense_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _dense_hot(sets) -> np.ndarray:
    vocab: dict = {}
    rows = [[vocab.setdefault(v, len(vocab)) for v in values] for values in sets]
    hot = np.zeros((len(rows), max(len(vocab), 1)))
    for i, cols in enumerate(rows):
        hot[i, cols] = 1.0
    return hot


def _dense_fuzzy_prediction(labels, predictions) -> np.ndarray:
    """The N × N computation of Eq. 13–14 with fuzzy sets that the value index replaced."""
    hot = _dense_hot([*labels, *predictions])
    a = _dense_jaccard(hot[: len(labels)], hot[: len(labels)])  # (N, N) membership of j in Y_n
    b = _dense_jaccard(hot[len(labels) :], hot[len(labels) :])  # (N, N) membership of j in Ŷ_n
    return np.minimum(a, b).sum(1) / np.maximum(a, b).sum(1)


F = frozenset
# a hand-made attribute: 7 rows, multi-value labels, predictions that agree with some of them
LABELS = [F({"red"}), F({"red"}), F({"red", "white"}), F({"blue"}), F({"blue"}), F({"red", "white"}), F()]
PREDICTIONS = [F({"red"}), F({"white"}), F({"red", "white"}), F({"blue"}), F({"red"}), F({"red"}), F()]


def test_value_index_prediction_agreement_equals_dense_by_hand():
    # row 0 (label {red}, prediction {red}) by hand: J(label) over rows = 1, 1, 1/2, 0, 0, 1/2, 0;
    # J(prediction) = 1, 0, 1/2, 0, 1, 1, 0 → Σ min = 1 + 0 + 1/2 + 0 + 0 + 1/2 + 0 = 2, Σ max = 1 + 1 + 1/2 + 0 + 1 + 1 + 0 = 4.5
    got = prediction_reliability(LABELS, PREDICTIONS, "overlap")
    assert got[0] == pytest.approx(2 / 4.5, abs=1e-12)
    np.testing.assert_allclose(got, _dense_fuzzy_prediction(LABELS, PREDICTIONS), rtol=0, atol=1e-12)
    # exact matching: |Y ∩ Ŷ| / |Y ∪ Ŷ| from counts per value; row 3 ({blue}, {blue}): 1 / (2 + 1 − 1)
    exact = prediction_reliability(LABELS, PREDICTIONS)
    assert exact[3] == 0.5 and exact[0] == pytest.approx(1 / (2 + 3 - 1))


def test_value_index_chance_levels_equal_dense():
    hot_y, hot_p = _dense_hot([*LABELS, *PREDICTIONS])[:7], _dense_hot([*LABELS, *PREDICTIONS])[7:]
    size_y, size_p = _dense_jaccard(hot_y, hot_y).sum(1), _dense_jaccard(hot_p, hot_p).sum(1)
    inter = size_y * size_p / 7
    np.testing.assert_allclose(
        expected_prediction_agreement(LABELS, PREDICTIONS, "overlap"),
        inter / (size_y + size_p - inter),
        rtol=0,
        atol=1e-12,
    )
    groups = ["a", "a", "a", "b", "b", "a", "b"]
    want = np.zeros(7)
    for g in ("a", "b"):
        rows = [i for i, x in enumerate(groups) if x == g]
        want[rows] = (_dense_jaccard(hot_y[rows], hot_y[rows]).sum(1) - 1) / (len(rows) - 1)
    np.testing.assert_allclose(expected_agreement(LABELS, groups, "overlap"), want, rtol=0, atol=1e-12)


def test_value_index_equals_dense_on_random_attribute():
    rng = np.random.default_rng(3)
    pool = [F({"a"}), F({"b"}), F({"a", "b"}), F({"c"}), F({"a", "c", "d"}), F()]
    labels = [pool[i] for i in rng.integers(0, len(pool), 300)]
    preds = [pool[i] for i in rng.integers(0, len(pool), 300)]
    np.testing.assert_allclose(
        prediction_reliability(labels, preds, "overlap"), _dense_fuzzy_prediction(labels, preds), rtol=0, atol=1e-12
    )
    assert prediction_reliability(labels, preds, "overlap").std() > 0.01  # not a constant that trivially agrees


def test_pair_jaccard_table_and_per_pair_paths_agree():
    hot = _dense_hot([F({"a"}), F({"a", "b"}), F({"b", "c"}), F()])
    codes = np.array([0, 1, 2, 3, 3, 0])  # row → its set
    neighbours = np.array([[1, 2], [0, 3], [4, 5], [0, 1], [2, 3], [4, 1]])
    table = nb._pair_jaccard(hot, codes, neighbours)
    per_pair = nb._pair_jaccard(hot, codes, neighbours, chunk=4, table_max=0)
    assert np.array_equal(table, per_pair)
    # row 0 {a}: {a,b} 1/2, {b,c} 0; row 4 {}: {b,c} 0, {} 1 (two empty sets overlap fully); row 5 {a}: {} 0, {a,b} 1/2
    assert table[0].tolist() == [0.5, 0.0] and table[4].tolist() == [0.0, 1.0] and table[5].tolist() == [0.0, 0.5]


@pytest.fixture(scope="module")
def clustered():
    features, component = clustered_features(4000, dim=32, clusters=24, rank=8, seed=1)
    return features, component


def test_approximate_agrees_with_exact_on_clustered_features(clustered):
    features, component = clustered
    exact = knn_indices(features, 10)  # below the threshold: the exact path
    approx = knn_indices(features, 10, exact_below=1000)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.95
    assert not np.array_equal(approx, exact)  # a different search did run
    assert all(i not in row for i, row in enumerate(approx.tolist()))  # itself excluded
    labels, _, _ = synthetic_labels(component, values=6, seed=1)
    s_exact = visual_reliability(features, labels, 10, "overlap")
    s_approx = visual_reliability(features, labels, 10, "overlap", exact_below=1000)
    assert np.abs(s_exact - s_approx).mean() < 0.02
    assert s_exact.std() > 0.05  # the weights vary, so closeness says something


def test_chunked_search_equals_unchunked(clustered):
    features, _ = clustered
    one = approximate_knn(features, 10, chunk=len(features))
    assert np.array_equal(approximate_knn(features, 10, chunk=333), one)


@pytest.mark.parametrize("index", ["ivf", "hnsw", "flat"])
def test_other_indexes_find_the_neighbours(clustered, index):
    features, _ = clustered
    sample = np.arange(0, 4000, 40)
    truth = exact_knn_rows(features, sample, 10)
    found = approximate_knn(features[:4000], 10, index=index)[sample]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]) >= 0.95


def test_threshold_switches_the_search(monkeypatch):
    features = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    calls = []
    monkeypatch.setattr(nb, "approximate_knn", lambda x, k, **kw: calls.append(len(x)) or np.zeros((len(x), k), int))
    knn_indices(features, 3, exact_below=61)
    assert calls == []
    knn_indices(features, 3, exact_below=60)
    assert calls == [60]


def test_exact_path_is_unchanged_below_the_threshold():
    # the exact path is today's IndexFlatIP search: the same neighbours as a brute-force cosine ranking
    x = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    got = knn_indices(x, 5)
    assert np.array_equal(got, exact_knn_rows(x, np.arange(300), 5))


def test_too_few_candidates_fall_back_to_exact():
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    got = approximate_knn(x, 39, index="ivfpq")  # every other row is a neighbour
    assert all(sorted(row) == [j for j in range(40) if j != i] for i, row in enumerate(got.tolist()))


def test_probe_subsample_path_close_to_exact_fits():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    values = np.where(x[:, 0] > 0.3, "red", np.where(x[:, 1] > 0, "blue", "green"))
    labels = [F({v}) if rng.random() > 0.2 else F({str(rng.choice(["red", "blue", "green"]))}) for v in values]
    labels[3] = F()
    exact = cross_fitted_probe(x, labels)
    assert np.array_equal(cross_fitted_probe(x, labels, fit_rows=800).reliability, exact.reliability)  # fits all
    joint = cross_fitted_probe(x, labels, fit_rows=799)  # the subsample path, nearly every row
    assert np.abs(joint.reliability - exact.reliability).max() < 0.03
    np.testing.assert_allclose(joint.prior, exact.prior, atol=1e-12)
    sub = cross_fitted_probe(x, labels, fit_rows=300)
    assert np.abs(sub.reliability - exact.reliability).mean() < 0.08 and sub.gain > 0.2
    assert joint.reliability[3] == 1.0


def test_growth_exponent():
    assert growth_exponent([1e4, 1e5, 1e6], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert growth_exponent([1e4, 1e5], [1.0, 100.0]) == pytest.approx(2.0)
    assert growth_exponent([1e6], [47.0]) is None  # one size: no exponent (the JSON line says null, never NaN)
    from pv2tea.bench.neighbors import format_table

    one = {
        "neighbors": {"1000000": {"seconds": 47.0, "cpu_seconds": 86.1, "peak_gib": 1.38, "recall": 0.989}},
        "exponent": None,
        "cpu_exponent": None,
    }
    assert "no growth exponent" in format_table(one)


def test_bench_neighbors_prints_json_last(capsys):
    from pv2tea.cli import main

    assert main(["bench", "neighbors", "--quick", "--sizes", "300,600", "--dim", "16"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result["neighbors"]) == {"300", "600"}
    for figures in result["neighbors"].values():
        assert figures["seconds"] > 0 and 0 < figures["peak_gib"] < 4 and figures["recall"] == 1.0
    assert np.isfinite(result["exponent"])


def test_config_fields_match_the_search_and_are_checked():
    from pv2tea.config import KNN_INDEXES, ConfigError, SchemesConfig, load_config
    from pv2tea.regularize.probe import PROBE_FIT_ROWS

    s = SchemesConfig()
    assert KNN_INDEXES == nb.KNN_INDEXES and s.knn_index == "ivfpq"
    assert (s.knn_exact_below, s.knn_recall, s.probe_fit_rows) == (nb.KNN_EXACT_BELOW, nb.KNN_RECALL, PROBE_FIT_ROWS)
    assert load_config(None, ["schemes.knn_index=hnsw", "schemes.knn_exact_below=1000"]).schemes.knn_index == "hnsw"
    for bad in ("schemes.knn_index=annoy", "schemes.knn_recall=0", "schemes.probe_fit_rows=1"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])
