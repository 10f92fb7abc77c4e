"""Cross-validation folds that keep a product's rows together (the ImplicitAVE protocol's folds, and the
out-of-fold soft labels of ``pv2tea weak-label --soft-train``)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pv2tea.data.products import split_key
from pv2tea.data.schema import Record

__all__ = ["product_folds"]


def product_folds(records: Sequence[Record], k: int, seed: int = 0) -> list[list[int]]:
    """Row indices of k folds; all rows of one product (same first image, or same id:
    :func:`pv2tea.data.products.split_key`) fall in the same fold."""
    keys = list(dict.fromkeys(split_key(r) for r in records))
    random.Random(seed).shuffle(keys)
    fold_of = {key: i % k for i, key in enumerate(keys)}
    folds: list[list[int]] = [[] for _ in range(k)]
    for i, r in enumerate(records):
        folds[fold_of[split_key(r)]].append(i)
    return folds
