"""Cross-modality fusion and grounding (paper §3 (2)).

The question prompt "What is the {attribute} of the {category}?" ([CLS-Q] first) passes through
BERT layers with bidirectional self-attention and cross-attention to the concatenated
[visual; text] tokens. transformers' ``BertLayer`` only allows cross-attention in decoders
(causal), so the layer is assembled here from ``BertAttention``/``BertIntermediate``/``BertOutput``
with ``is_causal=False``; the self-attention and feed-forward weights copy a pretrained layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertIntermediate, BertOutput


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) 1/0 key mask → (B, 1, 1, K) additive mask for attention scores."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class FusionLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, self_mask: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.attention(hidden, attention_mask=self_mask)  # (B, Q, H)
        hidden, _ = self.crossattention(hidden, encoder_hidden_states=context,
                                        encoder_attention_mask=context_mask)  # (B, Q, H)
        return self.output(self.intermediate(hidden), hidden)


class FusionEncoder(nn.Module):
    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(FusionLayer(config) for _ in range(num_layers))

    def forward(self, question_ids: torch.Tensor, question_mask: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        """Grounded question representation q = [q_cls, q_1, ..., q_R], shape (B, R + 1, H)."""
        hidden = self.embeddings(input_ids=question_ids)
        self_mask = additive_mask(question_mask, hidden.dtype)  # (B, 1, 1, Q)
        ctx_mask = additive_mask(context_mask, hidden.dtype)  # (B, 1, 1, V + T)
        for layer in self.layers:
            hidden = layer(hidden, self_mask, context, ctx_mask)
        return hidden

    def pretrained_mapping(self, source_layers: list[int], cross_from_self: bool) -> dict[str, str]:
        """Own key → BertModel key, for initializing from a text checkpoint.

        With ``cross_from_self`` the cross-attention starts as a copy of the layer's self-attention.
        """
        mapping = {k: k for k in self.state_dict() if k.startswith("embeddings.")}
        for i, j in enumerate(source_layers):
            prefix = f"layers.{i}."
            for k in self.state_dict():
                if not k.startswith(prefix):
                    continue
                rest = k[len(prefix):]
                if rest.startswith("crossattention."):
                    if cross_from_self:
                        mapping[k] = f"encoder.layer.{j}.attention." + rest[len("crossattention."):]
                else:
                    mapping[k] = f"encoder.layer.{j}." + rest
        return mapping
