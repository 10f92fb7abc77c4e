"""Hand-computed cross-modal retrieval cases (paper Figure 4: T@k, I@k, T@M, I@M, R@Mean)."""

from __future__ import annotations

import numpy as np
import pytest

from pv2tea.eval.retrieval import retrieval_metrics

APPROX = {"abs": 1e-9}
KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"}


def assert_metrics(got: dict[str, float], txt: tuple[float, float, float], img: tuple[float, float, float]) -> None:
    assert set(got) == KEYS
    assert (got["txt_r1"], got["txt_r5"], got["txt_r10"]) == pytest.approx(txt, **APPROX)
    assert (got["img_r1"], got["img_r5"], got["img_r10"]) == pytest.approx(img, **APPROX)
    assert got["txt_r_mean"] == pytest.approx(sum(txt) / 3, **APPROX)
    assert got["img_r_mean"] == pytest.approx(sum(img) / 3, **APPROX)
    assert got["r_mean"] == pytest.approx((sum(txt) + sum(img)) / 6, **APPROX)


def test_3x3_image_to_text_uses_rows_and_text_to_image_uses_columns() -> None:
    sim = np.array(
        [
            [0.9, 0.1, 0.5],  # image 0: text 0 first -> rank 0
            [0.8, 0.3, 0.2],  # image 1: text 1 below text 0 -> rank 1
            [0.1, 0.2, 0.7],  # image 2: rank 0
        ]
    )
    # columns: text 0 [.9 .8 .1], text 1 [.1 .3 .2], text 2 [.5 .2 .7]: every correct image first.
    got = retrieval_metrics(sim)
    assert_metrics(got, txt=(200 / 3, 100.0, 100.0), img=(100.0, 100.0, 100.0))
    assert got["txt_r_mean"] == pytest.approx(800 / 9, **APPROX)
    assert got["r_mean"] == pytest.approx(850 / 9, **APPROX)


def test_4x4_ties_count_only_strictly_higher_scores() -> None:
    sim = np.array(
        [
            [0.2, 0.9, 0.2, 0.1],  # image 0: 0.9 above, the tie at text 2 is not -> rank 1
            [0.5, 0.5, 0.5, 0.5],  # image 1: all tied -> rank 0
            [0.3, 0.6, 0.1, 0.4],  # image 2: rank 3
            [0.0, 0.7, 0.8, 0.6],  # image 3: rank 2
        ]
    )
    # columns: text 0 rank 2, text 1 rank 3, text 2 rank 3, text 3 rank 0.
    got = retrieval_metrics(sim)
    assert_metrics(got, txt=(25.0, 100.0, 100.0), img=(25.0, 100.0, 100.0))
    assert got["r_mean"] == pytest.approx(75.0, **APPROX)


def test_multi_positive_best_correct_text_counts_and_unpaired_text_is_only_a_distractor() -> None:
    sim = np.array(
        [
            # t0   t1   t2   t3   t4   t5    t6 (no image)
            [0.1, 0.8, 0.9, 0.2, 0.3, 0.4, 0.5],  # image 0, texts {0, 1}: best 0.8 -> rank 1
            [0.9, 0.8, 0.1, 0.6, 0.5, 0.4, 0.3],  # image 1, text {2}: 6 above -> rank 6
            [0.6, 0.5, 0.4, 0.1, 0.2, 0.15, 0.9],  # image 2, texts {3, 4, 5}: best 0.2 -> rank 4
        ]
    )
    # texts as queries (text 6 skipped): ranks t0 2, t1 0 (tie 0.8), t2 2, t3 2, t4 2, t5 2.
    got = retrieval_metrics(sim, [{0, 1}, {2}, {3, 4, 5}])
    assert_metrics(got, txt=(0.0, 200 / 3, 100.0), img=(100 / 6, 100.0, 100.0))
    assert got["r_mean"] == pytest.approx(1150 / 18, **APPROX)


def test_perfect_diagonal_gives_100() -> None:
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1.0, 0.0, size=(12, 12)) + 2.0 * np.eye(12)
    assert retrieval_metrics(sim) == {key: pytest.approx(100.0) for key in KEYS}


def test_reversed_ranking() -> None:
    n = 12
    idx = np.arange(n)
    sim = (idx[:, None] + idx[None, :]).astype(float)  # query i finds its match at rank n - 1 - i
    # ranks 11, 10, ..., 0 in both directions: 1, 5 and 10 of 12 queries within the cut-offs.
    got = retrieval_metrics(sim)
    assert_metrics(got, txt=(100 / 12, 500 / 12, 1000 / 12), img=(100 / 12, 500 / 12, 1000 / 12))
    assert got["r_mean"] == pytest.approx(400 / 9, **APPROX)


def test_k_beyond_candidates_is_clipped() -> None:
    # 2 candidates, correct one last: recall@1 is 0, recall@5 and @10 see both candidates.
    got = retrieval_metrics(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert_metrics(got, txt=(0.0, 100.0, 100.0), img=(0.0, 100.0, 100.0))


@pytest.mark.parametrize(
    ("sim", "img_to_txt", "match"),
    [
        (np.zeros((2, 3)), None, "non-square"),
        (np.zeros(3), None, "2-D"),
        (np.zeros((0, 0)), None, "non-empty"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), None, "NaN"),
        (np.zeros((2, 3)), [{0}], "2 images"),
        (np.zeros((2, 3)), [{0}, {3}], r"text index 3"),
        (np.zeros((2, 3)), [{0}, {-1}], r"text index -1"),
        (np.zeros((2, 3)), [set(), set()], "no query"),
    ],
)
def test_invalid_inputs_raise(sim: np.ndarray, img_to_txt: list[set[int]] | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, img_to_txt)
