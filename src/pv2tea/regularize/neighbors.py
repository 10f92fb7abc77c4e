"""S3: two-level neighbourhood-regularized sample weights (paper §3.3, Eq. 10–15).

Pure functions over arrays. Labels/predictions are hashable keys (e.g. a frozenset of normalized
values). Neighbourhoods are computed within one attribute by the caller.

Scale: an attribute with fewer than ``exact_below`` rows searches its neighbours exactly (faiss ``IndexFlatIP``);
a larger one through an approximate faiss index (``knn_index``), in chunks of rows, each candidate list re-ranked
by exact cosine against the caller's features (docs/results.md, S3 at a million products). Agreements between labels
and predictions are counted through value indexes (each distinct label or prediction once, with its count), never
as an N × N matrix.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import faiss
import numpy as np

from pv2tea.config import KNN_INDEXES

KNN_EXACT_BELOW = 50_000  # schemes.knn_exact_below
KNN_RECALL = 0.97  # schemes.knn_recall
KNN_CHUNK = 16_384  # query rows per search call on the approximate path


def knn_indices(
    features: np.ndarray,
    k: int,
    *,
    exact_below: int = KNN_EXACT_BELOW,
    index: str = "ivfpq",
    recall: float = KNN_RECALL,
    chunk: int = KNN_CHUNK,
    seed: int = 0,
) -> np.ndarray:
    """(N, k') indices of each row's nearest neighbours by cosine similarity, itself excluded, nearest first.

    k' = min(k, N − 1). Below ``exact_below`` rows: exact search (faiss ``IndexFlatIP`` on L2-normalized
    features). From ``exact_below`` rows on: :func:`approximate_knn` with the ``index`` kind tuned to ``recall``,
    searched ``chunk`` rows at a time.
    """
    n = features.shape[0]
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    if n >= exact_below:
        return approximate_knn(features, k_eff, index=index, chunk=chunk, seed=seed, recall=recall)
    x = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, found = flat.search(x, k_eff + 1)  # (N, k'+1), usually itself first
    out = np.empty((n, k_eff), dtype=np.int64)
    for i in range(n):
        row = [j for j in found[i] if j != i and j >= 0][:k_eff]
        out[i] = row
    return out


def approximate_knn(
    features: np.ndarray,
    k: int,
    *,
    index: str = "ivfpq",
    chunk: int = KNN_CHUNK,
    seed: int = 0,
    recall: float = KNN_RECALL,
    candidates: int | None = None,
    lists: int | None = None,
) -> np.ndarray:
    """(N, k) cosine nearest neighbours of every row among all rows, itself excluded, nearest first; 1 ≤ k < N.

    ``index``: "ivfpq" (inverted lists of 4-bit product-quantized codes scanned with SIMD, faiss
    ``IndexIVFPQFastScan``; the default, chosen by measurement), "ivf" (inverted lists of float32 vectors),
    "hnsw" (a graph, ``IndexHNSWFlat``) or "flat" (exact, chunked). Each row's ``candidates`` best hits
    (default: 4·(k + 1) for "ivfpq", more when the recall needs them) are re-ranked by exact cosine against
    ``features`` itself, so "ivfpq" keeps no normalized copy of the rows ("ivf", "hnsw" and "flat" store one). The
    inverted lists (about √N) are trained on a seeded subsample. Before the search, a seeded sample of 256 rows is
    searched exactly and the index probes more lists (or explores more of the graph) until it finds ``recall`` of
    the sample's neighbours, so the accuracy does not depend on how clustered the features happen to be. Queries run ``chunk`` rows at a time: memory beyond the
    index is O(chunk · candidates), and the result does not depend on ``chunk``.
    """
    if index not in KNN_INDEXES:
        raise ValueError(f"index must be one of {KNN_INDEXES}, got {index!r}")
    x = np.ascontiguousarray(features, dtype=np.float32)  # no copy for float32 C-contiguous input
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    inv_norm = _inverse_norms(x, chunk)  # (N,)
    built, settings = _build_index(x, inv_norm, index, chunk, seed, lists)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 256), replace=False))
    truth = _exact_rows(x, inv_norm, sample, k, chunk)  # (256, k)
    for setting, factor in settings:  # the cheapest setting that finds `recall` of the sample's exact neighbours
        setting()
        wanted = min(max(candidates or factor * (k + 1), k + 1), n)
        found = _search_rows(built, x, inv_norm, sample, k, wanted)
        if _recall(found, truth) >= recall:
            break
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        out[start : start + chunk] = _search_rows(
            built, x, inv_norm, np.arange(start, min(start + chunk, n)), k, wanted
        )
    short = np.flatnonzero(out[:, -1] < 0)  # the probed lists held fewer than k other rows
    if len(short):
        out[short] = _exact_rows(x, inv_norm, short, k, chunk)
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of the true neighbours (rows of ``truth``) among the found ones (same rows of ``found``)."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def _search_rows(index, x: np.ndarray, inv_norm: np.ndarray, rows: np.ndarray, k: int, candidates: int) -> np.ndarray:
    """(len(rows), k) neighbours of the given rows: the index's candidates re-ranked by exact cosine; −1 where
    fewer than k other rows were found."""
    q = x[rows] * inv_norm[rows, None]  # (r, C) normalized queries
    found = index.search(q, candidates)[1]  # (r, candidates) row ids, −1 where the lists ran out
    found[found == rows[:, None]] = -1  # itself excluded
    sims = np.empty(found.shape, dtype=np.float32)  # (r, candidates) exact cosine, −inf for −1
    faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]  # a faiss function its __init__.pyi omits
        faiss.swig_ptr(sims),
        faiss.swig_ptr(q),
        faiss.swig_ptr(x),
        faiss.swig_ptr(found),
        x.shape[1],
        len(q),
        found.shape[1],
    )
    sims *= inv_norm[np.maximum(found, 0)]
    sims[found < 0] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (r, k) nearest first
    out = np.take_along_axis(found, order, 1)
    out[np.take_along_axis(sims, order, 1) == -np.inf] = -1
    return out


def _build_index(x: np.ndarray, inv_norm: np.ndarray, kind: str, chunk: int, seed: int, lists: int | None):
    """The faiss index over the normalized rows of ``x`` (added ``chunk`` rows at a time), and its search
    settings from cheapest to most thorough: (a callable that applies one, candidates per row as a multiple of
    k + 1). PQ codes rank coarsely, so from 16 lists on "ivfpq" also re-ranks more candidates."""
    n, dim = x.shape

    def normalized(rows: np.ndarray | slice) -> np.ndarray:
        return x[rows] * inv_norm[rows, None]

    settings: list = [(lambda: None, 1)]
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40

        def ef(value: int):
            return lambda: setattr(hnsw.hnsw, "efSearch", value)

        settings = [(ef(v), 1) for v in (32, 64, 128, 256, 512)]
        index = hnsw
    else:
        nlist = lists or int(min(max(math.isqrt(n), 16), 8192))  # lists of about √N rows
        quantizer = faiss.IndexFlatIP(dim)
        ivf: faiss.IndexIVF
        if kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # 4-bit PQ on 4 dimensions per code, scanned with SIMD; codes of the vectors themselves
            fast_scan = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, _pq_codes(dim), 4, faiss.METRIC_INNER_PRODUCT)
            fast_scan.by_residual = False
            ivf = fast_scan
        ivf.cp.spherical = True
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False))
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # training runs many tiny parallel loops: on a busy machine, threads
        try:  # waiting on each other took 40 s instead of 1 s
            ivf.train(normalized(sample))
        finally:
            faiss.omp_set_num_threads(threads)

        def probe(value: int):
            return lambda: setattr(ivf, "nprobe", min(value, nlist))

        index = ivf
        ladder: tuple[tuple[int, int], ...] = (
            (4, 4),
            (8, 4),
            (16, 4),
            (16, 8),
            (32, 8),
            (64, 8),
            (64, 16),
            (128, 16),
            (nlist, 16),
            (nlist, 32),
        )
        if kind == "ivf":  # full vectors rank exactly: no more candidates than k + 1 are needed
            ladder = tuple((lists_, 1) for lists_ in (4, 8, 16, 32, 64, 128, nlist))
        settings = [(probe(p), f) for p, f in ladder if p <= nlist]
    for start in range(0, n, chunk):
        index.add(normalized(slice(start, start + chunk)))
    return index, settings


def _pq_codes(dim: int) -> int:
    """The number of PQ sub-quantizers: one per 4 dimensions (a divisor of dim, even for fast scan)."""
    for m in range(max(dim // 4, 2), 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return dim  # odd small dims: one code per dimension


def exact_knn_rows(features: np.ndarray, rows: np.ndarray, k: int, chunk: int = KNN_CHUNK) -> np.ndarray:
    """(len(rows), k) exact cosine neighbours of the given rows among all rows, itself excluded, nearest first:
    the reference recall is measured against, in O(len(rows) · N) work and O(len(rows) · chunk) memory."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    return _exact_rows(x, _inverse_norms(x, chunk), np.asarray(rows), k, chunk)


