"""Summaries of repeated runs: mean ± std of report scores over seeds or folds, paired t-tests, markdown tables.

The pieces ``pv2tea experiment`` (runs over seeds, :func:`pv2tea.experiment.summarize`) and the benchmarks (runs over
folds × seeds, :func:`pv2tea.bench.protocol.summarize_runs`) build their summaries and tables from. A run is a test
report of :func:`pv2tea.eval.metrics.source_aware_report` (or any nested dict of the same shape).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

METRICS = ("precision", "recall", "f1", "accuracy")
SOURCES = ("text", "image")  # where a gold value is found: what the report's ``by_source`` splits by


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None; both None without any."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}


def paired_ttest(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, float | None]:
    """Two-sided paired t-test; null when it is undefined (fewer than 2 pairs, no variance)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 2:
        return {"t": None, "p": None, "n": len(pairs)}
    x, y = np.array(pairs).T
    if np.allclose(x - y, (x - y)[0]):
        return {"t": None, "p": None, "n": len(pairs)}
    result = stats.ttest_rel(x, y)
    t, p = float(result.statistic), float(result.pvalue)
    return {"t": t if math.isfinite(t) else None, "p": p if math.isfinite(p) else None, "n": len(pairs)}


def value_at(report: Mapping[str, Any], *path: str) -> Any:
    """The value under the keys ``path`` of a nested report; None where one is missing."""
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def stat_over(runs: Sequence[Mapping[str, Any]], *path: str) -> dict[str, float | None]:
    """Mean ± std over the runs of the value under ``path`` (runs without it left out)."""
    return mean_std([value_at(r, *path) for r in runs])


def metric_stats(
    runs: Sequence[Mapping[str, Any]], *path: str, metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, float | None]]:
    """``{metric: mean ± std}`` over the runs of the scores under ``path`` (e.g. ``"overall"``)."""
    return {m: stat_over(runs, *path, m) for m in metrics}


def attribute_stats(
    runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("f1",), sources: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per attribute of any run's ``by_attribute`` (sorted): mean ± std of its overall ``metrics``, and for each of
    ``sources`` the mean ± std of its F1 on that source's rows (``f1_<source>``) and the mean number of those rows
    (``n_<source>``: a source mean over a handful of rows says little). Runs without the attribute are left out."""
    attrs = sorted({a for r in runs for a in r.get("by_attribute", {})})
    return {
        a: {
            **{m: stat_over(runs, "by_attribute", a, "overall", m) for m in metrics},
            **{f"f1_{s}": stat_over(runs, "by_attribute", a, "by_source", s, "f1") for s in sources},
            **{f"n_{s}": stat_over(runs, "by_attribute", a, "by_source", s, "n")["mean"] for s in sources},
        }
        for a in attrs
    }


def add_ttests(
    summaries: Mapping[str, dict[str, Any]],
    scores: Mapping[str, Sequence[float | None]],
    references: Sequence[str],
    against_itself: bool = False,
) -> None:
    """In place: ``summaries[name]["ttest_vs_<ref>"]`` for every name of ``scores`` and every reference in it, the
    paired t-test of the reference's scores against the name's (paired by position: a seed, a fold). A reference
    gets a test against itself (always undefined) only with ``against_itself``."""
    for ref in references:
        if ref not in scores:
            continue
        for name, values in scores.items():
            if name != ref or against_itself:
                summaries[name][f"ttest_vs_{ref}"] = paired_ttest(scores[ref], values)


def fmt_stat(stat: Mapping[str, float | None], digits: int = 2) -> str:
    """A mean ± std cell, ``–`` without a value."""
    return "–" if stat["mean"] is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def fmt_p(test: Mapping[str, Any] | None) -> str:
    """The p value of a :func:`paired_ttest` (3 significant digits), ``–`` when there is none."""
    return "–" if not test or test.get("p") is None else f"{test['p']:.3g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
