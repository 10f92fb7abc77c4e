"""S3's visual level estimated by a cross-fitted linear probe instead of K nearest neighbours (not in the paper).

Eq. 12 asks how well a row's label agrees with what images like it are labelled. The K-nearest-neighbour vote
answers that with every feature dimension weighted alike, so on features where most dimensions describe shape
and background it hears little of the one property asked for: on the demo catalog a colour label's 10 visual
neighbours share its gold colours about a third of the time, and the KNN weight of right and wrong colour labels
is nearly the same. A linear classifier learns which dimensions matter for the attribute from the weak labels
themselves. Trained on the other folds' rows and applied to the held-out fold (cross-fitting), it never sees a
row's own label, so a wrong label that the probe cannot explain from the image gets a low probability instead
of being memorized.

``probe_reliability`` returns, per row, the probe's mean probability of the row's values: in [0, 1] like
s_v, and compared with chance by the caller the same way (``schemes.nr_chance``). ``cross_fitted_probe`` also
returns the same probability under the other folds' value frequencies, so the caller can tell whether the
features explain the labels at all: on ImplicitAVE's clothing attributes (sleeve style, neckline, ...) the
colour-bearing channels do not, and the probe then weighed wrong labels above right ones.

Scale: while each fold's training part has at most ``fit_rows`` rows (``schemes.probe_fit_rows``), every value's
probe is an exact scikit-learn fit on all of them. Above it, each fold fits all values' probes jointly (one L-BFGS
run over the same separable objective) on a seeded subsample of ``fit_rows`` rows and scores every held-out row
in chunks, so fitting costs the same at any N and memory holds no (N, values) matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

PROBE_FIT_ROWS = 50_000  # schemes.probe_fit_rows


@dataclass(frozen=True)
class ProbeFit:
    """What the cross-fitted probe says of each row's label, and the same from the label frequencies alone."""

    reliability: np.ndarray  # (N,) mean out-of-fold probe probability of each row's values
    prior: np.ndarray  # (N,) the same under the other folds' value frequencies (what a featureless probe says)

    @property
    def gain(self) -> float:
        """Mean log-likelihood ratio of the rows' labels, probe over frequencies (nats per row); > 0 when the
        features explain the labels better than their frequencies do."""
        eps = 1e-6
        return float(np.mean(np.log(self.reliability + eps) - np.log(self.prior + eps)))


def probe_reliability(
    features: np.ndarray,
    labels: Sequence[Collection[Hashable]],
    folds: int = 5,
    seed: int = 0,
    strength: float = 0.5,
    fit_rows: int = PROBE_FIT_ROWS,
) -> np.ndarray:
    """(N,) mean out-of-fold probability of each row's values under one-vs-rest logistic probes
    (``cross_fitted_probe``)."""
    return cross_fitted_probe(features, labels, folds, seed, strength, fit_rows).reliability


def cross_fitted_probe(
    features: np.ndarray,
    labels: Sequence[Collection[Hashable]],
    folds: int = 5,
    seed: int = 0,
    strength: float = 0.5,
    fit_rows: int = PROBE_FIT_ROWS,
) -> ProbeFit:
    """Out-of-fold probabilities of each row's values, under one-vs-rest logistic probes and under frequencies.

    features (N, C); labels: each row's values (a set; a row without any gets 1, nothing to judge). ``folds``
    splits (capped at N); each value's probe is an L2-regularized logistic regression (inverse strength
    ``strength``) on standardized features of the other folds. A value none of the other folds carries gets
    probability 0 there. With fewer than two rows there is nothing to cross-fit: every row gets 1 (no evidence
    against its label). A fold whose training part exceeds ``fit_rows`` rows fits on a seeded subsample of that
    many (see the module's docstring).
    """
    n = len(labels)
    if n != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {n} labels")
    if n < 2:
        return ProbeFit(np.ones(n), np.ones(n))
    if n - n // min(folds, n) <= fit_rows:  # the largest fold's training part: exact fits on all of it
        return _out_of_fold(features, labels, folds, seed, strength)
    return _out_of_fold_subsampled(features, labels, folds, seed, strength, fit_rows)


def _out_of_fold(
    features: np.ndarray, labels: Sequence[Collection[Hashable]], folds: int, seed: int, strength: float
) -> ProbeFit:
    n = len(labels)
    vocab = sorted({v for values in labels for v in values}, key=str)
    column = {v: j for j, v in enumerate(vocab)}
    hot = np.zeros((n, len(vocab)), dtype=bool)  # (N, V)
    for i, values in enumerate(labels):
        hot[i, [column[v] for v in values]] = True
    prob = np.zeros((n, len(vocab)))  # (N, V) out-of-fold probabilities
    freq = np.zeros((n, len(vocab)))  # (N, V) out-of-fold value frequencies
    splitter = KFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    for train, held in splitter.split(features):
        scaler = StandardScaler().fit(features[train])
        x_train, x_held = scaler.transform(features[train]), scaler.transform(features[held])
        freq[held] = hot[train].mean(0)
        for j in range(len(vocab)):
            y = hot[train, j]
            if y.all() or not y.any():  # one class only in these folds: its rate is the answer
                prob[held, j] = float(y.all())
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=strength, max_iter=500).fit(x_train, y)
            prob[held, j] = clf.predict_proba(x_held)[:, 1]

    def of_labels(p: np.ndarray) -> np.ndarray:  # (N,) mean over each row's values; no value: no evidence
        return np.array([p[i, hot[i]].mean() if hot[i].any() else 1.0 for i in range(n)])

    return ProbeFit(of_labels(prob), of_labels(freq))


