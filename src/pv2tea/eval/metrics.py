"""Precision / recall / F1 and the source-aware report of PV2TEA (ACL Findings 2023).

Evaluation protocol (paper §4.2, Tables 2, 3 and 8), on synonym-normalized value sets
``G`` (gold) and ``P`` (prediction) of one example:

* single-value attribute: correct iff ``P == G``;
* multi-value attribute: correct iff ``G ⊆ P`` (every gold value produced);
* an empty prediction is never correct.

Scores are macro-aggregated over gold values: every example joins the group of each of its
normalized gold values, keyed by ``(attribute, value)`` so that equal strings of different
attributes stay apart. For a group ``v`` with ``n_v`` examples, ``pred_v`` non-empty
predictions and ``correct_v`` correct ones, ``P_v = correct_v / pred_v`` (0 if ``pred_v`` is
0) and ``R_v = correct_v / n_v``. Macro precision and recall are the means over groups and
F1 is their harmonic mean, as in the paper's tables (P 82.46, R 75.40 -> F1 78.77). An
empty prediction thus lowers recall but not precision. ``accuracy`` is the micro fraction
of correct examples. All metrics are percentages in [0, 100].

Metrics over zero examples are undefined: they are ``None`` (``null`` in JSON), never NaN,
so reports always pass ``json.dumps(..., allow_nan=False)``.

The source-aware report splits examples by where the gold value can be found: ``"text"``
(contained in the text) or ``"image"`` (absent from the text, must be read from the image),
and reports the text - image GAP (paper Table 3, lower is better).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any

from pv2tea.eval.normalize import canonical_synonyms, normalize_with

__all__ = [
    "GAP_METRICS",
    "SOURCES",
    "Example",
    "Scores",
    "confidence_reliability",
    "departures",
    "harmonic_f1",
    "merge_departures",
    "is_correct",
    "score",
    "source_aware_report",
]

#: Gold value sources of the fine-grained evaluation, in report order.
SOURCES: tuple[str, ...] = ("text", "image")
#: Metrics whose text - image difference forms the GAP row.
GAP_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")


@dataclass(frozen=True)
class Example:
    """One scored (item, attribute) pair.

    Attributes:
        gold: gold value strings (raw; normalized at scoring time); at least one.
        pred: predicted value strings (raw); empty when the model produced nothing.
        source: where the gold value is found: ``"text"``, ``"image"`` or ``None`` (unknown).
        attribute: attribute name, e.g. ``"color"``.
        multi_value: whether the attribute admits several values (e.g. Color).
    """

    gold: tuple[str, ...]
    pred: tuple[str, ...]
    source: str | None
    attribute: str
    multi_value: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "gold", tuple(self.gold))
        object.__setattr__(self, "pred", tuple(self.pred))
        if not self.gold:
            raise ValueError(f"example of attribute {self.attribute!r} has no gold value")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES} or None, got {self.source!r}")


@dataclass(frozen=True)
class Scores:
    """Aggregate scores of a set of examples; metrics in percent, ``None`` when ``n == 0``.

    Attributes:
        precision: macro precision over gold values.
        recall: macro recall over gold values.
        f1: harmonic mean of ``precision`` and ``recall``.
        accuracy: micro fraction of correct examples.
        n: number of examples.
        n_predicted: examples with a non-empty (normalized) prediction.
        n_values: number of ``(attribute, gold value)`` groups averaged over.
    """

    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float | None
    n: int
    n_predicted: int
    n_values: int

    def to_dict(self) -> dict[str, float | int | None]:
        """Return the scores as a JSON-ready dict (field order preserved)."""
        return asdict(self)


@dataclass(frozen=True)
class _Judged:
    """An example after normalization: its group keys, whether it predicted, and correctness."""

    groups: frozenset[tuple[str, str]]
    predicted: bool
    correct: bool
    source: str | None
    attribute: str


def harmonic_f1(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall (0 when both are 0)."""
    total = precision + recall
    return 2.0 * precision * recall / total if total else 0.0


def _correct(gold: frozenset[str], pred: frozenset[str], multi_value: bool) -> bool:
    """Correctness on normalized sets (see module docstring)."""
    if not pred:
        return False
    return gold <= pred if multi_value else pred == gold


