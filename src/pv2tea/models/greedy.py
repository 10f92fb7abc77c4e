"""Greedy decoding of the answer with a key/value cache.

``transformers``' ``generate`` cannot keep a cache for the BERT decoder's cross-attention, so it re-encodes the
whole answer prefix, and re-projects the fused question's keys and values, at every step. Here each step feeds only
the newest token: the decoder's self-attention keys and values of the earlier tokens and its cross-attention keys
and values of the question are kept (``EncoderDecoderCache``), and only the last position's output distribution is
computed (``logits_to_keep=1``). The tokens chosen are those of ``generate`` with ``num_beams=1`` and
``do_sample=False``: the argmax at each step, padding after a row's end token, stopping when every row has ended.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


@torch.no_grad()
def greedy_decode(
    decoder: nn.Module,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    **decoder_inputs: torch.Tensor,
) -> torch.Tensor:
    """Answer token ids (B, 1 + L), L <= max_new_tokens, starting with ``bos_id``.

    ``memory`` (B, M, H) and ``memory_mask`` (B, M): what the decoder cross-attends; ``decoder_inputs``: further
    per-row inputs of the decoder's forward (the copy decoder's text states).
    """
    rows = memory.shape[0]
    ids = torch.full((rows, 1), bos_id, dtype=torch.long, device=memory.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=memory.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for _ in range(max_new_tokens):
        out = decoder(
            input_ids=ids[:, -1:],
            attention_mask=torch.ones_like(ids),
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **decoder_inputs,
        )
        cache = out.cache
        step = out.logits[:, -1].argmax(-1)  # (B,)
        step = torch.where(unfinished, step, torch.full_like(step, pad_id))
        ids = torch.cat([ids, step[:, None]], 1)  # (B, t + 1)
        unfinished &= step != eos_id
        if not bool(unfinished.any()):
            break
    return ids