def _out_of_fold_subsampled(
    features: np.ndarray,
    labels: Sequence[Collection[Hashable]],
    folds: int,
    seed: int,
    strength: float,
    fit_rows: int,
    chunk: int = 16_384,
) -> ProbeFit:
    n = len(labels)
    vocab = sorted({v for values in labels for v in values}, key=str)
    column = {v: j for j, v in enumerate(vocab)}
    counts = np.fromiter((len(values) for values in labels), dtype=np.int64, count=n)
    starts = np.concatenate([[0], np.cumsum(counts)])  # row i's values are cols[starts[i]:starts[i + 1]]
    cols = np.fromiter((column[v] for values in labels for v in values), dtype=np.int64, count=int(starts[-1]))
    row_of = np.repeat(np.arange(n), counts)  # (nnz,) the row of each (row, value) entry
    reliability, prior = np.ones(n), np.ones(n)  # rows without values keep 1: no evidence
    rng = np.random.default_rng(seed)
    splitter = KFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    for train, held in splitter.split(np.empty((n, 1))):
        fit = np.sort(rng.choice(train, size=min(fit_rows, len(train)), replace=False))
        in_train = np.zeros(n, dtype=bool)
        in_train[train] = True
        freq = np.bincount(cols[in_train[row_of]], minlength=len(vocab)) / len(train)  # (V,) value frequencies
        x_fit = np.asarray(features[fit], dtype=np.float32)
        mean, std = x_fit.mean(0), x_fit.std(0)
        std[std == 0] = 1.0  # as StandardScaler leaves a constant feature
        x_fit = (x_fit - mean) / std  # (m, C)
        y = np.zeros((len(fit), len(vocab)), dtype=np.float32)  # (m, V) the subsample's values
        position = np.full(n, -1)
        position[fit] = np.arange(len(fit))
        picked = position[row_of] >= 0
        y[position[row_of[picked]], cols[picked]] = 1.0
        weight, bias, constant = _joint_logistic(x_fit, y, strength)
        for start in range(0, len(held), chunk):  # score every held-out row, a chunk at a time
            rows = held[start : start + chunk]
            prob = expit((np.asarray(features[rows], dtype=np.float32) - mean) / std @ weight + bias)  # (c, V)
            prob[:, constant >= 0] = constant[constant >= 0]  # one class only in the subsample: its rate
            lens = counts[rows]  # (c,) values per row
            local = np.repeat(np.arange(len(rows)), lens)  # (e,) the chunk row of each of their entries
            entry = np.repeat(starts[rows], lens) + np.arange(len(local)) - np.repeat(np.cumsum(lens) - lens, lens)
            has = lens > 0
            reliability[rows[has]] = (np.bincount(local, prob[local, cols[entry]], len(rows)) / np.maximum(lens, 1))[
                has
            ]
            prior[rows[has]] = (np.bincount(local, freq[cols[entry]], len(rows)) / np.maximum(lens, 1))[has]
    return ProbeFit(reliability, prior)


def _joint_logistic(
    x: np.ndarray, y: np.ndarray, strength: float, max_iter: int = 500
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest L2 logistic regressions for every column of ``y`` (m, V) on ``x`` (m, C), fitted together.

    The objective is scikit-learn's per column (C·Σ log-loss + ½|w|², the intercept not penalized) summed over
    the columns, divided by C·m; the columns do not interact, so one L-BFGS run fits them all. Returns weights
    (C, V), intercepts (V,) and, per column, its constant probability where the column has one class only (else −1;
    those columns are not fitted).
    """
    m, c = x.shape
    rate = y.mean(0)
    constant = np.where((rate == 0) | (rate == 1), rate, -1.0)
    fitted = constant < 0
    yf = y[:, fitted]
    v = int(fitted.sum())
    weight, bias = np.zeros((c, y.shape[1]), dtype=np.float32), np.zeros(y.shape[1], dtype=np.float32)
    if v == 0:
        return weight, bias, constant

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: c * v].reshape(c, v).astype(np.float32)
        b = theta[c * v :].astype(np.float32)
        z = x @ w + b  # (m, v)
        loss = float(np.sum(np.logaddexp(0.0, z) - yf * z, dtype=np.float64)) / m
        loss += float(np.sum(theta[: c * v] ** 2)) / (2 * strength * m)
        residual = (expit(z) - yf) / m  # (m, v)
        grad_w = (x.T @ residual).astype(np.float64).ravel() + theta[: c * v] / (strength * m)
        return loss, np.concatenate([grad_w, residual.sum(0, dtype=np.float64)])

    found = minimize(
        loss_grad, np.zeros(c * v + v), jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": 1e-6}
    )
    weight[:, fitted] = found.x[: c * v].reshape(c, v)
    bias[fitted] = found.x[c * v :]
    return weight, bias, constant
