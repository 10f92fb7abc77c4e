"""Turning a PV2TEA's scores into answers: open generation, candidate ranking, late fusion with a text extractor
and its per-attribute calibration."""