def _value_set(values: Iterable[str], canon: Mapping[str, str]) -> frozenset[str]:
    """Normalized, non-empty values under an already-canonical synonym map."""
    return frozenset(v for v in (normalize_with(value, canon) for value in values) if v)


def _judge(example: Example, canon: Mapping[str, str]) -> _Judged:
    """Normalize an example's values (with a pre-normalized synonym map) and judge it."""
    gold, pred = _value_set(example.gold, canon), _value_set(example.pred, canon)
    if not gold:
        raise ValueError(
            f"gold values {example.gold!r} of attribute {example.attribute!r} are all empty after normalization"
        )
    return _Judged(
        groups=frozenset((example.attribute, g) for g in gold),
        predicted=bool(pred),
        correct=_correct(gold, pred, example.multi_value),
        source=example.source,
        attribute=example.attribute,
    )


def is_correct(example: Example, synonyms: Mapping[str, str] | None = None) -> bool:
    """Whether one example's prediction is correct under synonym-normalized matching."""
    return _judge(example, canonical_synonyms(synonyms)).correct


def _aggregate(judged: Sequence[_Judged]) -> Scores:
    """Macro P/R over gold-value groups, their F1, and micro accuracy."""
    n = len(judged)
    n_predicted = sum(j.predicted for j in judged)
    if n == 0:
        return Scores(None, None, None, None, n=0, n_predicted=0, n_values=0)
    # group -> [n_v, pred_v, correct_v]
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for j in judged:
        for group in j.groups:
            counts[group][0] += 1
            counts[group][1] += j.predicted
            counts[group][2] += j.correct
    precision = 100.0 * fmean(c / p if p else 0.0 for _, p, c in counts.values())
    recall = 100.0 * fmean(c / n_v for n_v, _, c in counts.values())
    return Scores(
        precision=precision,
        recall=recall,
        f1=harmonic_f1(precision, recall),
        accuracy=100.0 * sum(j.correct for j in judged) / n,
        n=n,
        n_predicted=n_predicted,
        n_values=len(counts),
    )


def score(examples: Iterable[Example], synonyms: Mapping[str, str] | None = None) -> Scores:
    """Score examples; metrics are ``None`` for an empty example list."""
    canon = canonical_synonyms(synonyms)
    return _aggregate([_judge(e, canon) for e in examples])


DEPARTURE_COUNTS: tuple[str, ...] = ("n", "changed", "fixed", "broke", "neither", "both", "either_correct")


def departures(
    examples: Sequence[Example], reference: Sequence[Sequence[str]], synonyms: Mapping[str, str] | None = None
) -> dict[str, int | float | None]:
    """Where a model's answers depart from a reference's, one reference answer per example (e.g. the weak
    labels the model was trained on, which are the text extractor's answers).

    Counts over the examples: ``changed`` (the normalized value sets differ), and among those ``fixed`` (the
    model is correct, the reference is not), ``broke`` (the reference is correct, the model is not), ``neither``
    and ``both`` (both correct: a multi-value superset); ``either_correct``: examples where at least one of the
    two is correct. Derived: ``net`` = fixed − broke, the model's accuracy gain over the reference in examples;
    ``fix_rate`` = 100 · fixed / changed; ``either`` = 100 · either_correct / n, the accuracy of an oracle that
    picks the right one of the two per example (None where the denominator is 0).
    """
    if len(examples) != len(reference):
        raise ValueError(f"{len(examples)} examples but {len(reference)} reference answers")
    canon = canonical_synonyms(synonyms)
    counts = dict.fromkeys(DEPARTURE_COUNTS, 0)
    for example, ref in zip(examples, reference):
        gold = _value_set(example.gold, canon)
        pred, ref_set = _value_set(example.pred, canon), _value_set(ref, canon)
        model_ok = _correct(gold, pred, example.multi_value)
        ref_ok = _correct(gold, ref_set, example.multi_value)
        counts["n"] += 1
        counts["either_correct"] += model_ok or ref_ok
        if pred != ref_set:
            counts["changed"] += 1
            counts["both" if model_ok and ref_ok else "fixed" if model_ok else "broke" if ref_ok else "neither"] += 1
    return _departure_rates(counts)