def _inverse_norms(x: np.ndarray, chunk: int) -> np.ndarray:
    """(N,) 1/|x_n| in float32, 0 for a zero row (as ``faiss.normalize_L2`` leaves it), ``chunk`` rows at a time."""
    inv_norm = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk):
        norms = np.linalg.norm(x[start : start + chunk], axis=1)
        inv_norm[start : start + chunk] = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0)
    return inv_norm


def _exact_rows(x: np.ndarray, inv_norm: np.ndarray, rows: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """(len(rows), k) exact cosine neighbours of the given rows among all rows, itself excluded, nearest first."""
    q = x[rows] * inv_norm[rows, None]  # (r, C)
    best_sims = np.full((len(rows), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(rows), 0), dtype=np.int64)
    for start in range(0, len(x), chunk):  # the rows in chunks: memory O(r · chunk)
        sims = q @ (x[start : start + chunk] * inv_norm[start : start + chunk, None]).T  # (r, c)
        ids = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        sims = np.where(ids == rows[:, None], -np.inf, sims)  # itself excluded
        sims, ids = np.concatenate([best_sims, sims], 1), np.concatenate([best_ids, ids], 1)
        if sims.shape[1] > k:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims, ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)
        best_sims, best_ids = sims, ids
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, 1)


def visual_reliability(
    features: np.ndarray,
    labels: Sequence[Hashable],
    k: int,
    match: str = "exact",
    *,
    exact_below: int = KNN_EXACT_BELOW,
    index: str = "ivfpq",
    recall: float = KNN_RECALL,
    seed: int = 0,
) -> np.ndarray:
    """s_v(X_n) = |N_n ∩ Y_n| / K (Eq. 12): the share of the K visual neighbours sharing n's label.

    ``match="overlap"`` (labels are sets of values): a neighbour counts with the Jaccard overlap of
    its value set and n's instead of 0/1 set equality, so a multi-value label such as
    {red, white, blue}, which almost no other sample repeats exactly, is not judged unreliable for
    that alone. For single values both are the same.

    The sample itself is excluded from its neighbour set, so s_v ∈ [0, 1]. With fewer than two
    samples there are no neighbours and s_v = 1 (no evidence against the label). ``exact_below``, ``index``,
    ``recall``, ``seed``: how the neighbours are searched (:func:`knn_indices`).
    """
    n = len(labels)
    if n != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {n} labels")
    neighbours = knn_indices(features, k, exact_below=exact_below, index=index, recall=recall, seed=seed)
    return neighbour_agreement(labels, neighbours, match)


