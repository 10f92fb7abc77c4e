"""Cross-modality fusion and grounding (paper §3 (2)).

The question prompt "What is the {attribute} of the {category}?" ([CLS-Q] first) passes through
BERT layers with bidirectional self-attention and cross-attention to the concatenated
[visual; text] tokens. transformers' ``BertLayer`` only allows cross-attention in decoders
(causal), so the layer is assembled here from ``BertAttention``/``BertIntermediate``/``BertOutput``
with ``is_causal=False``; the self-attention and feed-forward weights copy a pretrained layer.

With a visual gate (``fusion.visual_gate``) the visual tokens get their own cross-attention per layer, whose
output is mixed in through ``tanh(g)`` (the text cross-attention then sees the text tokens only): at ``g = 0`` the
layer is the text-only layer, so a text-only warm start is kept intact until the image earns its weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertIntermediate, BertOutput


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) 1/0 key mask → (B, 1, 1, K) additive mask for attention scores."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def is_visual_gate_key(key: str) -> bool:
    """A state-dict key of the gated visual path (a part a text-only (TEA) checkpoint does not have)."""
    return ".visual_attention." in f".{key}" or ".visual_gate" in f".{key}"


@dataclass
class GatedContext:
    """The visual tokens of a gated layer, apart from the text context."""

    tokens: torch.Tensor  # (B, V, H)
    mask: torch.Tensor  # (B, 1, 1, V) additive
    rows: torch.Tensor  # (B, 1, 1): 1 where the row has at least one visual token


class FusionLayer(nn.Module):
    """One fusion layer: the question's self-attention, cross-attention to the [visual; text] context, feed-forward;
    with ``visual_gate``, a cross-attention of its own to the visual tokens mixed in through a tanh gate."""

    def __init__(self, config: BertConfig, visual_gate: float | None = None):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.visual_attention: BertAttention | None = None
        self.visual_gate: nn.Parameter | None = None
        if visual_gate is not None:
            self.visual_attention = BertAttention(config, is_causal=False, is_cross_attention=True)
            self.visual_gate = nn.Parameter(torch.full((1,), float(visual_gate)))

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        has_context: torch.Tensor | None = None,
        visual: GatedContext | None = None,
    ) -> torch.Tensor:
        """``has_context`` (B, 1, 1): rows with no unmasked context key keep their state through the
        cross-attention (a softmax over only masked keys would average them in)."""
        hidden, _ = self.attention(hidden, attention_mask=self_mask)  # (B, Q, H)
        crossed, _ = self.crossattention(
            hidden, encoder_hidden_states=context, encoder_attention_mask=context_mask
        )  # (B, Q, H)
        hidden = crossed if has_context is None else torch.where(has_context, crossed, hidden)
        if visual is not None:
            if self.visual_attention is None or self.visual_gate is None:
                raise ValueError("visual tokens passed apart from the text to a layer without a visual gate")
            seen, _ = self.visual_attention(
                hidden, encoder_hidden_states=visual.tokens, encoder_attention_mask=visual.mask
            )  # (B, Q, H)
            gate = torch.tanh(self.visual_gate) * visual.rows  # (B, 1, 1)
            hidden = hidden + gate * (seen - hidden)
        return self.output(self.intermediate(hidden), hidden)


class FusionEncoder(nn.Module):
    """The question encoder of PV2TEA (paper §3 (2)): the question's embeddings through the fusion layers, reading the
    image and text tokens; its output is the grounded question representation q."""

    def __init__(self, config: BertConfig, num_layers: int, visual_gate: float | None = None):
        """``visual_gate``: None for the paper's shared cross-attention, else the gate's start value."""
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(FusionLayer(config, visual_gate) for _ in range(num_layers))
        self.gated = visual_gate is not None

    def fusion_layers(self) -> list[FusionLayer]:
        """The layers, typed (``nn.ModuleList`` yields plain modules)."""
        return [layer for layer in self.layers if isinstance(layer, FusionLayer)]

    def gate_openings(self) -> list[float]:
        """tanh(g) of each layer's visual gate, the share of the image-read state it mixes in (empty: no gate)."""
        return [
            round(float(torch.tanh(layer.visual_gate.detach())), 4)
            for layer in self.fusion_layers()
            if layer.visual_gate is not None
        ]

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        n_visual: int | None = None,
    ) -> torch.Tensor:
        """Grounded question representation q = [q_cls, q_1, ..., q_R], shape (B, R + 1, H).

        ``context`` is [visual; text] (B, V + T, H) whose first ``n_visual`` tokens are visual; a gated encoder
        reads those through its visual cross-attention, the shared one reads all of them. A gated encoder needs
        ``n_visual`` (0 when there are no visual tokens): without it, image tokens would be read as text.
        """
        if self.gated and n_visual is None:
            raise ValueError("a gated fusion (fusion.visual_gate) needs n_visual, the number of leading visual tokens")
        hidden = self.embeddings(input_ids=question_ids)
        self_mask = additive_mask(question_mask, hidden.dtype)  # (B, 1, 1, Q)
        visual, has_text = None, None
        if self.gated:
            vis_mask = context_mask[:, :n_visual]  # (B, V)
            if n_visual and bool(vis_mask.any()):
                visual = GatedContext(
                    context[:, :n_visual],
                    additive_mask(vis_mask, hidden.dtype),
                    vis_mask.any(1)[:, None, None].to(hidden.dtype),
                )
            context, context_mask = context[:, n_visual:], context_mask[:, n_visual:]  # (B, T, H), (B, T)
            has_text = context_mask.any(1)[:, None, None]  # (B, 1, 1)
        ctx_mask = additive_mask(context_mask, hidden.dtype)  # (B, 1, 1, K)
        for layer in self.layers:
            hidden = layer(hidden, self_mask, context, ctx_mask, has_text, visual)
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
                rest = k[len(prefix) :]
                if is_visual_gate_key(rest):
                    continue  # new, like the cross-attention without cross_from_self
                if rest.startswith("crossattention."):
                    if cross_from_self:
                        mapping[k] = f"encoder.layer.{j}.attention." + rest[len("crossattention.") :]
                else:
                    mapping[k] = f"encoder.layer.{j}." + rest
        return mapping
