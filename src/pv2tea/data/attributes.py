"""What the rows say about their attributes, read once for training, scoring and the CLI."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pv2tea.data.schema import Record

__all__ = ["multi_value_attributes"]


def multi_value_attributes(records: Iterable[Record], known: Mapping[str, bool] | None = None) -> dict[str, bool]:
    """Attribute -> whether it is multi-value: some row labels it, or gives it as gold, with several values.

    ``known`` (e.g. what a checkpoint saved) is the start: an attribute it marks multi-value stays so, and rows read
    in chunks are folded in by passing the previous result.
    """
    out: dict[str, bool] = dict(known or {})
    for r in records:
        several = len(r.label) > 1 or (r.gold is not None and len(r.gold) > 1)
        out[r.attribute] = out.get(r.attribute, False) or several
    return out