def neighbour_agreement(labels: Sequence[Hashable], neighbours: np.ndarray, match: str = "exact") -> np.ndarray:
    """(N,) the mean agreement of each row's label with its neighbours' (``neighbours`` (N, k') row indices), as
    :func:`visual_reliability` counts it; 1 for every row when there are no neighbours."""
    n = len(labels)
    if neighbours.shape[1] == 0:
        return np.ones(n)
    codes, distinct = _codes(labels)  # each distinct label once
    if match == "overlap":
        return _pair_jaccard(_multi_hot(distinct), codes, neighbours).mean(1)
    same = codes[neighbours] == codes[:, None]  # (N, k')
    return same.sum(1) / neighbours.shape[1]


def prediction_reliability(
    labels: Sequence[Hashable], predictions: Sequence[Hashable], match: str = "exact"
) -> np.ndarray:
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
    code_y, _ = _codes(labels)
    code_p, distinct_p = _codes(predictions)
    _, pair, both = np.unique(code_y * len(distinct_p) + code_p, return_inverse=True, return_counts=True)
    inter = both[pair]  # (N,) rows with n's label and n's prediction: counts per value, never N × N
    return inter / (np.bincount(code_y)[code_y] + np.bincount(code_p)[code_p] - inter)


def expected_agreement(
    labels: Sequence[Hashable], groups: Sequence[Hashable] | None = None, match: str = "exact"
) -> np.ndarray:
    """e_n: the agreement n's label has by chance with another sample of its group (the chance level of s_v).

    The mean agreement (1/0 set equality, or Jaccard overlap with ``match="overlap"``) of n's label with the
    labels of the other samples of n's group (e.g. its category, whose K visual neighbours mostly share it;
    ``groups=None``: one group). A label the whole group repeats, such as a category's default value,
    agrees with any neighbour, so agreement with the neighbours says little about it.
    A sample alone in its group gets e_n = 0. Counted per distinct label of a group, never N × N.
    """
    n = len(labels)
    if groups is not None and len(groups) != n:
        raise ValueError("labels and groups differ in length")
    out = np.zeros(n)
    for rows in _members(n, groups):
        m = len(rows)
        if m < 2:
            continue
        codes, distinct = _codes([labels[i] for i in rows])
        if match == "overlap":
            total = _jaccard_sums(codes, distinct) - 1.0  # (m,) every other member, itself excluded
        else:
            total = (np.bincount(codes)[codes] - 1).astype(float)
        out[rows] = total / (m - 1)
    return out


