"""The Python inference API: one :class:`Predictor` serves batch prediction, evaluation and HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import BertConfig

from pv2tea.config import Config
from pv2tea.data.dataset import Preprocessor, RecordDataset, make_collate
from pv2tea.data.schema import Record
from pv2tea.models.pv2tea import PV2TEA
from pv2tea.models.text import load_bert_config, load_tokenizer, resolve_text_path
from pv2tea.models.vision import data_config
from pv2tea.train import checkpoint as ckpt


def build_for_training(cfg: Config, categories: Sequence[str]) -> tuple[PV2TEA, Preprocessor]:
    """A PV2TEA initialized from the configured offline pretrained checkpoints."""
    text_path = resolve_text_path(cfg.text.path)
    model = PV2TEA(cfg, load_bert_config(text_path), num_categories=max(len(categories), 1))
    model.load_pretrained()
    pre = Preprocessor(cfg, load_tokenizer(text_path), data_config(model.visual.backbone, cfg.vision), list(categories))
    return model, pre


def preprocess_state(pre: Preprocessor) -> dict:
    return {"categories": pre.categories, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in pre.data_config.items()}}


def load_from_checkpoint(directory: str | Path) -> tuple[PV2TEA, Preprocessor]:
    directory = Path(directory)
    cfg = ckpt.read_config(directory)
    bert_config = BertConfig(**ckpt.read_json(directory, ckpt.TEXT_CONFIG_FILE))
    prep = ckpt.read_json(directory, ckpt.PREPROCESS_FILE)
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in prep["data_config"].items()}
    model = PV2TEA(cfg, bert_config, num_categories=max(len(prep["categories"]), 1))
    ckpt.load_weights(model, directory)
    pre = Preprocessor(cfg, load_tokenizer(directory), data_cfg, prep["categories"])
    return model, pre


@torch.no_grad()
def generate_values(model: PV2TEA, pre: Preprocessor, records: Sequence[Record], batch_size: int,
                    num_beams: int | None = None, progress: bool = False, desc: str = "predict") -> list[list[str]]:
    """Generated values for each record, in order (model left in its previous train/eval mode)."""
    was_training = model.training
    model.eval()
    dataset = RecordDataset(records)
    collate = make_collate(pre, dataset, with_answers=False)
    tok = pre.tokenizer
    out: list[list[str]] = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = collate(list(range(start, min(start + batch_size, len(dataset)))))
        ids = model.generate(batch, bos_id=tok.cls_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id,
                             num_beams=num_beams)
        out.extend(pre.decode_answers(ids))
    model.train(was_training)
    return out


class Predictor:
    """Load a trained PV2TEA checkpoint and extract attribute values."""

    def __init__(self, model: PV2TEA, pre: Preprocessor):
        self.model = model.eval()
        self.pre = pre

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "Predictor":
        return cls(*load_from_checkpoint(directory))

    def predict(self, records: Sequence[Record], batch_size: int = 16, num_beams: int | None = None,
                progress: bool = False) -> list[list[str]]:
        return generate_values(self.model, self.pre, records, batch_size, num_beams, progress)

    @torch.no_grad()
    def attention_masks(self, records: Sequence[Record]) -> list[torch.Tensor | None]:
        """S2's learned patch mask σ(M) per record, shaped as the patch grid (h, w); None without image."""
        out: list[torch.Tensor | None] = []
        for record in records:
            image = self.pre.image_tensor(record)
            if image is None:
                out.append(None)
                continue
            _, mask, grid = self.model.image_features(image.unsqueeze(0))
            out.append(mask[0].reshape(grid) if mask is not None else None)
        return out
