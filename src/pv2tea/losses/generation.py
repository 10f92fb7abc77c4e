"""S3-weighted generation loss L_r-mlm (paper Eq. 9), its distillation toward a teacher, and the category loss
L_ct (Eq. 7)."""

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


def per_sample_token_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ model) of each sequence over the positions that predict a label token, shape (B,).

    logits, teacher_logits: (B, T, V), both read under the same teacher-forced prefix; labels: (B, T) with -100 =
    ignore, aligned as in :func:`per_sample_token_ce` (position t predicts label t+1). Word-level knowledge
    distillation (Kim & Rush 2016): the model is pulled toward the teacher's whole next-token distribution, not only
    its top token, so what the teacher thinks of the other values carries over too.
    """
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the model's {tuple(logits.shape)}")
    b, t, v = logits.shape
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100  # (B, T): positions that predict a label token
    log_p = F.log_softmax(logits[valid].float(), dim=-1)  # (N, V)
    log_q = F.log_softmax(teacher_logits[valid].float(), dim=-1)  # (N, V)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # (N,)
    per_row = logits.new_zeros(b, dtype=torch.float32).index_add_(0, valid.nonzero()[:, 0], kl)  # (B,)
    return (per_row / valid.sum(1).clamp_min(1)).to(logits.dtype)


def soft_target_ce(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against a distribution over the classes, shape (B,).

    log_probs: (B, V) the model's log-probabilities; targets: (B, V) non-negative, each row summing to 1 (a multi-value
    label spread evenly over its values, or a mixture with a teacher's distribution). Masked classes (log-probability
    at the dtype's minimum) are clamped so that a zero target there adds 0, never 0 · −inf.
    """
    return -(targets * log_probs.clamp_min(-1e4)).sum(1)


def distill_class_targets(
    targets: torch.Tensor, teacher_log_probs: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the label targets (B, V) with a teacher's class distribution: (1 − w) · label + w · teacher.

    teacher_log_probs: (B, V) over the same classes, −inf where the teacher gives a class nothing; a row where it
    gives every class nothing (an attribute or values it never saw) keeps its label alone. Returns the mixed targets
    (B, V) and which rows the teacher covers (B,) bool. Soft-target cross-entropy on
    the mixture is (1 − w) · CE(label) + w · KL(teacher ‖ model) + a constant: class-level knowledge distillation.
    """
    if teacher_log_probs.shape != targets.shape:
        raise ValueError(
            f"teacher classes {tuple(teacher_log_probs.shape)} do not match the model's {tuple(targets.shape)}"
        )
    teacher = teacher_log_probs.float().exp().to(targets.dtype)  # (B, V)
    covered = teacher.sum(1) > 0  # (B,)
    mixed = torch.where(covered[:, None], (1 - weight) * targets + weight * teacher, targets)
    return mixed, covered


def per_sample_class_kl(log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ model) over the classes of each row, shape (B,); 0 for a row the teacher covers nowhere."""
    teacher = teacher_log_probs.float().exp()  # (B, V)
    gap = torch.where(teacher > 0, teacher_log_probs.float() - log_probs.float().clamp_min(-1e4), 0.0)  # (B, V)
    return (teacher * gap).sum(1).to(log_probs.dtype)


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
