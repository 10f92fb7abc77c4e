"""Feature cache for frozen backbones: encode every image and product text once, not every step.

With ``vision.freeze`` (and/or ``text.freeze``) the backbone's output for an image (text) never
changes during training, and the momentum copy of a frozen backbone equals it. Training then only
runs the trainable heads (projection, S2 mask, fusion, decoder) per step, which on a CPU is an
order of magnitude faster. With ``text.train_layers`` the same holds for the text encoder's frozen
bottom layers: their output is cached and only the top layers run at each step. Images are keyed by
path, texts by their cropped string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pv2tea.data.images import load_rgb
from pv2tea.data.schema import Record


@dataclass
class MemoryFeatureCache:
    """Frozen backbones' outputs kept in memory for one run, by image path and cropped text: a
    :class:`pv2tea.data.dataset.FeatureCache`."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)  # path → (N, C) backbone tokens
    texts: dict[str, torch.Tensor] = field(default_factory=dict)  # cropped text → (T_i, H) states

    @property
    def n_images(self) -> int:
        """The number of images cached."""
        return len(self.images)

    @property
    def n_texts(self) -> int:
        """The number of texts cached."""
        return len(self.texts)

    def has_images(self, records: Sequence[Record], positions: int) -> bool:
        """Whether the first ``positions`` images of every record are cached."""
        return bool(self.images) and all(p in self.images for r in records for p in r.images[:positions])

    def has_texts(self, texts: Sequence[str]) -> bool:
        """Whether the states of every (cropped) text are cached."""
        return bool(self.texts) and all(t in self.texts for t in texts)

    def image_tokens(self, paths: Sequence[str | None]) -> torch.Tensor:
        """(B, N, C) cached tokens; zeros where the path is None (no image at that position)."""
        like = next(iter(self.images.values()))
        return torch.stack([self.images[p] if p is not None else torch.zeros_like(like) for p in paths])

    def text_states(self, texts: Sequence[str], mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) cached states aligned with the batch's padded token mask (B, T)."""
        hidden = next(iter(self.texts.values())).shape[-1]
        out = torch.zeros(len(texts), mask.shape[1], hidden)
        for i, text in enumerate(texts):
            states = self.texts[text]
            if states.shape[0] != int(mask[i].sum()):
                raise RuntimeError(
                    f"cached text states ({states.shape[0]} tokens) do not match the batch "
                    f"({int(mask[i].sum())} tokens); was the tokenizer or text config changed?"
                )
            out[i, : states.shape[0]] = states
        return out


@torch.no_grad()
def build_feature_cache(
    model, pre, records: Sequence[Record], batch_size: int = 32, progress: bool = False
) -> MemoryFeatureCache:
    """Encode the distinct images (through the frozen backbone: all with ``vision.freeze``, the lower part with
    ``vision.train_blocks``) and texts (through the frozen text layers: all with
    ``text.freeze``, the bottom ones with ``text.train_layers``) of records."""
    cfg = model.cfg
    cache = MemoryFeatureCache()
    was_training = model.training
    model.eval()
    if model.visual_cached:
        paths = list(dict.fromkeys(p for r in records for p in r.images[: cfg.vision.max_images]))
        for start in tqdm(
            range(0, len(paths), batch_size), desc="cache image features", disable=not progress, leave=False
        ):
            chunk = paths[start : start + batch_size]
            pixels = torch.stack([pre.transform(load_rgb(p)) for p in chunk])  # (b, 3, H, W)
            tokens = model.visual.cached_tokens(pixels)  # (b, N, C)
            cache.images.update(zip(chunk, tokens.clone().unbind(0)))
    if model.text_cached:
        texts = list(dict.fromkeys(pre.crop(r.text) for r in records))
        for start in tqdm(
            range(0, len(texts), batch_size), desc="cache text features", disable=not progress, leave=False
        ):
            chunk = texts[start : start + batch_size]
            enc = pre.tokenize_texts(chunk)
            states = model.frozen_text_states(enc["input_ids"], enc["attention_mask"])  # (b, T, H)
            lengths = enc["attention_mask"].sum(1).tolist()
            cache.texts.update((t, states[i, :n].clone()) for i, (t, n) in enumerate(zip(chunk, lengths)))
    model.train(was_training)
    return cache
