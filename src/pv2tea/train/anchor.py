"""Decoupled L2 toward the warm start (L2-SP): keeps a fine-tuned run near the weights it started from.

A run warm-started from a text-only model (``train.warm_start``) and then trained on a few hundred products' weak
labels drifts toward the labels' errors and away from what the warm start learned from many labelled texts. After
every optimizer step each warm-started trainable parameter θ is pulled toward its starting value θ₀:

    θ ← θ − lr · λ · (θ − θ₀)

with lr the parameter group's current learning rate and λ = ``optim.anchor_decay``. It is AdamW's decoupled weight
decay with θ₀ in place of 0 (Li et al. 2018 call the penalty form L2-SP), so it follows the schedule and costs one
fused multiply-add per tensor. λ = 0 (the default) leaves training unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAnchor:
    """The starting values of the parameters a warm start filled, and the pull toward them."""

    def __init__(self, model: nn.Module, keys: set[str], decay: float, start: nn.Module | None = None) -> None:
        """Anchor ``model``'s trainable parameters named in ``keys`` at their values in ``start`` (a model of the
        same architecture holding the warm start; default: ``model`` itself, right after the warm start)."""
        if decay < 0:
            raise ValueError(f"optim.anchor_decay must be >= 0, got {decay}")
        self.decay = decay
        values = dict((start or model).named_parameters())
        # copies detached from the model: the anchor must not move with training
        self.anchors: dict[nn.Parameter, torch.Tensor] = {
            p: values[name].detach().clone() for name, p in model.named_parameters() if p.requires_grad and name in keys
        }

    def __len__(self) -> int:
        return len(self.anchors)

    @torch.no_grad()
    def pull(self, optimizer: torch.optim.Optimizer) -> None:
        """Move each anchored parameter a fraction lr · λ of the way back to its anchor (after ``optimizer.step``)."""
        if not self.decay or not self.anchors:
            return
        for group in optimizer.param_groups:
            rate = group["lr"] * self.decay
            if rate <= 0:
                continue
            if rate >= 1:
                raise ValueError(
                    f"optim.anchor_decay × lr = {rate:g} >= 1 would overshoot the warm start; lower optim.anchor_decay"
                )
            for p in group["params"]:
                anchor = self.anchors.get(p)
                if anchor is not None:
                    p.lerp_(anchor.to(p.device, p.dtype), rate)  # p + rate · (anchor − p)
