"""Baselines of PV2TEA (ACL Findings 2023, §4.3): text-only extractors that produce weak labels."""

from pv2tea.baselines.text_extractor import (
    AttributeVocab,
    TextExtractor,
    TextExtractorConfig,
    TfidfExtractorConfig,
    TfidfTextExtractor,
    TransformerTextExtractor,
    build_label_space,
    evaluate_extractor,
    load_extractor,
    weak_label,
)

__all__ = [
    "AttributeVocab",
    "TextExtractor",
    "TextExtractorConfig",
    "TfidfExtractorConfig",
    "TfidfTextExtractor",
    "TransformerTextExtractor",
    "build_label_space",
    "evaluate_extractor",
    "load_extractor",
    "weak_label",
]
