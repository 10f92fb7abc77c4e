"""Answer decoder with a copy (pointer) distribution over the product text's tokens.

The paper's decoder (a BLIP-style BERT LM head) must map the fused question to the output word
embedding of a value it has read. With frozen encoders and a few hundred weakly labelled rows that
mapping is learned slowly: on the demo catalog TEA answered "black, white" for "Color: Brown". A
pointer-generator output (See et al., 2017) instead mixes the vocabulary distribution with a
distribution that copies the token ids of the product text, weighted by an attention from the decoder
state to the text states; a learned gate decides per step whether to generate or to copy. Values
visible only in the image are still generated from the vocabulary.

``logits`` of the output are log-probabilities of the mixture, so every consumer that applies
``log_softmax`` / ``cross_entropy`` / greedy or beam search to them (training loss, candidate
scoring, ``generate``) works unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig, BertLMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions


class CopyDecoder(BertLMHeadModel):
    """The answer decoder with a copy (pointer) output: a learned gate mixes the vocabulary distribution with one
    over the product text's tokens (an addition to the paper)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.copy_query = nn.Linear(hidden, hidden)
        # no bias: a key bias adds the same score q·b to every position of a row, which the softmax over positions
        # cancels, so it would get no gradient and only drift under the optimizer's weight decay and rounding
        self.copy_key = nn.Linear(hidden, hidden, bias=False)
        self.copy_gate = nn.Linear(2 * hidden, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        copy_states: torch.Tensor | None = None,
        copy_ids: torch.Tensor | None = None,
        copy_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cache=None,
        use_cache: bool = False,
        copy_keys: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        """copy_states (B, T, H), copy_ids (B, T) and copy_mask (B, T): the text tokens that may be copied.

        ``logits_to_keep`` = k > 0: the output distribution of the last k answer positions only (0: all). Greedy
        decoding (models/greedy.py) and beam search pass 1: each step then pays the vocabulary projection of one
        position, not of the whole prefix. ``cache``/``use_cache``: greedy decoding's key/value cache.
        ``copy_keys`` (B, T, H): ``copy_key(copy_states)`` computed once for all the steps of a decoding.
        """
        if copy_states is None or copy_ids is None or copy_mask is None:
            raise ValueError("CopyDecoder needs copy_states, copy_ids and copy_mask")
        # ``kwargs``: what ``generate`` passes along (return_dict...); none of it applies
        out = self.bert(
            input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
        )
        hidden = out.last_hidden_state  # (B, A, H)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]  # (B, k, H)
        return CausalLMOutputWithCrossAttentions(
            logits=self.output_log_probs(hidden, copy_states, copy_ids, copy_mask, copy_keys),
            cache=out.cache if use_cache else None,
        )

    def output_log_probs(
        self,
        hidden: torch.Tensor,
        copy_states: torch.Tensor,
        copy_ids: torch.Tensor,
        copy_mask: torch.Tensor,
        copy_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probabilities (B, A, V) of the generate/copy mixture from the decoder's states ``hidden`` (B, A, H)."""
        vocab_logits = self.cls(hidden)  # (B, A, V)
        keys = self.copy_key(copy_states) if copy_keys is None else copy_keys  # (B, T, H)
        scores = self.copy_query(hidden) @ keys.transpose(1, 2)  # (B, A, T)
        scores = scores / math.sqrt(hidden.shape[-1])
        scores = scores.masked_fill(~copy_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1)  # (B, A, T)
        read = attn @ copy_states  # (B, A, H)
        generate = torch.sigmoid(self.copy_gate(torch.cat([hidden, read], -1)))  # (B, A, 1)
        # a row with nothing to copy (empty or dropped text) generates
        generate = torch.where(copy_mask.bool().any(-1)[:, None, None], generate, torch.ones_like(generate))
        return mixture_log_probs(vocab_logits, attn, generate, copy_ids)


def mixture_log_probs(
    vocab_logits: torch.Tensor, attn: torch.Tensor, generate: torch.Tensor, copy_ids: torch.Tensor, floor: float = 1e-12
) -> torch.Tensor:
    """log(g · softmax(vocab_logits) + (1 − g) · copy); g and the copied ids' probabilities floored at ``floor``.

    vocab_logits (B, A, V); attn (B, A, T) copy attention over text positions (zero where masked); generate
    g (B, A, 1); copy_ids (B, T) token id of each position. ``copy`` puts the attention of all positions that
    hold an id on that id. Only the T copied ids differ from log g + log_softmax, so the mixture is computed
    at those ids and written into the dense log-probabilities, instead of building a dense (B, A, V) copy
    distribution. Each elementwise pass over (B, A, V) costs about as much as the rest of the head on a CPU
    (benchmarks/copy_mixture_speed.py), so the dense part is two passes: log_softmax and + log g.
    """
    log_vocab = vocab_logits.log_softmax(-1)  # (B, A, V)
    dense = log_vocab + torch.log(generate.clamp_min(floor))  # (B, A, V)
    same = (copy_ids[:, :, None] == copy_ids[:, None, :]).to(attn.dtype)  # (B, T, T)
    copy_at = attn @ same  # (B, A, T): copy probability of the id at each position
    ids = copy_ids[:, None, :].expand(-1, attn.shape[1], -1)  # (B, A, T)
    vocab_at = log_vocab.gather(2, ids).exp()  # (B, A, T)
    mixed = torch.log((generate * vocab_at + (1 - generate) * copy_at).clamp_min(floor))  # (B, A, T)
    # an id held by several positions gets the same value from each; only its first position carries gradient
    first = same.tril(-1).sum(-1) == 0  # (B, T)
    mixed = torch.where(first[:, None, :], mixed, mixed.detach())
    return dense.scatter_(2, ids, mixed)  # in place: dense is this function's own (B, A, V) tensor


def copy_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the text tokens that may be copied (real tokens except the leading [CLS])."""
    mask = text_mask.bool().clone()
    mask[:, 0] = False
    return mask
