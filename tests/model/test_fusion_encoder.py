"""The question fusion: the paper's shared cross-attention and the gated visual path (fusion.visual_gate)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from pv2tea.models.fusion import FusionEncoder

CONFIG = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _inputs(b: int = 3, v: int = 4, t: int = 5):
    g = torch.Generator().manual_seed(0)
    question = torch.randint(1, 50, (b, 6), generator=g)
    context = torch.randn(b, v + t, 16, generator=g)  # (B, V + T, H): [visual; text]
    mask = torch.ones(b, v + t)
    return question, torch.ones(b, 6), context, mask


@pytest.mark.parametrize("gate", [None, 0.0, 0.7])
def test_shapes_and_a_text_free_row_does_not_read_its_masked_text(gate):
    torch.manual_seed(0)
    encoder = FusionEncoder(CONFIG, num_layers=2, visual_gate=gate).eval()
    question, q_mask, context, mask = _inputs()
    mask[0, 4:] = 0  # row 0: its text hidden (text dropout); it keeps its 4 visual tokens
    out = encoder(question, q_mask, context, mask, n_visual=4)
    assert out.shape == (3, 6, 16)
    changed = context.clone()
    changed[0, 4:] += 5.0  # other values under the masked text
    torch.testing.assert_close(encoder(question, q_mask, changed, mask, n_visual=4)[0], out[0])


def test_a_closed_gate_is_the_text_only_fusion_and_an_open_one_reads_the_image():
    torch.manual_seed(0)
    encoder = FusionEncoder(CONFIG, num_layers=2, visual_gate=0.0).eval()
    question, q_mask, context, mask = _inputs()
    text_only = encoder(question, q_mask, context[:, 4:], mask[:, 4:], n_visual=0)
    torch.testing.assert_close(encoder(question, q_mask, context, mask, n_visual=4), text_only)
    with torch.no_grad():
        for layer in encoder.layers:
            layer.visual_gate.fill_(2.0)
    mask[2, :4] = 0  # row 2 has no image
    assert encoder.gate_openings() == [pytest.approx(0.964, abs=1e-3)] * 2  # tanh(2)
    opened = encoder(question, q_mask, context, mask, n_visual=4)
    assert not torch.allclose(opened[:2], text_only[:2])
    torch.testing.assert_close(opened[2], text_only[2])
    # the paper's fusion reads every token through one cross-attention: no visual parameters, no gate
    shared = FusionEncoder(CONFIG, 2)
    assert not any("visual" in k for k in shared.state_dict()) and shared.gate_openings() == []


def test_a_row_with_neither_image_nor_text_keeps_its_question_state():
    torch.manual_seed(0)
    encoder = FusionEncoder(CONFIG, num_layers=1, visual_gate=1.0).eval()
    question, q_mask, context, mask = _inputs()
    mask[1] = 0  # row 1: no visual token, no text token
    out = encoder(question, q_mask, context, mask, n_visual=4)
    changed = context.clone()
    changed[1] += 3.0
    torch.testing.assert_close(encoder(question, q_mask, changed, mask, n_visual=4)[1], out[1])
    assert torch.isfinite(out).all()
