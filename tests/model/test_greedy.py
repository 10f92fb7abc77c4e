"""Greedy decoding with a key/value cache (models/greedy.py) chooses the tokens of transformers' generate."""

from __future__ import annotations

import pytest
import torch
from test_model import build, image_paths, make_batch, records, single_thread  # noqa: F401  (fixtures)
from transformers import GenerationConfig

from pv2tea.models.greedy import greedy_decode


def _reference(model, enc, batch, bos, eos, pad, steps):
    config = GenerationConfig(
        max_new_tokens=steps,
        num_beams=1,
        do_sample=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=False,
    )
    start = torch.full((len(batch), 1), bos, dtype=torch.long)
    return model.decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        encoder_hidden_states=enc.memory,
        encoder_attention_mask=enc.memory_mask,
        generation_config=config,
        **model._copy_inputs(enc, batch),
    )


@pytest.mark.parametrize("copy", [True, False])
def test_cached_greedy_equals_generate(tiny_text_ckpt, image_paths, copy):  # noqa: F811
    model, pre = build(tiny_text_ckpt, f"decoder.copy={str(copy).lower()}", "decoder.attend_context=true")
    model.eval()
    batch = make_batch(pre, records(image_paths))
    tok = pre.tokenizer
    with torch.no_grad():
        enc = model.encode(batch)
        free = _reference(model, enc, batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, 6)
        # an end token the rows reach at different steps: what row 0 says second
        eos = int(free[0, 2])
        expected = _reference(model, enc, batch, tok.cls_token_id, eos, tok.pad_token_id, 6)
        got = greedy_decode(
            model.decoder,
            enc.memory,
            enc.memory_mask,
            tok.cls_token_id,
            eos,
            tok.pad_token_id,
            6,
            **model._copy_inputs(enc, batch),
        )
    assert free.shape[1] == 7
    if copy:  # the copy decoder's rows differ (they copy from their own texts), so they end at different steps
        assert len({tuple(r) for r in free.tolist()}) > 1
    assert (expected == eos).any() and torch.equal(got, expected)
    with torch.no_grad():  # the model's own greedy path (copy keys computed once) answers as generate does
        own = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, max_new_tokens=6)
    assert torch.equal(own, free)
