"""Momentum (EMA) encoders and the feature queues of S1 (paper §3.1, after MoCo/ALBEF).

Queues are registered buffers (saved with the model, so a resumed run continues exactly) with a
write pointer and a fill count; unfilled slots are masked out of the contrast instead of being
seeded with random vectors. Any batch size works, including an uneven last batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def ema_update(online: nn.Module, momentum_model: nn.Module, momentum: float) -> None:
    """θ' ← m·θ' + (1 − m)·θ for every parameter pair.

    Frozen online parameters are skipped: their momentum copy already equals them (after a sync).
    """
    pairs = [
        (p.detach(), p_m)
        for p, p_m in zip(online.parameters(), momentum_model.parameters(), strict=True)
        if p.requires_grad
    ]
    if pairs:
        online_p, momentum_p = zip(*pairs)
        torch._foreach_lerp_(list(momentum_p), list(online_p), 1.0 - momentum)


def freeze_copy(module: nn.Module) -> None:
    """Stop gradients to every parameter of a momentum copy (it moves by EMA only)."""
    for p in module.parameters():
        p.requires_grad_(False)


def world_size() -> int:
    """The number of processes training together (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _gather_chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (their first dimensions may differ), in rank order; a collective call."""
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [c[: int(s.item())] for c, s in zip(chunks, sizes)]


@torch.no_grad()
def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across processes in rank order; identity in a single process."""
    if world_size() == 1:
        return tensor
    return torch.cat(_gather_chunks(tensor))


@torch.no_grad()
def gather_others(tensor: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``tensor`` of every other process, in rank order (None in a single process). Under DDP the
    rows of the other ranks' step belong to the same batch: S1 contrasts with their momentum features as with the
    batch's own, so that W ranks of B rows compute the loss of one process with W·B rows."""
    if world_size() == 1:
        return None
    chunks = _gather_chunks(tensor)
    del chunks[dist.get_rank()]
    return torch.cat(chunks)


class FeatureQueue(nn.Module):
    """Two aligned queues of normalized image/text features plus the pair ids they came from."""

    image: torch.Tensor  # (M, D)
    text: torch.Tensor  # (M, D)
    ids: torch.Tensor  # (M,) pair id of each slot, -1 when empty
    ptr: torch.Tensor  # () next slot to write
    count: torch.Tensor  # () filled slots

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def valid(self) -> torch.Tensor:
        """(M,) bool: which slots hold a feature."""
        return torch.arange(self.size, device=self.ids.device) < self.count

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Add a step's momentum features (gathered from every process) and their product ids, replacing the
        oldest entries."""
        image, text = image.to(self.image.dtype), text.to(self.text.dtype)  # features computed under autocast
        image, text, ids = gather_all(image), gather_all(text), gather_all(ids)
        n = image.shape[0]
        if n == 0:
            return
        if n > self.size:  # keep only the most recent M
            image, text, ids, n = image[-self.size :], text[-self.size :], ids[-self.size :], self.size
        slots = (self.ptr + torch.arange(n, device=self.ids.device)) % self.size  # wraps around
        self.image[slots] = image
        self.text[slots] = text
        self.ids[slots] = ids
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))
