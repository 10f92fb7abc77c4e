"""Baselines of PV2TEA (ACL Findings 2023, §4.3): text-only extractors that produce weak labels.

The interface and what is done with an extractor (:mod:`~pv2tea.baselines.extractor`), its value classes
(:mod:`~pv2tea.baselines.labels`), its saved folder (:mod:`~pv2tea.baselines.storage`), the two kinds:
OpenTag_cls (:mod:`~pv2tea.baselines.transformer`) and TF-IDF (:mod:`~pv2tea.baselines.tfidf`), and the registry of
kinds that loads a saved folder of either (:mod:`~pv2tea.baselines.kinds`).
"""

from pv2tea.baselines.extractor import ExtractorConfig, TextExtractor, evaluate_extractor, soft_labelled, weak_label
from pv2tea.baselines.kinds import EXTRACTOR_KINDS, load_extractor
from pv2tea.baselines.labels import AttributeVocab, build_label_space
from pv2tea.baselines.storage import METADATA_FILE, read_metadata
from pv2tea.baselines.tfidf import TfidfExtractorConfig, TfidfTextExtractor
from pv2tea.baselines.transformer import TransformerExtractorConfig, TransformerTextExtractor

__all__ = [
    "EXTRACTOR_KINDS",
    "METADATA_FILE",
    "AttributeVocab",
    "ExtractorConfig",
    "TextExtractor",
    "TransformerExtractorConfig",
    "TfidfExtractorConfig",
    "TfidfTextExtractor",
    "TransformerTextExtractor",
    "build_label_space",
    "evaluate_extractor",
    "load_extractor",
    "read_metadata",
    "soft_labelled",
    "weak_label",
]


def __getattr__(name: str) -> object:
    """Old names, which still import (and warn once): ``TextExtractorConfig`` is ``TransformerExtractorConfig``."""
    if name == "TextExtractorConfig":
        from pv2tea.baselines import transformer

        return transformer.TextExtractorConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
