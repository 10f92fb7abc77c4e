"""The warm start as a frozen teacher (``loss.distill_weight``).

A run warm-started from a text-only model (``train.init_from``) and then trained on a few hundred products' weak
labels learns to repeat the labels, which are the text extractor's answers; on ImplicitAVE that pulls it under its
warm start within one epoch (docs/results.md). With ``loss.distill_weight = α`` each row's generation loss is

    (1 − α) · CE(label) + α · KL(warm start ‖ model)

over the answer tokens, the warm start reading the same text, question and answer prefix as the model (word-level
knowledge distillation). Where the weak label and the warm start agree nothing changes; where they differ, the
model learns a mixture of both, and the image (which the teacher never sees) is free to move it where the visual
evidence says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pv2tea.models.build import load_from_checkpoint
from pv2tea.models.checkpoint import CheckpointError
from pv2tea.models.pv2tea import PV2TEA, Batch


class TeacherError(ValueError):
    """The teacher cannot serve this run (another vocabulary, no decoder, other cached text layers)."""


class WarmStartTeacher:
    """A frozen copy of the model in ``directory`` that scores the student's batches."""

    def __init__(self, directory: Path, student: PV2TEA, device: torch.device | str = "cpu") -> None:
        directory = Path(directory)
        try:
            model, _ = load_from_checkpoint(directory)
        except (CheckpointError, OSError, ValueError, KeyError) as err:
            raise TeacherError(f"{directory}: cannot load the warm start as a distillation teacher: {err}") from err
        if model.decoder is None or student.decoder is None:
            raise TeacherError(
                f"{directory}: distillation (loss.distill_weight) needs a generative decoder in both the warm start "
                "and this run (decoder.head=generate)"
            )
        theirs, ours = model.decoder.config.vocab_size, student.decoder.config.vocab_size
        if theirs != ours:
            raise TeacherError(
                f"{directory}: the warm start's decoder has {theirs} tokens, this run's {ours}: "
                "distillation needs the same text model"
            )
        if student.text_cached and model.text_frozen_layers != student.text_frozen_layers:
            raise TeacherError(
                f"{directory}: the warm start freezes {model.text_frozen_layers} text layer(s), this run "
                f"{student.text_frozen_layers}: the cached text states of a batch serve only the same split "
                "(set text.train_layers as in the warm start)"
            )
        model.requires_grad_(False)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """(B, A, V) the teacher's next-token logits over the batch's answers."""
        return self.model.answer_logits(batch)
