"""Variants beyond the default: TEA (text only), classification head, several images, candidate ranking."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from pv2tea.config import ConfigError, load_config
from pv2tea.data.dataset import value_vocabulary
from pv2tea.data.schema import Record
from pv2tea.decoding.generate import generate_values
from pv2tea.experiment import TEA, VARIANTS
from pv2tea.models.build import build_for_training


@pytest.fixture(scope="module")
def recs(tmp_path_factory) -> list[Record]:
    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        p = folder / f"{i}.png"
        Image.new("RGB", (48, 48), colour).save(p)
        paths.append(str(p))
    return [
        Record("a", "red mug", (paths[0], paths[1], paths[2]), "mug", "color", ("red", "green")),
        Record("b", "green vase", (paths[1],), "vase", "color", ("green",)),
        Record("c", "striped mug", (), "mug", "pattern", ("striped",)),
        Record("d", "blue vase", (paths[2], paths[0]), "vase", "pattern", ("solid",)),
    ]


def _build(tiny_text_ckpt, recs, *extra):
    torch.manual_seed(0)
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), *extra])
    multi = {"color": True, "pattern": False}
    return build_for_training(cfg, ["mug", "vase"], value_vocabulary(recs), multi)


def _all_grads(model) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
    ]


def test_text_only_config_must_switch_off_image_schemes():
    with pytest.raises(ConfigError, match="schemes.contrastive=false"):
        load_config(None, ["vision.enabled=false"])


def test_tea_has_no_visual_parts_and_trains(tiny_text_ckpt, recs):
    model, pre = _build(tiny_text_ckpt, recs, *TEA)
    assert model.visual is None and not any("visual" in n for n, _ in model.named_parameters())
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    model.train()
    out = model(batch)
    assert set(out.terms) == {"loss_gen"}
    out.loss.backward()
    assert _all_grads(model) == []
    assert len(generate_values(model, pre, recs, batch_size=2)) == 4


def test_classification_head(tiny_text_ckpt, recs):
    model, pre = _build(tiny_text_ckpt, recs, "decoder.head=classify")
    assert model.decoder is None and model.value_head.out_features == len(pre.value_classes) == 4
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    # multi-hot targets over (attribute, value) classes: color → green, red; pattern → solid, striped
    assert batch.value_targets.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    model.train()
    out = model(batch, torch.ones(4))
    out.loss.backward()
    assert _all_grads(model) == []
    # learns the toy set: predictions stay inside each row's attribute vocabulary
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
    preds = generate_values(model, pre, recs, batch_size=4)
    assert [sorted(p) for p in preds] == [["green", "red"], ["green"], ["striped"], ["solid"]]


def test_several_images_enter_fusion(tiny_text_ckpt, recs):
    model, pre = _build(tiny_text_ckpt, recs, "vision.max_images=3")
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    assert batch.extra_images.shape[:2] == (4, 2)
    assert batch.extra_mask.tolist() == [[True, True], [False, False], [False, False], [True, False]]
    model.eval()
    with torch.no_grad():
        many = model(batch).per_sample_gen
        batch.extra_images[0, 1] = torch.randn_like(batch.extra_images[0, 1])  # third image of row 0 changes
        changed = model(batch).per_sample_gen
        batch.extra_mask[:] = False  # ignoring the extra images changes only rows 0 and 3
        first_only = model(batch).per_sample_gen
    assert many[0] != changed[0] and many[1] == changed[1]  # exact: unrelated rows are untouched
    assert torch.equal(first_only[1:3], many[1:3]) and first_only[3] != many[3]
    model.train()
    out = model(pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True))
    out.loss.backward()
    assert _all_grads(model) == []


def test_candidates_rank_by_sequence_likelihood(tiny_text_ckpt, recs):
    model, pre = _build(tiny_text_ckpt, recs)
    model.eval()
    batch = pre.collate(recs[:2], [0, 1], [0, 1], with_answers=False)
    cands = ["red", "green", "light blue"]
    enc = pre.tokenizer(cands * 2, padding=True, return_tensors="pt")
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = model.score_candidates(batch, rows, enc["input_ids"], enc["attention_mask"])
    # the score is the sum of next-token log-probabilities of the candidate under the decoder
    one = pre.tokenizer(["light blue"], return_tensors="pt")
    q = model.encode(pre.collate(recs[:1], [0], [0], with_answers=False))
    logits = model.decoder(
        input_ids=one["input_ids"], encoder_hidden_states=q.question, encoder_attention_mask=q.question_mask
    ).logits[0]
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, one["input_ids"][0, 1:, None]).sum()
    assert scores[2].item() == pytest.approx(lp.item(), rel=1e-4)
    preds = generate_values(
        model, pre, recs, batch_size=4, candidates={"mug": {"color": cands}, "pattern": ["solid", "striped"]}
    )
    best0 = cands[int(scores[:3].argmax())]
    assert preds[0] == [best0]
    assert preds[2][0] in ("solid", "striped") and preds[3][0] in ("solid", "striped")
    # the vase's colour has no list: it alone is generated, as open generation of the whole batch answers it
    generated_rows = []
    generate = model.generate
    model.generate = lambda batch, **kw: generated_rows.append(batch.index.tolist()) or generate(batch, **kw)
    again = generate_values(
        model, pre, recs, batch_size=4, candidates={"mug": {"color": cands}, "pattern": ["solid", "striped"]}
    )
    del model.generate
    assert generated_rows == [[1]] and again == preds
    assert preds[1] == generate_values(model, pre, recs, batch_size=4)[1]


@pytest.mark.parametrize("copy", [False, True])
def test_candidate_scores_equal_the_dense_decoder_output(tiny_text_ckpt, recs, copy):
    """Scoring only the distinct (row, prefix) states gives each candidate the log-likelihood of a full decoder
    pass over it, with shared prefixes, different lengths and padding."""
    model, pre = _build(tiny_text_ckpt, recs, f"decoder.copy={str(copy).lower()}")
    model.eval()
    batch = pre.collate(recs[:3], [0, 1, 2], [0, 1, 2], with_answers=False)
    cands = ["red", "light blue", "light green", "dark light blue", "red"]
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    texts = [cands[0], cands[1], cands[2], cands[1], cands[3], cands[4], cands[2]]
    enc = pre.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model.score_candidates(batch, rows, enc["input_ids"], enc["attention_mask"])
        full = model.encode(batch)
        logits = model.decoder(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            encoder_hidden_states=full.memory[rows],
            encoder_attention_mask=full.memory_mask[rows],
            **model._copy_inputs(full, batch, rows),
        ).logits  # (N, L, V)
    token_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    expected = (token_lp * enc["attention_mask"][:, 1:]).sum(1)
    assert scores.shape == (7,)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores[1] != scores[2] and scores[0] != scores[5]  # rows and suffixes still tell candidates apart


@pytest.mark.parametrize("head", ["generate", "classify"])
def test_extractor_fusion_reranks_candidates(tiny_text_ckpt, recs, head):
    """A prior fused with weight 0 changes nothing; a confident prior with a large weight decides; a prior
    spread evenly over the candidates leaves the model's ranking as it is."""
    model, pre = _build(tiny_text_ckpt, recs, f"decoder.head={head}")
    model.eval()
    cands = {"color": ["red", "green"], "pattern": ["solid", "striped"]}
    alone = generate_values(model, pre, recs, batch_size=4, candidates=cands)
    # for each row, the prior puts its mass on the candidate the model did not pick
    other = [[c for c in cands[r.attribute] if [c] != p][0] for r, p in zip(recs, alone)]
    priors = [{o: 0.99, **{c: 0.01 for c in cands[r.attribute] if c != o}} for r, o in zip(recs, other)]
    kwargs = dict(batch_size=4, candidates=cands, priors=priors)
    assert generate_values(model, pre, recs, prior_weight=0.0, **kwargs) == alone
    assert generate_values(model, pre, recs, prior_weight=50.0, **kwargs) == [[o] for o in other]
    flat = [{c: 0.5 for c in cands[r.attribute]} for r in recs]
    assert generate_values(model, pre, recs, batch_size=4, candidates=cands, priors=flat) == alone
    with pytest.raises(ValueError, match="3 priors for 4 records"):
        generate_values(model, pre, recs, **{**kwargs, "priors": priors[:3]})


