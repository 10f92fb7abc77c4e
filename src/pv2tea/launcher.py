"""What a launcher (``torchrun``, ``accelerate launch``) tells each process it starts: its ``RANK`` among
``WORLD_SIZE`` processes. Read here once, before any process group exists, by training (only rank 0 reports) and
sharded prediction (which rows a process predicts); one process without a launcher is rank 0 of 1."""

from __future__ import annotations

import os

__all__ = ["launched_rank", "launched_world_size"]


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
