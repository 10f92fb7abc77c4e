"""Evaluation for PV2TEA: synonym-normalized matching, macro P/R/F1, source-aware reports."""

from pv2tea.eval.metrics import (
    GAP_METRICS,
    SOURCES,
    Example,
    Scores,
    harmonic_f1,
    is_correct,
    score,
    source_aware_report,
)
from pv2tea.eval.normalize import (
    SynonymFileError,
    canonical_synonyms,
    load_synonyms,
    normalize_value,
    normalize_values,
    normalize_with,
    split_answer,
)
from pv2tea.eval.report import compare_table, format_report_table, write_report

__all__ = [
    "GAP_METRICS",
    "SOURCES",
    "Example",
    "Scores",
    "SynonymFileError",
    "canonical_synonyms",
    "compare_table",
    "format_report_table",
    "harmonic_f1",
    "is_correct",
    "load_synonyms",
    "normalize_value",
    "normalize_values",
    "normalize_with",
    "score",
    "source_aware_report",
    "split_answer",
    "write_report",
]