def expected_prediction_agreement(
    labels: Sequence[Hashable], predictions: Sequence[Hashable], match: str = "exact"
) -> np.ndarray:
    """The chance level of s_p: |Y_n ∩ Ŷ_n| / |Y_n ∪ Ŷ_n| if predictions were independent of labels.

    With N samples the expected intersection is |Y_n|·|Ŷ_n| / N; with ``match="overlap"`` the
    cardinalities are those of the fuzzy sets of :func:`prediction_reliability`.
    """
    n = len(labels)
    if n != len(predictions):
        raise ValueError("labels and predictions differ in length")
    code_y, distinct_y = _codes(labels)
    code_p, distinct_p = _codes(predictions)
    if match == "overlap":
        size_y, size_p = _jaccard_sums(code_y, distinct_y), _jaccard_sums(code_p, distinct_p)
    else:
        size_y = np.bincount(code_y)[code_y].astype(float)
        size_p = np.bincount(code_p)[code_p].astype(float)
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


def _value_set(label: Hashable) -> Iterable[Hashable]:
    """A label compared by Jaccard overlap as the set of its values."""
    if not isinstance(label, Iterable):
        raise TypeError(f"match='jaccard' compares value sets, but a label is {label!r}")
    return label


def _multi_hot(sets: Sequence[Hashable]) -> np.ndarray:
    """(N, V) 0/1 matrix of value sets (each label an iterable of values)."""
    vocab: dict[Hashable, int] = {}
    rows = [[vocab.setdefault(v, len(vocab)) for v in _value_set(values)] for values in sets]
    hot = np.zeros((len(rows), max(len(vocab), 1)))
    for i, cols in enumerate(rows):
        hot[i, cols] = 1.0
    return hot


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard overlap (A, B) of multi-hot rows; two empty sets overlap fully."""
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _codes(keys: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """(N,) the code of each key (its index among the distinct keys, in order of first appearance), and the
    distinct keys: the value index through which agreements are counted."""
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(key, len(index)) for key in keys), dtype=np.int64, count=len(keys))
    return codes, list(index)


def _pair_jaccard(
    hot: np.ndarray, codes: np.ndarray, neighbours: np.ndarray, chunk: int = 65536, table_max: int = 2048
) -> np.ndarray:
    """(N, k') Jaccard overlap of each row's value set with each of its neighbours' (``hot``: (U, V) multi-hot of
    the distinct sets, ``codes`` (N,) each row's set). Through a (U, U) table of the distinct sets while U is
    small, else computed per pair ``chunk`` rows at a time."""
    if len(hot) <= table_max:
        return _jaccard(hot, hot)[codes[:, None], codes[neighbours]]
    out = np.empty(neighbours.shape)
    for start in range(0, len(codes), chunk):
        a = hot[codes[start : start + chunk]]  # (c, V)
        b = hot[codes[neighbours[start : start + chunk]]]  # (c, k', V)
        inter = np.einsum("nv,nkv->nk", a, b)
        union = a.sum(1)[:, None] + b.sum(2) - inter
        out[start : start + chunk] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return out


def _jaccard_sums(codes: np.ndarray, distinct: Sequence[Hashable], chunk: int = 1024) -> np.ndarray:
    """(N,) Σ_j Jaccard(set n, set j) over all rows j (itself included): one sum per distinct set, weighted by how
    many rows carry each, in (chunk, U) blocks; O(U²) work for U distinct sets, whatever N."""
    hot = _multi_hot(distinct)  # (U, V)
    count = np.bincount(codes, minlength=len(distinct)).astype(float)  # (U,)
    sums = np.concatenate([_jaccard(hot[start : start + chunk], hot) @ count for start in range(0, len(hot), chunk)])
    return sums[codes]


def _fuzzy_prediction_reliability(
    labels: Sequence[Hashable], predictions: Sequence[Hashable], chunk: int = 1024
) -> np.ndarray:
    """Σ_j min(J(y_n, y_j), J(ŷ_n, ŷ_j)) / Σ_j max(...) (Eq. 13–14 with fuzzy sets), one value per distinct
    (label, prediction) pair, each other pair weighted by its count: O(P²) for P distinct pairs, whatever N."""
    code_y, distinct_y = _codes(labels)
    code_p, distinct_p = _codes(predictions)
    pairs, pair_of, count = np.unique(code_y * len(distinct_p) + code_p, return_inverse=True, return_counts=True)
    pair_y, pair_p = pairs // len(distinct_p), pairs % len(distinct_p)  # (P,) each pair's label and prediction
    hot_y, hot_p = _multi_hot(distinct_y), _multi_hot(distinct_p)
    count = count.astype(float)
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):  # (chunk, P) blocks bound the memory
        a = _jaccard(hot_y[pair_y[start : start + chunk]], hot_y)[:, pair_y]  # membership of pair j's rows in Y_n
        b = _jaccard(hot_p[pair_p[start : start + chunk]], hot_p)[:, pair_p]  # ... in Ŷ_n
        out[start : start + chunk] = (np.minimum(a, b) @ count) / (np.maximum(a, b) @ count)
    return out[pair_of.reshape(-1)]