def test_binary_matching_variant_trains_and_retrieves(tiny_text_ckpt, recs):
    from pv2tea.experiment import retrieval_on
    from pv2tea.inference.predictor import Predictor

    model, pre = _build(tiny_text_ckpt, recs, "schemes.alignment=matching")
    assert model.itm_head is not None and not model.uses_contrast
    assert not any(
        n.startswith(("vision_proj", "text_proj", "visual_m", "text_encoder_m", "queue")) for n in model.state_dict()
    )
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    model.train()
    out = model(batch)
    assert {"loss_gen", "loss_itm", "loss_ct"} <= set(out.terms) and "loss_sc" not in out.terms
    assert torch.isfinite(out.terms["loss_itm"])
    out.loss.backward()
    assert _all_grads(model) == []  # the ITM head and every fusion weight receive a gradient
    model.eval()
    scores = model.match_scores(pre.collate(recs[:2], [0, 1], [0, 1], with_answers=False))
    assert scores.shape == (2, 2) and bool(((scores > 0) & (scores < 1)).all())
    metrics = retrieval_on(Predictor(model, pre), recs)
    assert set(metrics) >= {"txt_r1", "img_r1", "r_mean"}


def test_matching_needs_two_products_in_the_batch(tiny_text_ckpt, recs):
    from pv2tea.losses.matching import image_text_matching_loss, negative_partners

    assert negative_partners(torch.tensor([3, 3, 3])) is None
    assert negative_partners(torch.tensor([1, 1, 2])).tolist() == [2, 2, 0]
    assert negative_partners(torch.tensor([5, 6])).tolist() == [1, 0]
    perfect = image_text_matching_loss(torch.tensor([[-9.0, 9.0]]), torch.tensor([[9.0, -9.0]]))
    assert float(perfect) < 1e-3
    model, pre = _build(tiny_text_ckpt, recs, "schemes.alignment=matching")
    one_product = [recs[0], recs[0]]
    out = model(pre.collate(one_product, [0, 0], [0, 1], with_answers=True))
    assert "loss_itm" not in out.terms  # no mismatched pair to learn from: the term is left out


