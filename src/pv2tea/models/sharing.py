"""Encode each distinct input of a batch once: the rows of one product (one row per attribute) share their text and
their images, so the text encoder and the visual head run on the distinct ones and the result is expanded back to
rows. Gradients flow through the expansion (a duplicated row's gradient adds to its one encoding)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def distinct_rows(*keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first row of each distinct key (U,) and each row's distinct index (B,), or None when every row is
    distinct (nothing to share). ``keys`` are per row along their first dimension and compared whole."""
    n = keys[0].shape[0]
    if n < 2:
        return None
    flat = torch.cat([k.reshape(n, -1).to(torch.float64) for k in keys], 1)  # (B, D): exact for ids and float32
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)  # (B,) in sorted order of the keys
    u = int(inverse.max()) + 1
    if u == n:
        return None
    # the first row of each distinct key, the distinct keys numbered in order of first appearance
    first = torch.full((u,), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
    order = torch.argsort(first)  # distinct index by first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u)
    return first[order], rank[inverse]


def take(value: T, rows: torch.Tensor) -> T:
    """``value`` at ``rows``: a tensor indexed along its first dimension, or a dataclass whose tensor fields are."""
    if isinstance(value, torch.Tensor):
        return value[rows]  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **{k: v[rows] for k, v in fields.items() if isinstance(v, torch.Tensor)})
    raise TypeError(f"cannot take rows of {type(value).__name__}")


def shared(fn: Callable[[torch.Tensor], T], keys: tuple[torch.Tensor, ...], enabled: bool = True) -> T:
    """``fn(rows)`` for all rows (``rows``: a (B,) index tensor; the result per row along its first dimension, or a
    dataclass of such tensors), computed on the distinct rows of ``keys`` only when ``enabled`` and some rows
    repeat."""
    n = keys[0].shape[0]
    found = distinct_rows(*keys) if enabled else None
    if found is None:
        return fn(torch.arange(n, device=keys[0].device))
    first, inverse = found
    return take(fn(first.to(keys[0].device)), inverse.to(keys[0].device))
