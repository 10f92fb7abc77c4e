"""S1: augmented label-smoothed contrastive loss L_sc (paper §3.1, Eq. 2–6).

Pure function: the caller supplies online features, momentum features and the queue contents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_targets(ids: torch.Tensor, bank_ids: torch.Tensor) -> torch.Tensor:
    """One-hot pairing targets p: (B, N), rows normalized. Entries with the same pair id are
    positives (the same product appearing twice — e.g. one row per attribute — is not a negative)."""
    pos = (ids[:, None] == bank_ids[None, :]).float()  # (B, N)
    return pos / pos.sum(1, keepdim=True)


def label_smoothed_contrastive(
    image_feat: torch.Tensor,  # (B, D) normalized, online encoder
    text_feat: torch.Tensor,  # (B, D) normalized, online encoder
    image_feat_m: torch.Tensor,  # (B, D) normalized, momentum encoder
    text_feat_m: torch.Tensor,  # (B, D) normalized, momentum encoder
    ids: torch.Tensor,  # (B,) pair ids
    image_queue: torch.Tensor | None = None,  # (M, D) momentum image features
    text_queue: torch.Tensor | None = None,  # (M, D) momentum text features
    queue_ids: torch.Tensor | None = None,  # (M,) pair ids of the queue entries
    alpha: float = 0.4,
    temperature: float = 0.07,
) -> dict[str, torch.Tensor]:
    """L_sc = (L_i2t + L_t2i) / 2 with targets (1 − α)·p + α·softmax(momentum similarities / τ).

    The contrast bank is the momentum features of the batch followed by the queue (Eq. 4).
    """
    image_feat_m, text_feat_m = image_feat_m.detach(), text_feat_m.detach()
    if image_queue is not None:
        if text_queue is None or queue_ids is None:
            raise ValueError("a queue needs its image features, text features and pair ids together")
        image_bank = torch.cat([image_feat_m, image_queue.detach()], 0)  # (B + M, D)
        text_bank = torch.cat([text_feat_m, text_queue.detach()], 0)  # (B + M, D)
        bank_ids = torch.cat([ids, queue_ids], 0)  # (B + M,)
    else:
        image_bank, text_bank, bank_ids = image_feat_m, text_feat_m, ids

    sim_i2t = image_feat @ text_bank.t() / temperature  # (B, B + M)
    sim_t2i = text_feat @ image_bank.t() / temperature  # (B, B + M)
    targets = pair_targets(ids, bank_ids)  # (B, B + M)
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_bank.t() / temperature
        sim_t2i_m = text_feat_m @ image_bank.t() / temperature
        targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
        targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return {"loss_sc": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