def test_alignment_is_validated():
    with pytest.raises(ConfigError, match="alignment"):
        load_config(None, ["schemes.alignment=itc"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_experiment_variant_builds_weighs_trains_and_answers(tiny_text_ckpt, recs, name):
    """Each row of `pv2tea experiment` as configured there: its parts, S3 weights, loss terms, gradients, answers."""
    from pv2tea.train.loop import sample_weights

    model, pre = _build(tiny_text_ckpt, recs, *VARIANTS[name], "schemes.prediction_nr_start_epoch=0")
    s = model.cfg.schemes
    assert (model.visual is None) == (name == "tea")
    if model.visual is not None:
        assert (model.visual.mask_head is not None) == s.attention_pruning
    assert (model.category_head is not None) == s.category_loss
    weights, stats = sample_weights(model, pre, recs, epoch=1, cfg=model.cfg)
    assert ("s_v_mean" in stats) == (s.visual_nr and model.visual is not None)
    assert ("s_p_mean" in stats) == s.prediction_nr
    if weights is not None:
        assert weights.shape == (4,) and weights.mean() == pytest.approx(1.0)
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    model.train()
    out = model(batch, None if weights is None else torch.as_tensor(weights, dtype=torch.float32))
    expected = {"loss_gen"} | ({"loss_ct"} if s.category_loss else set())
    if s.contrastive:
        expected |= {"loss_sc" if s.alignment == "contrastive" else "loss_itm"}
    assert set(out.terms) == expected and torch.isfinite(out.loss)
    out.loss.backward()
    # a closed visual gate passes no gradient to the attention behind it yet (it opens with training)
    closed = {n for n, _ in model.named_parameters() if ".visual_attention." in n} if name == "visual_gate" else set()
    assert set(_all_grads(model)) == closed
    answers = generate_values(model, pre, recs, batch_size=2)
    assert len(answers) == 4 and all(isinstance(a, list) for a in answers)


def test_variant_names_switch_what_they_say():
    """Each ablation differs from pv2tea in exactly the settings its name (paper Tables 4-6, 9-11) says."""
    from pv2tea.config import config_differences

    # the paper preset runs every scheme; the cpu preset has S3's prediction level off (wo_pred_nr is pv2tea there)
    base = load_config("paper").to_dict()
    changed = {
        name: {k for k, _, _ in config_differences(base, load_config("paper", VARIANTS[name]).to_dict())}
        for name in VARIANTS
    }
    cpu = load_config("cpu").to_dict()
    assert not config_differences(cpu, load_config("cpu", VARIANTS["wo_pred_nr"]).to_dict())
    assert changed["pv2tea"] == set()
    assert changed["wo_sc"] == {"schemes.contrastive"}
    assert changed["wo_smooth"] == {"schemes.alpha"} and load_config("paper", VARIANTS["wo_smooth"]).schemes.alpha == 0
    assert changed["wo_ct"] == {"schemes.category_loss"}
    assert changed["wo_pruning"] == {"schemes.attention_pruning"}
    assert changed["wo_ct_pruning"] == {"schemes.category_loss", "schemes.attention_pruning"}
    assert changed["wo_vis_nr"] == {"schemes.visual_nr"} and changed["wo_pred_nr"] == {"schemes.prediction_nr"}
    assert changed["wo_nr"] == {"schemes.visual_nr", "schemes.prediction_nr"}
    assert changed["pv2tea_cls"] == {"decoder.head"} and changed["matching"] == {"schemes.alignment"}
    assert {"vision.enabled", "schemes.contrastive"} <= changed["tea"]
    for a in ("0.2", "0.6", "0.8"):
        assert changed[f"alpha_{a}"] == {"schemes.alpha"}
    dropout = {k for k, _, _ in config_differences(cpu, load_config("cpu", VARIANTS["wo_dropout"]).to_dict())}
    assert dropout == {"schemes.text_dropout", "schemes.mention_dropout"}  # the cpu preset's additions, off
    assert changed["visual_gate"] == {"fusion.visual_gate"}
    assert load_config("cpu", VARIANTS["visual_gate"]).fusion.visual_gate == 0


@pytest.mark.parametrize(
    "extra",
    [["vision.max_images=3"], ["decoder.head=classify"], ["schemes.alignment=matching"]],
    ids=["3_images", "classify", "matching"],
)
def test_an_open_visual_gate_works_with_several_images_the_classifier_and_matching(tiny_text_ckpt, recs, extra):
    model, pre = _build(tiny_text_ckpt, recs, "fusion.visual_gate=0.5", *extra)
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    model.train()
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert _all_grads(model) == []  # the open gate's attention trains along with everything else
    model.eval()
    with torch.no_grad():
        for layer in model.fusion.layers:
            layer.visual_gate.zero_()
        closed = model.encode(batch).question
        text_only = model.fusion(
            batch.question_ids, batch.question_mask, model.encode(batch).text_hidden, batch.text_mask, n_visual=0
        )
    torch.testing.assert_close(closed, text_only)  # every image's tokens (here up to 3) sit behind the gate


def test_a_visual_gate_refuses_an_ungated_decoder_view_and_needs_the_visual_token_count(tiny_text_ckpt, recs):
    with pytest.raises(ConfigError, match="attend_context"):
        load_config(None, ["fusion.visual_gate=0", "decoder.attend_context=true"])
    model, pre = _build(tiny_text_ckpt, recs, "fusion.visual_gate=0")
    batch = pre.collate(recs, [0, 1, 2, 3], [0, 1, 2, 3], with_answers=True)
    with pytest.raises(ValueError, match="n_visual"):
        model.fusion(batch.question_ids, batch.question_mask, model.encode(batch).context, batch.text_mask)
