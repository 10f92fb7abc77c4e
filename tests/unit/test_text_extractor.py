"""Text-only extractors (OpenTag_cls-style transformer and TF-IDF): learning, decoding,
unknown attributes, pickle-free save/load, weak labelling and source-aware evaluation."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pv2tea.baselines import (
    METADATA_FILE,
    TextExtractor,
    TfidfTextExtractor,
    TransformerExtractorConfig,
    TransformerTextExtractor,
    build_label_space,
    evaluate_extractor,
    load_extractor,
    weak_label,
)
from pv2tea.data.dataset import crop_words
from pv2tea.data.schema import Record
from pv2tea.data.synth import make_catalog
from pv2tea.data.validate import load_dataset
from pv2tea.eval.normalize import normalize_values

COLORS = ("Red", "Blue", "Green", "Black")
MATERIALS = ("Wood", "Steel", "Glass")
NOUNS = ("mug", "lamp", "bowl", "vase")


def _record(rid: str, text: str, attribute: str, label: tuple[str, ...], **extra: object) -> Record:
    return Record(id=rid, text=text, images=(), category="home", attribute=attribute, label=label, **extra)


def toy_records() -> list[Record]:
    """20 products x 2 attributes: ``color`` (1-2 values, multi-value) and ``material``;
    every value is written in the text, so a text model can learn all 40 rows."""
    rng = random.Random(0)
    records: list[Record] = []
    for index in range(20):
        colors = tuple(rng.sample(COLORS, 1 + index % 2))
        material = MATERIALS[index % len(MATERIALS)]
        text = (
            f"Acme {rng.choice(NOUNS)} in {' and '.join(c.lower() for c in colors)}, "
            f"made of {material.lower()}. Great gift."
        )
        source = "text" if index % 3 else "image"
        records.append(_record(f"p{index}-color", text, "color", colors, gold=colors, source=source))
        records.append(_record(f"p{index}-material", text, "material", (material,), gold=(material,), source=source))
    return records


def accuracy(records: list[Record], predictions: list[list[str]]) -> float:
    hits = [normalize_values(p) == normalize_values(r.label) for r, p in zip(records, predictions)]
    return sum(hits) / len(hits)


def tiny_transformer_config(text_path: Path, **overrides: object) -> TransformerExtractorConfig:
    settings: dict[str, object] = dict(
        text_path=str(text_path),
        max_tokens=32,
        epochs=40,
        batch_size=8,
        lr=5e-3,
        head_lr=2e-2,
        warmup_ratio=0.0,
        seed=0,
    )
    settings.update(overrides)
    return TransformerExtractorConfig(**settings)


@pytest.fixture(scope="module")
def toy() -> list[Record]:
    return toy_records()


@pytest.fixture(scope="module")
def fitted(toy: list[Record], tiny_text_ckpt: Path) -> dict[str, TextExtractor]:
    return {
        "tfidf": TfidfTextExtractor().fit(toy),
        "transformer": TransformerTextExtractor(tiny_transformer_config(tiny_text_ckpt)).fit(toy),
    }


FLAVOURS = ("tfidf", "transformer")


def test_label_space_merges_spellings_and_keeps_most_frequent() -> None:
    values = ["red", "Red", "Red!", "Red", "blue"]
    records = [_record(f"r{i}", "t", "color", (value,)) for i, value in enumerate(values)]
    records.append(_record("m", "t", "size", ("Large", "small")))
    space = build_label_space(records)
    assert space["color"].keys == ("blue", "red")
    assert space["color"].surfaces == ("blue", "Red")
    assert not space["color"].multi_value and space["size"].multi_value
    assert not build_label_space(records, multi_value_attributes=())["size"].multi_value
    with pytest.raises(ValueError, match="'bad'"):
        build_label_space([_record("bad", "t", "color", ("!!",))])


def test_crop_words() -> None:
    assert crop_words("a  b\nc d", 3) == "a b c"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_learns_toy_dataset(flavour: str, fitted: dict[str, TextExtractor], toy: list[Record]) -> None:
    extractor = fitted[flavour]
    assert extractor.vocabularies["color"].multi_value and not extractor.vocabularies["material"].multi_value
    assert accuracy(toy, extractor.predict(toy)) >= 0.9


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_multi_value_predicts_several_values(flavour: str, fitted: dict[str, TextExtractor], toy: list[Record]) -> None:
    two_colors = [r for r in toy if r.attribute == "color" and len(r.label) == 2]
    predictions = fitted[flavour].predict(two_colors)
    assert sum(len(p) == 2 for p in predictions) >= 0.9 * len(two_colors)
    assert all(set(p) <= set(COLORS) for p in predictions)  # most frequent (capitalised) spelling
    material = fitted[flavour].predict([r for r in toy if r.attribute == "material"])
    assert all(len(p) == 1 for p in material)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unknown_attribute_is_named(flavour: str, fitted: dict[str, TextExtractor], toy: list[Record]) -> None:
    with pytest.raises(ValueError, match="'pattern'"):
        fitted[flavour].predict([toy[0], replace(toy[1], attribute="pattern")])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_save_load_round_trip_without_pickle(
    flavour: str, fitted: dict[str, TextExtractor], toy: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extractor = fitted[flavour]
    folder = extractor.save(tmp_path / flavour)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".joblib", ".bin", ".pt", ".pth"}]
    assert json.loads((folder / METADATA_FILE).read_text())["kind"] == flavour

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling is not allowed when loading an extractor")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = load_extractor(folder)
    assert type(loaded) is type(extractor)
    assert loaded.predict(toy) == extractor.predict(toy)


def test_weak_label_replaces_labels_only(fitted: dict[str, TextExtractor], toy: list[Record]) -> None:
    extractor = fitted["tfidf"]
    blank = [replace(r, label=("Purple",)) for r in toy]
    labelled = weak_label(extractor, blank)
    assert [r.label for r in labelled] == [tuple(p) for p in extractor.predict(toy)]
    for before, after in zip(blank, labelled):
        assert (after.id, after.gold, after.source, after.text) == (before.id, before.gold, before.source, before.text)
        assert after.label != ("Purple",)
    # label_weight: the extractor's confidence in the value(s) it wrote, the least probable chosen value's
    probabilities = extractor.value_probabilities(blank)
    for row, probs in zip(labelled, probabilities):
        assert row.label_weight == pytest.approx(min(probs[v.lower()] for v in row.label), abs=1e-4)
    assert len({r.label_weight for r in labelled}) > 1 and all(0 < r.label_weight <= 1 for r in labelled)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_predict_with_confidence_is_predict_plus_its_probability(
    flavour: str, fitted: dict[str, TextExtractor], toy: list[Record]
) -> None:
    extractor = fitted[flavour]
    pairs = extractor.predict_with_confidence(toy)
    assert [values for values, _ in pairs] == extractor.predict(toy)
    for (values, confidence), probs in zip(pairs, extractor.value_probabilities(toy)):
        assert confidence == pytest.approx(min(probs[v.lower()] for v in values))


def test_transformer_is_deterministic_by_seed(toy: list[Record], tiny_text_ckpt: Path) -> None:
    def head(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # the config seed alone must decide the result
        extractor = TransformerTextExtractor(tiny_transformer_config(tiny_text_ckpt, epochs=1, seed=seed)).fit(toy)
        return extractor._net.head.weight.detach().clone()  # type: ignore[union-attr]

    first = head(0, global_seed=1)
    after_fit = torch.random.get_rng_state()
    assert torch.equal(after_fit, torch.manual_seed(1).get_state())  # the global RNG is left untouched
    assert torch.equal(first, head(0, global_seed=2))
    assert not torch.equal(first, head(1, global_seed=1))


def test_unfitted_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TfidfTextExtractor().predict(toy_records()[:1])
    (tmp_path / METADATA_FILE).write_text(json.dumps({"kind": "crf", "format_version": 1}))
    with pytest.raises(ValueError, match="'crf'"):
        load_extractor(tmp_path)


def test_tfidf_on_gold_labels_is_better_on_text_sourced_values(tmp_path: Path) -> None:
    paths = make_catalog(tmp_path, n_products=60, seed=0, image_size=32)
    train, test = (load_dataset(paths[split], check_images=False).records for split in ("train", "test"))
    extractor = TfidfTextExtractor().fit([replace(r, label=r.gold) for r in train])
    report = evaluate_extractor(extractor, test, {"color": True, "pattern": False})
    text, image = report["by_source"]["text"], report["by_source"]["image"]
    assert text["n"] > 0 and image["n"] > 0
    assert text["f1"] > image["f1"]
    with pytest.raises(ValueError, match="pattern"):
        evaluate_extractor(extractor, test, {"color": True})


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_value_probabilities_agree_with_predict(
    flavour: str, fitted: dict[str, TextExtractor], toy: list[Record]
) -> None:
    extractor = fitted[flavour]
    materials = [r for r in toy if r.attribute == "material"]
    probabilities = extractor.value_probabilities(materials)
    for probs, values in zip(probabilities, extractor.predict(materials)):
        assert set(probs) == {"wood", "steel", "glass"}  # keyed by normalized value
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)  # single-value: one distribution
        assert max(probs, key=probs.get) == values[0].lower()
    with pytest.raises(ValueError, match="'pattern'"):
        extractor.value_probabilities([replace(toy[1], attribute="pattern")])
