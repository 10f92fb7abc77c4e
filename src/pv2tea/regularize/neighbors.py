"""S3: two-level neighbourhood-regularized sample weights (paper §3.3, Eq. 10–15).

Pure functions over arrays. Labels/predictions are hashable keys (e.g. a frozenset of normalized
values). Neighbourhoods are computed within one attribute by the caller.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import faiss
import numpy as np


def knn_indices(features: np.ndarray, k: int) -> np.ndarray:
    """(N, k') indices of each row's nearest neighbours by cosine similarity, itself excluded.

    k' = min(k, N − 1). Exact search (faiss ``IndexFlatIP`` on L2-normalized features).
    """
    n = features.shape[0]
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    x = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, k_eff + 1)  # (N, k'+1), usually itself first
    out = np.empty((n, k_eff), dtype=np.int64)
    for i in range(n):
        row = [j for j in found[i] if j != i and j >= 0][:k_eff]
        out[i] = row
    return out


def visual_reliability(features: np.ndarray, labels: Sequence[Hashable], k: int,
                       match: str = "exact") -> np.ndarray:
    """s_v(X_n) = |N_n ∩ Y_n| / K (Eq. 12): the share of the K visual neighbours sharing n's label.

    ``match="overlap"`` (labels are sets of values): a neighbour counts with the Jaccard overlap of
    its value set and n's instead of 0/1 set equality, so a multi-value label such as
    {red, white, blue}, which almost no other sample repeats exactly, is not judged unreliable for
    that alone. For single values both are the same.

    The sample itself is excluded from its neighbour set, so s_v ∈ [0, 1]. With fewer than two
    samples there are no neighbours and s_v = 1 (no evidence against the label).
    """
    n = len(labels)
    if n != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {n} labels")
    neighbours = knn_indices(features, k)
    if neighbours.shape[1] == 0:
        return np.ones(n)
    if match == "overlap":
        hot = _multi_hot(labels)  # (N, V)
        inter = np.einsum("nv,nkv->nk", hot, hot[neighbours])  # (N, k')
        union = hot.sum(1)[:, None] + hot[neighbours].sum(2) - inter  # (N, k')
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean(1)
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(lbl, len(index)) for lbl in labels])
    same = codes[neighbours] == codes[:, None]  # (N, k')
    return same.sum(1) / neighbours.shape[1]


def prediction_reliability(labels: Sequence[Hashable], predictions: Sequence[Hashable],
                           match: str = "exact") -> np.ndarray:
    """s_p(X_n) = |Ŷ_n ∩ Y_n| / |Ŷ_n ∪ Y_n| (Eq. 13–14).

    ``match="overlap"`` (labels and predictions are sets of values): Y_n and Ŷ_n become fuzzy sets,
    j belonging to Y_n with the Jaccard overlap of y_j and y_n (to Ŷ_n likewise), and the ratio is
    Σ_j min / Σ_j max; for single values it is the same as set equality.

    Y_n: samples whose training label equals n's label; Ŷ_n: samples whose previous prediction
    equals n's prediction (both include n itself).
    """
    if len(labels) != len(predictions):
        raise ValueError("labels and predictions differ in length")
    if match == "overlap":
        return _fuzzy_prediction_reliability(labels, predictions)
    label_count = Counter(labels)
    pred_count = Counter(predictions)
    both = Counter(zip(labels, predictions))
    out = np.empty(len(labels))
    for i, (y, p) in enumerate(zip(labels, predictions)):
        inter = both[(y, p)]
        out[i] = inter / (label_count[y] + pred_count[p] - inter)
    return out


def expected_agreement(labels: Sequence[Hashable], groups: Sequence[Hashable] | None = None,
                       match: str = "exact") -> np.ndarray:
    """e_n: the agreement n's label has by chance with another sample of its group (the chance level of s_v).

    The mean agreement (1/0 set equality, or Jaccard overlap with ``match="overlap"``) of n's label with the
    labels of the other samples of n's group (e.g. its category, whose K visual neighbours mostly share it;
    ``groups=None``: one group). A label the whole group repeats, such as a category's default value,
    agrees with any neighbour, so agreement with the neighbours says little about it.
    A sample alone in its group gets e_n = 0.
    """
    n = len(labels)
    if groups is not None and len(groups) != n:
        raise ValueError("labels and groups differ in length")
    out = np.zeros(n)
    for rows in _members(n, groups):
        m = len(rows)
        if m < 2:
            continue
        group_labels = [labels[i] for i in rows]
        if match == "overlap":
            total = _jaccard_row_sums(_multi_hot(group_labels)) - 1.0  # (m,) every other member, itself excluded
        else:
            count = Counter(group_labels)
            total = np.array([count[y] - 1 for y in group_labels], dtype=float)
        out[rows] = total / (m - 1)
    return out


def expected_prediction_agreement(labels: Sequence[Hashable], predictions: Sequence[Hashable],
                                  match: str = "exact") -> np.ndarray:
    """The chance level of s_p: |Y_n ∩ Ŷ_n| / |Y_n ∪ Ŷ_n| if predictions were independent of labels.

    With N samples the expected intersection is |Y_n|·|Ŷ_n| / N; with ``match="overlap"`` the
    cardinalities are those of the fuzzy sets of :func:`prediction_reliability`.
    """
    n = len(labels)
    if n != len(predictions):
        raise ValueError("labels and predictions differ in length")
    if match == "overlap":
        hot = _multi_hot([*labels, *predictions])  # one shared value vocabulary
        size_y, size_p = _jaccard_row_sums(hot[:n]), _jaccard_row_sums(hot[n:])
    else:
        label_count, pred_count = Counter(labels), Counter(predictions)
        size_y = np.array([label_count[y] for y in labels], dtype=float)
        size_p = np.array([pred_count[p] for p in predictions], dtype=float)
    inter = size_y * size_p / max(n, 1)
    return inter / (size_y + size_p - inter)


CHANCE_MAPPINGS = ("soft", "clip")


def chance_corrected(agreement: np.ndarray, expected: np.ndarray, mapping: str = "soft") -> np.ndarray:
    """Reliability relative to chance, from Cohen's κ = (s − e) / (1 − e) per sample, in [0, 1].

    ``mapping="soft"``: (1 + κ) / 2 with κ clipped to [−1, 1]; a label that agrees as often as chance gets
    0.5, one that agrees less gets less. ``"clip"``: κ clipped to [0, 1]; agreement at or below chance
    gets 0. Where e = 1 (every sample of the group carries the same label) nothing contradicts the label:
    κ is taken as 1.
    """
    if mapping not in CHANCE_MAPPINGS:
        raise ValueError(f"mapping must be one of {CHANCE_MAPPINGS}, got {mapping!r}")
    room = 1.0 - expected
    kappa = np.where(room > 1e-9, (agreement - expected) / np.maximum(room, 1e-9), 1.0)
    if mapping == "clip":
        return np.clip(kappa, 0.0, 1.0)
    return (1.0 + np.clip(kappa, -1.0, 1.0)) / 2.0


def combine(s_v: np.ndarray | None, s_p: np.ndarray | None) -> np.ndarray:
    """s(X_n) (Eq. 15): s_v before epoch E, the average of s_v and s_p from E on.

    Either level can be switched off (ablations w/o Vis-NR, w/o Pred-NR): the other is used alone.
    """
    if s_v is None and s_p is None:
        raise ValueError("at least one reliability level is needed")
    if s_v is None:
        return s_p  # type: ignore[return-value]
    if s_p is None:
        return s_v
    return (s_v + s_p) / 2


def rescale_to_mean_one(weights: np.ndarray, groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Weights divided by their mean, within each group (``None``: one group), so re-weighting changes which rows
    a group learns from and not how much it learns. A group whose weights are all zero (no row agrees above chance:
    no evidence either way) gets weight 1 everywhere."""
    out = np.ones(len(weights))
    for rows in _members(len(weights), groups):
        mean = float(weights[rows].mean())
        if mean > 0:
            out[rows] = weights[rows] / mean
    return out


