"""The registry of text-extractor kinds: ``kind`` (as written in ``extractor.json``) -> class, and
:func:`load_extractor`, which reads a saved folder of any kind.

It sits above the kinds (:mod:`~pv2tea.baselines.tfidf`, :mod:`~pv2tea.baselines.transformer`), which sit above the
interface (:mod:`~pv2tea.baselines.extractor`) and the folder format (:mod:`~pv2tea.baselines.storage`); no module
below imports it. A new kind is added here.
"""

from __future__ import annotations

from os import PathLike

from pv2tea.baselines.extractor import TextExtractor
from pv2tea.baselines.storage import read_metadata
from pv2tea.baselines.tfidf import TfidfTextExtractor
from pv2tea.baselines.transformer import TransformerTextExtractor

#: Every kind of text extractor, by the ``kind`` its saved folder records.
EXTRACTOR_KINDS: dict[str, type[TextExtractor]] = {
    TransformerTextExtractor.kind: TransformerTextExtractor,
    TfidfTextExtractor.kind: TfidfTextExtractor,
}


def load_extractor(directory: str | PathLike[str]) -> TextExtractor:
    """Load a saved extractor of any kind, chosen by the ``kind`` in its ``extractor.json``.

    Args:
        directory: A folder written by :meth:`TextExtractor.save <pv2tea.baselines.extractor.TextExtractor.save>`.

    Returns:
        The fitted extractor, ready to ``predict``.

    Raises:
        FileNotFoundError: The folder holds no ``extractor.json``.
        ValueError: Its format version or kind is unknown.
    """
    kind = read_metadata(directory).get("kind")
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"{directory}: unknown extractor kind {kind!r} (known: {sorted(EXTRACTOR_KINDS)})")
    return EXTRACTOR_KINDS[kind].load(directory)
