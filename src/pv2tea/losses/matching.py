"""Binary image-text matching (ITM): the alignment objective that S1's contrast is compared with.

The paper's Figure 4 contrasts its label-smoothed contrastive loss with binary matching (as in
ViLT/BLIP): a two-way classifier on the fused representation of a pair tells matched from
mismatched image-text pairs. Pure functions; the model supplies the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_partners(pair_ids: torch.Tensor) -> torch.Tensor | None:
    """For each row, the index of another row of a *different* product (its mismatched image).

    Row i takes the first row after it (cyclically) whose pair id differs. None when every row is
    the same product (no negative exists). Deterministic, so training resumes exactly.
    """
    n = pair_ids.shape[0]
    partner = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        for step in range(1, n):
            j = (i + step) % n
            if pair_ids[j] != pair_ids[i]:
                partner[i] = j
                break
    if bool((partner < 0).any()):
        return None
    return partner


def image_text_matching_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of matched (class 1) and mismatched (class 0) pairs; logits (B, 2) each."""
    logits = torch.cat([pos_logits, neg_logits], 0)  # (2B, 2)
    labels = torch.cat([torch.ones(len(pos_logits)), torch.zeros(len(neg_logits))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)
