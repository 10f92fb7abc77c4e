"""Which rows are "the same product". A dataset file has a row per (product, attribute) and no product id, so the
product is read from the rows, by one of two keys, each for its own job:

- :func:`product_key` (the rows' content: all their images and their text): rows that show the model the same
  product. S1's positive pairs (``RecordDataset.pair_ids``), product batches (``train.product_batches``), the count
  of products that caps the momentum queue, and the distinct products of the retrieval study. The text-only rows of
  one product (its attributes, same text, no image) are one product too.
- :func:`split_key` (the first image, else the row id): what cross-validation folds
  (:func:`pv2tea.data.folds.product_folds`) and benchmark splits (``pv2tea.bench.catalog``, which reads the same key
  relative to the photo folder) keep on one side. A text-only row is a product of its own, and rows whose text
  differs but whose photo is the same stay together, so no photo is both trained and tested on.

The two are kept apart because fold assignments and benchmark splits are drawn from the split key: finished
benchmark runs resume fold by fold, and tests pin the assignments, so the split key cannot become the content key
(nor the other way round: text-only rows of a product would stop sharing their S1 pair and product batch).
"""

from __future__ import annotations

from pv2tea.data.schema import Record

__all__ = ["product_key", "split_key"]


def product_key(record: Record) -> tuple[tuple[str, ...], str]:
    """The row's product as the model sees it: its images and its text (same images and text, same product)."""
    return record.images, record.text


def split_key(record: Record) -> str:
    """The row's product for folds and splits: its first image, or the row id for a row without one."""
    return record.images[0] if record.images else record.id
