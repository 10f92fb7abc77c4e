"""S3-weighted generation loss L_r-mlm (paper Eq. 9) and the category loss L_ct (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_token_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence: g(y_n, ŷ_n), shape (B,).

    logits: (B, T, V) predicting position t+1 from prefix ≤ t; labels: (B, T) with -100 = ignore. The targets are
    moved one step left instead of the logits (the last position has none), so the (B, T, V) logits are read in
    place as (B·T, V): slicing and transposing them cost copies as large as the loss itself.
    """
    b, t, v = logits.shape
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # (B, T): the label position t predicts
    ce = F.cross_entropy(
        logits.reshape(b * t, v),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(b, t)  # (B, T)
    counts = (targets != -100).sum(1).clamp_min(1)
    return ce.sum(1) / counts


def weighted_generation_loss(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """L_r-mlm = (1/N) Σ s(X_n)·g(y_n, ŷ_n); plain mean when no weights."""
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample.dtype) * per_sample).mean()


def category_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_ct: cross-entropy of the visual category classifier (Eq. 7); 0 for an empty batch."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets)
