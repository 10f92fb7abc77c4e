"""PV2TEA's loss terms, decoding and switches pinned by value on tiny random models (issue 24).

Each test compares the model with an independent computation (its own sub-modules called directly, a plain
cross-entropy, a hand-built next-token table) rather than checking shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from markov_decoder import install_markov_decoder
from pv2tea.config import load_config
from pv2tea.data.schema import Record
from pv2tea.decoding.generate import generate_values
from pv2tea.models.build import build_for_training

CATEGORIES = ["mug", "shirt"]


@pytest.fixture(scope="module")
def recs(tmp_path_factory) -> list[Record]:
    """Two products with an image, one without, one with an image of an unknown category; answers of 1–3 tokens."""
    folder = tmp_path_factory.mktemp("pinned_images")
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (10, 10, 230)]):
        image = Image.new("RGB", (40, 40), colour)
        image.putpixel((3, 3), (255, 255, 255))
        path = folder / f"{i}.png"
        image.save(path)
        paths.append(str(path))
    return [
        Record("a", "red ceramic mug", (paths[0],), "mug", "color", ("red",)),
        Record("b", "green shirt with white stripes", (paths[1],), "shirt", "color", ("green", "white")),
        Record("c", "plain blue mug", (), "mug", "color", ("blue",)),
        Record("d", "navy plush toy", (paths[2],), "toy", "color", ("navy blue",)),
    ]


def _build(text_ckpt: Path, *extra: str):
    torch.manual_seed(0)
    cfg = load_config(None, [*tiny_overrides(text_ckpt), *extra])
    model, pre = build_for_training(cfg, CATEGORIES)
    with torch.no_grad():  # away from the init, so the terms are not near-constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, pre


def _batch(pre, recs):
    return pre.collate(recs, list(range(len(recs))), list(range(len(recs))), with_answers=True)


def _independent_ce(
    logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Per row: mean over the answer tokens after [CLS] of the smoothed −log p(token | previous tokens)."""
    out = []
    for row in range(answer_ids.shape[0]):
        n = int(answer_mask[row].sum())  # [CLS] value [SEP], no padding
        lp = logits[row, : n - 1].log_softmax(-1)  # predicts tokens 1 .. n-1
        target = answer_ids[row, 1:n]
        nll = -lp.gather(-1, target[:, None]).squeeze(-1)
        out.append(((1 - smoothing) * nll + smoothing * -lp.mean(-1)).mean())
    return torch.stack(out)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_generation_loss_equals_an_independent_cross_entropy(tiny_text_ckpt, recs, smoothing):
    """g(y_n, ŷ_n) against the decoder's own logits: the shift, the padded answers ignored, a mean per sequence,
    and ``loss.label_smoothing`` reaching the loss."""
    model, pre = _build(tiny_text_ckpt, f"loss.label_smoothing={smoothing}")
    model.eval()
    batch = _batch(pre, recs)
    lengths = batch.answer_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # padded answers in the batch
    with torch.no_grad():
        out = model(batch)
        enc = model.encode(batch)
        logits = model.decoder(
            input_ids=batch.answer_ids,
            attention_mask=batch.answer_mask,
            encoder_hidden_states=enc.memory,
            encoder_attention_mask=enc.memory_mask,
        ).logits
    expected = _independent_ce(logits, batch.answer_ids, batch.answer_mask, smoothing)
    assert torch.allclose(out.per_sample_gen, expected, rtol=1e-5, atol=1e-6)
    assert out.terms["loss_gen"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    if smoothing:
        assert not torch.allclose(expected, _independent_ce(logits, batch.answer_ids, batch.answer_mask), rtol=1e-3)


def test_category_loss_in_the_model_by_value(tiny_text_ckpt, recs):
    """L_ct = CE of the category head on the pooled image of the rows with an image and a known category."""
    model, pre = _build(tiny_text_ckpt)
    model.eval()
    batch = _batch(pre, recs)
    assert batch.category.tolist() == [0, 1, 0, -1] and batch.has_image.tolist() == [True, True, False, True]
    with torch.no_grad():
        out = model(batch)
        pooled = model.visual(batch.images[[0, 1]]).pooled  # rows 0 and 1 only (row 2: no image; row 3: unknown)
        logits = model.category_head(pooled)
    lp = logits.log_softmax(-1)
    assert out.terms["loss_ct"].item() == pytest.approx(-(lp[0, 0] + lp[1, 1]).item() / 2, rel=1e-5)


def test_loss_weights_scale_the_total(tiny_text_ckpt, recs):
    model, pre = _build(tiny_text_ckpt)
    model.eval()
    batch = _batch(pre, recs)
    with torch.no_grad():
        plain = model(batch)
        model.cfg.loss.weight_gen, model.cfg.loss.weight_ct, model.cfg.loss.weight_sc = 0.5, 3.0, 0.25
        weighted = model(batch)
    assert set(plain.terms) == {"loss_gen", "loss_ct", "loss_sc"}
    for name, term in plain.terms.items():
        assert weighted.terms[name].item() == pytest.approx(term.item(), rel=1e-6)  # the terms themselves stay
    t = {k: v.item() for k, v in plain.terms.items()}
    assert plain.loss.item() == pytest.approx(t["loss_gen"] + t["loss_ct"] + t["loss_sc"], rel=1e-6)
    assert weighted.loss.item() == pytest.approx(
        0.5 * t["loss_gen"] + 3.0 * t["loss_ct"] + 0.25 * t["loss_sc"], rel=1e-6
    )


def test_attend_context_feeds_question_and_context_to_the_decoder(tiny_text_ckpt, recs):
    """decoder.attend_context=true: the decoder cross-attends [q; visual; text], and its loss is computed on that."""
    model, pre = _build(tiny_text_ckpt, "decoder.attend_context=true")
    model.eval()
    batch = _batch(pre, recs)
    with torch.no_grad():
        enc = model.encode(batch)
        memory = torch.cat([enc.question, enc.context], 1)
        assert torch.equal(enc.memory, memory)
        assert torch.equal(enc.memory_mask, torch.cat([batch.question_mask, enc.context_mask], 1))
        logits = model.decoder(
            input_ids=batch.answer_ids,
            attention_mask=batch.answer_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=enc.memory_mask,
        ).logits
        out = model(batch)
        question_only = model.decoder(
            input_ids=batch.answer_ids,
            attention_mask=batch.answer_mask,
            encoder_hidden_states=enc.question,
            encoder_attention_mask=batch.question_mask,
        ).logits
    expected = _independent_ce(logits, batch.answer_ids, batch.answer_mask)
    assert torch.allclose(out.per_sample_gen, expected, rtol=1e-5, atol=1e-6)
    other = _independent_ce(question_only, batch.answer_ids, batch.answer_mask)
    assert (expected - other).abs().max() > 1e-4  # the context changes the answer's likelihood
    out = model.train()(batch)  # and it trains: every built parameter receives a gradient
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_batch_norm_statistics(tiny_text_ckpt, recs, freeze_bn):
    model, pre = _build(tiny_text_ckpt, f"vision.freeze_bn={str(freeze_bn).lower()}")
    batch = _batch(pre, recs)
    norms = [m for m in model.visual.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    model.train()
    assert all(m.training != freeze_bn for m in norms)
    model(batch)
    unchanged = [torch.equal(b, m.running_mean) for b, m in zip(before, norms)]
    assert all(unchanged) if freeze_bn else not any(unchanged)


# ------------------------------------------------------------------------------------- decoding
def test_greedy_and_beam_search_find_their_known_answers(tiny_text_ckpt, recs, monkeypatch):
    model, pre = _build(tiny_text_ckpt)
    model.eval()
    tok = pre.tokenizer
    install_markov_decoder(monkeypatch, tok)  # greedy: red green; 2 beams: blue dark
    batch = pre.collate(recs[:2], [0, 1], [0, 1], with_answers=False)
    greedy = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, num_beams=1)
    beam = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, num_beams=2)
    words = lambda ids: tok.convert_ids_to_tokens(ids.tolist())  # noqa: E731
    assert [words(row) for row in greedy] == [["[CLS]", "red", "green", "[SEP]"]] * 2
    assert [words(row) for row in beam] == [["[CLS]", "blue", "dark", "[SEP]"]] * 2
    # the same through the decoding into values, with num_beams from the call and from decoder.num_beams
    assert generate_values(model, pre, recs, batch_size=3) == [["red green"]] * 4
    assert generate_values(model, pre, recs, batch_size=3, num_beams=2) == [["blue dark"]] * 4
    model.cfg.decoder.num_beams = 2
    assert generate_values(model, pre, recs, batch_size=3) == [["blue dark"]] * 4


def test_decoding_known_token_ids_into_values(tiny_text_ckpt):
    """[CLS] value ; value [SEP] [PAD]... → the values: split on the delimiter, special tokens and repeats dropped,
    and the attribute's own name never returned as a value."""
    cfg = load_config(None, tiny_overrides(tiny_text_ckpt))
    _, pre = build_for_training(cfg, CATEGORIES)
    tok = pre.tokenizer
    rows = [
        "[CLS] navy blue ; white ; navy blue [SEP] [PAD]",
        "[CLS] red [SEP]" + " [PAD]" * 7,
        "[CLS] [SEP]" + " [PAD]" * 8,
    ]
    ids = torch.tensor([tok.convert_tokens_to_ids(r.split()) for r in rows])
    assert pre.decode_answers(ids) == [["navy blue", "white"], ["red"], []]
    with_name = torch.tensor([tok.convert_tokens_to_ids("[CLS] color ; red [SEP]".split())])
    from pv2tea.eval.normalize import drop_attribute_name

    assert drop_attribute_name(pre.decode_answers(with_name)[0], "color") == ["red"]
