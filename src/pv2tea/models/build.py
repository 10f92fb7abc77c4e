"""A PV2TEA and its :class:`~pv2tea.data.dataset.Preprocessor`: fresh for training, or read from a checkpoint folder.

Training builds them from the configured offline pretrained checkpoints (:func:`build_for_training`) and saves the
preprocessing next to the weights (:func:`preprocess_state`); inference rebuilds both from that folder
(:func:`load_from_checkpoint`, the format in :mod:`pv2tea.models.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import BertConfig

from pv2tea.config import Config
from pv2tea.data.dataset import Preprocessor
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.pv2tea import PV2TEA
from pv2tea.models.text import load_bert_config, load_tokenizer, resolve_text_path
from pv2tea.models.vision import data_config

TEXT_ONLY_DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def build_for_training(
    cfg: Config,
    categories: Sequence[str],
    values: dict[str, list[str]] | None = None,
    multi_value: dict[str, bool] | None = None,
    value_counts: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[PV2TEA, Preprocessor]:
    """A PV2TEA initialized from the configured offline pretrained checkpoints.

    ``values`` (attribute → value vocabulary) is needed by the classification head and optional otherwise;
    ``value_counts`` (:func:`pv2tea.data.dataset.value_counts` of the training rows) is the label prior of
    ``decoder.prior_correction``, saved with the model.
    """
    text_path = resolve_text_path(cfg.text.path)
    tokenizer = load_tokenizer(text_path)
    pre_values = values or {}
    value_attributes = Preprocessor(cfg, tokenizer, TEXT_ONLY_DATA_CONFIG, [], pre_values).value_attributes
    model = PV2TEA(
        cfg, load_bert_config(text_path), num_categories=max(len(categories), 1), value_attributes=value_attributes
    )
    model.load_pretrained()
    data_cfg = data_config(model.visual.backbone, cfg.vision) if model.visual is not None else TEXT_ONLY_DATA_CONFIG
    pre = Preprocessor(
        cfg, tokenizer, data_cfg, list(categories), pre_values, dict(multi_value or {}), dict(value_counts or {})
    )
    return model, pre


def preprocess_state(pre: Preprocessor) -> dict:
    """What a model folder keeps of a preprocessor (its ``preprocess.json``): categories, value vocabularies, which
    attributes are multi-value, the label prior and the image transform."""
    return {
        "categories": pre.categories,
        "values": pre.values,
        "multi_value": pre.multi_value,
        "value_counts": pre.value_counts,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.data_config.items()},
    }


def load_from_checkpoint(directory: str | Path) -> tuple[PV2TEA, Preprocessor]:
    """The model and preprocessor saved in a model folder (``RUN/final``, a checkpoint), on the CPU.

    Args:
        directory: The model folder.

    Returns:
        The model (in training mode, as built) and its preprocessor.

    Raises:
        pv2tea.models.checkpoint.CheckpointError: A file is missing or damaged, or does not match the manifest.
    """
    directory = Path(directory)
    cfg = ckpt.read_config(directory)
    bert_config = BertConfig(**ckpt.read_json(directory, ckpt.TEXT_CONFIG_FILE))
    prep = ckpt.read_json(directory, ckpt.PREPROCESS_FILE)
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in prep["data_config"].items()}
    pre = Preprocessor(
        cfg,
        load_tokenizer(directory),
        data_cfg,
        prep["categories"],
        prep["values"],  # an older folder's preprocess.json arrives upgraded (models/checkpoint.py, MIGRATIONS)
        prep["multi_value"],
        prep["value_counts"],
    )
    model = PV2TEA(
        cfg, bert_config, num_categories=max(len(prep["categories"]), 1), value_attributes=pre.value_attributes
    )
    ckpt.load_weights(model, directory)
    return model, pre
