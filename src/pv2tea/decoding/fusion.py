"""Late fusion with the text-established extractor over a candidate list (product of experts).

A catalog team that trains PV2TEA on its extractor's weak labels still has that extractor at inference. When a
row has a closed candidate list, each candidate c gets

    log p_model(c | C) + w · log q_extractor(c | C)

where p_model is the model's sequence likelihood (or class probability) renormalized over the candidates C and
q_extractor the extractor's class probability renormalized over C (a candidate the extractor never saw gets a
small floor). w = 0 is the model alone; the top candidate is the answer. This generalizes ``--keep-labels``
to values the text implies but does not state (ImplicitAVE), where there is no stated label to keep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import logsumexp

from pv2tea.eval.normalize import normalize_value

PRIOR_FLOOR = 1e-4  # probability given to a candidate the extractor has no class for


def log_normalize(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities over the entries of ``scores`` (log-space, any scale)."""
    return scores - logsumexp(scores)


def prior_log_probs(
    candidates: Sequence[str], probabilities: Mapping[str, float], floor: float = PRIOR_FLOOR
) -> np.ndarray:
    """The extractor's log q(c | C) for each candidate; ``probabilities`` is keyed by normalized value."""
    q = np.array([max(float(probabilities.get(normalize_value(c), 0.0)), floor) for c in candidates])
    return np.log(q / q.sum())


def fuse_scores(
    model_scores: Sequence[float] | np.ndarray, prior: Sequence[float] | np.ndarray, weight: float = 1.0
) -> np.ndarray:
    """Fused log-scores of one row's candidates: log p_model(c | C) + weight · prior (log q(c | C))."""
    scores = np.asarray(model_scores, dtype=np.float64)
    if len(scores) != len(prior):
        raise ValueError(f"{len(scores)} model scores but {len(prior)} prior values")
    return log_normalize(scores) + weight * np.asarray(prior, dtype=np.float64)


def check_fusion(candidates: object | None, extractor: object | None) -> None:
    """Fusion re-ranks candidate lists: an extractor without them (``candidates``: the lists or where they are read
    from; None or empty: none) is a usage error."""
    if extractor is not None and not candidates:
        raise ValueError("fusing with a text extractor needs candidate lists (--candidates): it re-ranks them")


def check_weight(weight: float) -> float:
    """The extractor's weight as a float.

    Raises:
        ValueError: It is negative or not finite.
    """
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"the extractor weight must be a finite number ≥ 0, got {weight}")
    return float(weight)
