"""The warm start as a frozen teacher (``loss.distill_weight``).

A run warm-started from a text-only model (``train.warm_start``) and then trained on a few hundred products' weak
labels learns to repeat the labels, which are the text extractor's answers; on ImplicitAVE that pulls it under its
warm start within one epoch (docs/results.md). With ``loss.distill_weight = α`` each row's generation loss is

    (1 − α) · CE(label) + α · KL(warm start ‖ model)

over the answer tokens, the warm start reading the same text, question and answer prefix as the model (word-level
knowledge distillation); with the classification head (``decoder.head = classify``) the KL is over the row's value
classes. Where the weak label and the warm start agree nothing changes; where they differ, the
model learns a mixture of both, and the image (which the teacher never sees) is free to move it where the visual
evidence says.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pv2tea.data.dataset import Preprocessor
from pv2tea.models.build import load_from_checkpoint
from pv2tea.models.checkpoint import CheckpointError, class_map
from pv2tea.models.pv2tea import PV2TEA, Batch


class TeacherError(ValueError):
    """The teacher cannot serve this run (another vocabulary, no decoder, other cached text layers)."""


class WarmStartTeacher:
    """A frozen copy of the model in ``directory`` that scores the student's batches.

    Both models generate (the teacher's next-token logits over the student's answers), or both classify: the teacher's
    log-probabilities over the *student's* value classes, matched by (attribute, value), since each run builds its
    class vocabulary from its own training labels (``pre``: the student's preprocessor, needed then).
    """

    def __init__(
        self,
        directory: Path,
        student: PV2TEA,
        device: torch.device | str = "cpu",
        pre: Preprocessor | None = None,
    ) -> None:
        directory = Path(directory)
        try:
            model, teacher_pre = load_from_checkpoint(directory)
        except (CheckpointError, OSError, ValueError, KeyError) as err:
            raise TeacherError(f"{directory}: cannot load the warm start as a distillation teacher: {err}") from err
        heads = ("generate" if model.decoder is not None else "classify", "generate" if student.decoder else "classify")
        if heads[0] != heads[1]:
            raise TeacherError(
                f"{directory}: the warm start's head is '{heads[0]}', this run's '{heads[1]}': distillation "
                "(loss.distill_weight) needs the same decoder.head in both"
            )
        if model.decoder is not None and student.decoder is not None:
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
        self.classes: torch.Tensor | None = None  # (V_student,) teacher class of each student class, -1: none
        self.attributes: torch.Tensor | None = None  # (A_student,) teacher attribute of each student attribute
        if model.decoder is None:
            if pre is None:
                raise TeacherError(f"{directory}: a classifying teacher needs the run's preprocessor (its classes)")
            self.classes = class_map(pre.value_classes, teacher_pre.value_classes).to(device)
            known = teacher_pre.attribute_index
            self.attributes = torch.tensor([known.get(a, -1) for a in pre.attributes], dtype=torch.long, device=device)
            self.own = student.value_attribute.to(device)  # (V_student,) attribute of each student class
        self.value_counts = teacher_pre.value_counts  # the prior of the teacher's training labels
        model.requires_grad_(False)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's view of the batch: (B, A, V) next-token logits over the answers (generating), or (B, V)
        log-probabilities over the student's value classes, −inf where it has none (classifying)."""
        if self.classes is None or self.attributes is None:
            return self.model.answer_logits(batch)
        if batch.attribute_id is None:
            raise TeacherError("a classifying teacher needs the batch's attribute_id")
        attribute = self.attributes[batch.attribute_id]  # (B,) in the teacher's numbering, -1: unknown to it
        theirs = self.model.value_logits(replace(batch, attribute_id=attribute)).float().log_softmax(-1)  # (B, V_t)
        mine = theirs[:, self.classes.clamp_min(0)]  # (B, V_student)
        gives = (self.classes >= 0)[None, :] & (self.own[None, :] == batch.attribute_id[:, None])  # (B, V_student)
        gives &= (attribute >= 0)[:, None]
        mine = mine.masked_fill(~gives, float("-inf"))
        # renormalized over the student's classes of the row's attribute (a teacher class the student lacks drops out)
        norm = torch.logsumexp(mine.masked_fill(~gives, -1e30), -1, keepdim=True)  # (B, 1)
        return torch.where(gives, mine - norm, torch.full_like(mine, float("-inf")))
