"""A decoder with a known next-token table, so greedy and beam search have known, different answers.

[CLS] → red .6 | blue .4;  red → green .55 | white .45;  blue → dark 1;  green/white/dark → [SEP].
Greedy decoding answers "red green" (p .33); beam search with 2 beams "blue dark" (p .4).
"""

from __future__ import annotations

import math

import torch
from transformers import BertLMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from pv2tea.models.copy_decoder import CopyDecoder

GREEDY, BEAM = "red green", "blue dark"


def markov_forward(tokenizer):
    """A ``forward`` for BertLMHeadModel / CopyDecoder whose logits follow the table above (by the last token)."""
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("red", "blue", "green", "white", "dark")}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    table = {
        cls: {ids["red"]: 0.6, ids["blue"]: 0.4},
        ids["red"]: {ids["green"]: 0.55, ids["white"]: 0.45},
        ids["blue"]: {ids["dark"]: 1.0},
        ids["green"]: {sep: 1.0},
        ids["white"]: {sep: 1.0},
        ids["dark"]: {sep: 1.0},
    }

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        copy_states=None,
        copy_ids=None,
        copy_mask=None,
        **kwargs,
    ):
        b, n = input_ids.shape
        logits = torch.full((b, n, self.config.vocab_size), -1e4)
        for i in range(b):
            for t in range(n):
                for token, p in table.get(int(input_ids[i, t]), {sep: 1.0}).items():
                    logits[i, t, token] = math.log(p)
        return CausalLMOutputWithCrossAttentions(logits=logits)

    return forward


def install_markov_decoder(monkeypatch, tokenizer_or_checkpoint) -> None:
    """Patch both decoder classes (plain and copying) with the table's forward for the rest of the test."""
    tokenizer = tokenizer_or_checkpoint
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        from pv2tea.models.text import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_or_checkpoint)
    forward = markov_forward(tokenizer)
    monkeypatch.setattr(BertLMHeadModel, "forward", forward)
    monkeypatch.setattr(CopyDecoder, "forward", forward)