def _members(n: int, groups: Sequence[Hashable] | None) -> list[list[int]]:
    """The row indices of each group (``None``: all n rows are one group), in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate([None] * n if groups is None else groups):
        members.setdefault(key, []).append(i)
    return list(members.values())


def _multi_hot(sets: Sequence[Hashable]) -> np.ndarray:
    """(N, V) 0/1 matrix of value sets (each label an iterable of values)."""
    vocab: dict[Hashable, int] = {}
    rows = [[vocab.setdefault(v, len(vocab)) for v in values] for values in sets]  # type: ignore[union-attr]
    hot = np.zeros((len(rows), max(len(vocab), 1)))
    for i, cols in enumerate(rows):
        hot[i, cols] = 1.0
    return hot


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard overlap (A, B) of multi-hot rows; two empty sets overlap fully."""
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _jaccard_row_sums(hot: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(N,) Σ_j Jaccard(row n, row j) over all rows j (itself included), in (chunk, N) blocks to bound memory."""
    blocks = [_jaccard(hot[start:start + chunk], hot).sum(1) for start in range(0, len(hot), chunk)]
    return np.concatenate(blocks) if blocks else np.zeros(0)


def _fuzzy_prediction_reliability(labels: Sequence[Hashable], predictions: Sequence[Hashable],
                                  chunk: int = 1024) -> np.ndarray:
    hot_y = _multi_hot([*labels, *predictions])
    hot_y, hot_p = hot_y[:len(labels)], hot_y[len(labels):]  # one shared value vocabulary
    out = np.empty(len(labels))
    for start in range(0, len(labels), chunk):  # (chunk, N) blocks bound the memory
        a = _jaccard(hot_y[start:start + chunk], hot_y)  # membership of j in Y_n
        b = _jaccard(hot_p[start:start + chunk], hot_p)  # membership of j in Ŷ_n
        out[start:start + chunk] = np.minimum(a, b).sum(1) / np.maximum(a, b).sum(1)
    return out