def confidence_reliability(
    confidences: Sequence[float], correct: Sequence[bool], edges: Sequence[float] = (0.5, 0.7, 0.9, 0.95)
) -> dict[str, Any]:
    """How well a labeller's confidence tells its right answers from its wrong ones.

    ``auc``: ROC AUC of the confidence for "the answer is right" (0.5: no better than chance; None when every
    answer is right or every one wrong). ``bins``: for the confidence ranges cut at ``edges`` (the last one
    includes 1), the number of answers there and their accuracy in % (None for an empty bin).
    """
    from sklearn.metrics import roc_auc_score

    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} judgements")
    bounds = [0.0, *edges, 1.0]
    bins = []
    for low, high in zip(bounds, bounds[1:]):
        inside = [ok for c, ok in zip(confidences, correct) if low <= c < high or (high == 1.0 and c == 1.0)]
        bins.append(
            {
                "low": low,
                "high": high,
                "n": len(inside),
                "accuracy": 100.0 * sum(inside) / len(inside) if inside else None,
            }
        )
    auc = float(roc_auc_score(list(correct), list(confidences))) if 0 < sum(correct) < len(correct) else None
    return {"auc": auc, "bins": bins}


def merge_departures(blocks: Iterable[Mapping[str, Any]]) -> dict[str, int | float | None]:
    """The :func:`departures` of several example sets (folds, seeds) pooled: counts summed, rates recomputed."""
    counts = dict.fromkeys(DEPARTURE_COUNTS, 0)
    for block in blocks:
        for key in DEPARTURE_COUNTS:
            counts[key] += int(block[key])
    return _departure_rates(counts)


def _departure_rates(counts: dict[str, int]) -> dict[str, int | float | None]:
    changed, n = counts["changed"], counts["n"]
    return {
        **counts,
        "net": counts["fixed"] - counts["broke"],
        "fix_rate": 100.0 * counts["fixed"] / changed if changed else None,
        "either": 100.0 * counts["either_correct"] / n if n else None,
    }


def _gap(text: Scores, image: Scores) -> dict[str, float | None]:
    """Text minus image for each of ``GAP_METRICS``; ``None`` where either side is undefined."""
    gap: dict[str, float | None] = {}
    for metric in GAP_METRICS:
        t, i = getattr(text, metric), getattr(image, metric)
        gap[metric] = None if t is None or i is None else t - i
    return gap


def _section(judged: Sequence[_Judged]) -> dict[str, Any]:
    """The overall / by_source / gap block for one set of judged examples."""
    by_source = {s: _aggregate([j for j in judged if j.source == s]) for s in SOURCES}
    return {
        "overall": _aggregate(judged).to_dict(),
        "by_source": {s: scores.to_dict() for s, scores in by_source.items()},
        "gap": _gap(by_source["text"], by_source["image"]),
    }


def source_aware_report(examples: Iterable[Example], synonyms: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Fine-grained source-aware evaluation (paper Tables 3 and 8), as a JSON-ready dict.

    Layout (keys always present; attributes sorted by name)::

        {"overall": Scores, "by_source": {"text": Scores, "image": Scores},
         "gap": {"precision", "recall", "f1", "accuracy": text - image | None},
         "by_attribute": {attribute: {"overall", "by_source", "gap"}}}

    where each ``Scores`` is :meth:`Scores.to_dict`. Examples with ``source=None`` count in
    the ``overall`` blocks only. A source without examples has ``n == 0`` and ``None``
    metrics, and then every gap value is ``None``.

    Args:
        examples: One per scored row: gold and predicted values, the gold's source, attribute, multi-value.
        synonyms: Value -> the value it counts as (after normalization); None: none.

    Returns:
        The report, ready for ``json.dumps``.
    """
    canon = canonical_synonyms(synonyms)
    judged = [_judge(e, canon) for e in examples]
    attributes = sorted({j.attribute for j in judged})
    return {
        **_section(judged),
        "by_attribute": {a: _section([j for j in judged if j.attribute == a]) for a in attributes},
    }
