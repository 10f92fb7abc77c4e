"""Cross-modal retrieval metrics of PV2TEA (ACL Findings 2023), paper §5.2 and Figure 4.

The alignment objective of S1 (augmented label-smoothed contrast, paper §3.1) is judged by
image-to-text and text-to-image retrieval on an image-text similarity matrix ``sim_i2t`` of
shape ``(N_img, N_txt)``:

* image -> text: each image (a row) ranks all texts; ``txt_r{k}`` is the percentage of
  images with a correct text among the first ``k`` (the paper's ``T@k``);
* text -> image: each text (a column of ``sim_i2t``, i.e. a row of ``sim_i2t.T``) ranks all
  images; ``img_r{k}`` is the percentage of texts with a correct image among the first ``k``
  (the paper's ``I@k``);
* ``txt_r_mean`` / ``img_r_mean`` average the recalls at 1, 5 and 10 (``T@M`` / ``I@M``) and
  ``r_mean`` averages those two (``R@Mean``).

Ranks are 0-based and optimistic on ties: the rank of a candidate is the number of
candidates with a *strictly* higher score, so tied candidates share the best of their ranks
(a row of equal scores ranks every candidate first). A query with several correct candidates takes the
best rank among them. ``k`` larger than the number of candidates is clipped to it, so the
recall is then 100. Queries without any correct candidate (an image whose set of texts is
empty, or a text paired with no image) are not evaluated in that direction; they still act
as distractor candidates in the other direction.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from statistics import fmean

import numpy as np

__all__ = ["RECALL_KS", "retrieval_metrics"]

#: Cut-offs of the reported recalls; their mean is the rank average ``T@M`` / ``I@M``.
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _positive_mask(n_img: int, n_txt: int, img_to_txt: Sequence[Collection[int]] | None) -> np.ndarray:
    """Boolean ``(n_img, n_txt)`` matrix of correct image-text pairs."""
    if img_to_txt is None:
        if n_img != n_txt:
            raise ValueError(f"sim_i2t has shape ({n_img}, {n_txt}); a non-square matrix needs img_to_txt")
        return np.eye(n_img, dtype=bool)
    if len(img_to_txt) != n_img:
        raise ValueError(f"img_to_txt has {len(img_to_txt)} entries for {n_img} images")
    mask = np.zeros((n_img, n_txt), dtype=bool)
    for image, texts in enumerate(img_to_txt):
        for text in texts:
            if not 0 <= text < n_txt:
                raise ValueError(f"img_to_txt[{image}] holds text index {text}, not in [0, {n_txt})")
            mask[image, text] = True
    return mask


def _recalls(sim: np.ndarray, positive: np.ndarray) -> list[float]:
    """Recall@k (percent) for ``RECALL_KS`` of queries (rows) over candidates (columns)."""
    queries = positive.any(axis=1)
    if not queries.any():
        raise ValueError("no query has a correct candidate")
    sim, positive = sim[queries], positive[queries]
    best_positive = np.where(positive, sim, -np.inf).max(axis=1)  # (Q,)
    ranks = (sim > best_positive[:, None]).sum(axis=1)  # (Q,) candidates strictly above
    n_candidates = sim.shape[1]
    return [100.0 * float(np.mean(ranks < min(k, n_candidates))) for k in RECALL_KS]


def retrieval_metrics(sim_i2t: np.ndarray, img_to_txt: Sequence[Collection[int]] | None = None) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 and their rank averages, in percent.

    Args:
        sim_i2t: ``(N_img, N_txt)`` image-text similarity scores (higher is more similar).
        img_to_txt: for each image, the indices of its correct texts. By default image ``i``
            matches text ``i`` only, which needs a square matrix.

    Returns:
        ``txt_r1, txt_r5, txt_r10`` (image->text, ``T@k``), ``img_r1, img_r5, img_r10``
        (text->image, ``I@k``), ``txt_r_mean``, ``img_r_mean`` (``T@M``, ``I@M``) and
        ``r_mean`` (``R@Mean``); see the module docstring for ranks, ties and clipping.

    Raises:
        ValueError: on a matrix that is not 2-D, is empty or holds NaN, on a non-square
            matrix without ``img_to_txt``, on out-of-range text indices, or when no query
            of a direction has a correct candidate.
    """
    sim = np.asarray(sim_i2t, dtype=np.float64)
    if sim.ndim != 2 or sim.size == 0:
        raise ValueError(f"sim_i2t must be a non-empty 2-D matrix, got shape {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("sim_i2t holds NaN")
    positive = _positive_mask(sim.shape[0], sim.shape[1], img_to_txt)
    txt = _recalls(sim, positive)
    img = _recalls(sim.T, positive.T)
    metrics = {f"txt_r{k}": r for k, r in zip(RECALL_KS, txt)}
    metrics |= {f"img_r{k}": r for k, r in zip(RECALL_KS, img)}
    metrics["txt_r_mean"] = fmean(txt)
    metrics["img_r_mean"] = fmean(img)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2.0
    return metrics
