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
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class ProbeFit:
    reliability: np.ndarray  # (N,) mean out-of-fold probe probability of each row's values
    prior: np.ndarray  # (N,) the same under the other folds' value frequencies (what a featureless probe says)

    @property
    def gain(self) -> float:
        """Mean log-likelihood ratio of the rows' labels, probe over frequencies (nats per row); > 0 when the
        features explain the labels better than their frequencies do."""
        eps = 1e-6
        return float(np.mean(np.log(self.reliability + eps) - np.log(self.prior + eps)))


def probe_reliability(features: np.ndarray, labels: Sequence[Sequence[Hashable]], folds: int = 5, seed: int = 0,
                      strength: float = 0.5) -> np.ndarray:
    """(N,) mean out-of-fold probability of each row's values under one-vs-rest logistic probes
    (``cross_fitted_probe``)."""
    return cross_fitted_probe(features, labels, folds, seed, strength).reliability


def cross_fitted_probe(features: np.ndarray, labels: Sequence[Sequence[Hashable]], folds: int = 5, seed: int = 0,
                       strength: float = 0.5) -> ProbeFit:
    """Out-of-fold probabilities of each row's values, under one-vs-rest logistic probes and under frequencies.

    features (N, C); labels: each row's values (a set; a row without any gets 1, nothing to judge). ``folds``
    splits (capped at N); each value's probe is an L2-regularized logistic regression (inverse strength
    ``strength``) on standardized features of the other folds. A value none of the other folds carries gets
    probability 0 there. With fewer than two rows there is nothing to cross-fit: every row gets 1 (no evidence
    against its label).
    """
    n = len(labels)
    if n != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {n} labels")
    if n < 2:
        return ProbeFit(np.ones(n), np.ones(n))
    return _out_of_fold(features, labels, folds, seed, strength)


def _out_of_fold(features: np.ndarray, labels: Sequence[Sequence[Hashable]], folds: int, seed: int,
                 strength: float) -> ProbeFit:
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
