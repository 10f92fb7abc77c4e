"""A model batch: the tensors :class:`~pv2tea.data.dataset.Preprocessor` builds from records and
:class:`~pv2tea.models.pv2tea.PV2TEA` reads (its ``forward``, ``generate`` and ``encode``).

It lives in the data layer, below the model, so that preprocessing and the model can both import it without
importing each other; ``pv2tea.models.pv2tea.Batch`` is the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One batch of rows, every tensor indexed by row along its first dimension."""

    images: torch.Tensor | None  # (B, 3, H, W); zeros where has_image is False; None when image_feats is given
    has_image: torch.Tensor  # (B,) bool
    text_ids: torch.Tensor  # (B, T)
    text_mask: torch.Tensor  # (B, T)
    question_ids: torch.Tensor  # (B, Q)
    question_mask: torch.Tensor  # (B, Q)
    category: torch.Tensor  # (B,) long, -1 when the category is unknown to the model
    pair_id: torch.Tensor  # (B,) long: rows of the same product share it
    index: torch.Tensor  # (B,) long: row index in the dataset
    answer_ids: torch.Tensor | None = None  # (B, A) [CLS] value ; value [SEP] [PAD]...
    answer_mask: torch.Tensor | None = None  # (B, A)
    extra_images: torch.Tensor | None = None  # (B, K-1, 3, H, W): further images of a product
    extra_mask: torch.Tensor | None = None  # (B, K-1) bool
    attribute_id: torch.Tensor | None = None  # (B,) long, for the classification head
    value_targets: torch.Tensor | None = None  # (B, V) multi-hot over the value vocabulary
    multi_value: torch.Tensor | None = None  # (B,) bool: the row's attribute is multi-value
    # cached outputs of frozen backbones (see pv2tea.train.feature_cache); used instead of pixels / token ids
    image_feats: torch.Tensor | None = None  # (B, N, C) backbone tokens of the first image
    extra_feats: torch.Tensor | None = None  # (B, K-1, N, C) backbone tokens of further images
    text_hidden: torch.Tensor | None = None  # (B, T, H) text-encoder states (zeros at padding)

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor on ``device``."""
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch of the given rows (B',): every field is per row along its first dimension."""
        return Batch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def without_images(self, rows: torch.Tensor) -> Batch:
        """The batch with the photos of the given rows ((B,) bool) withheld: the model reads those rows as products
        without an image."""
        hidden = dict(self.__dict__)
        hidden["has_image"] = self.has_image & ~rows
        if self.extra_mask is not None:
            hidden["extra_mask"] = self.extra_mask & ~rows[:, None]  # (B, K-1)
        return Batch(**hidden)
