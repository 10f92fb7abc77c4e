"""Synthetic catalog: determinism, coverage of the paper's challenges, and the text rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pv2tea.data.images import load_rgb
from pv2tea.data.schema import Record
from pv2tea.data.synth import (
    COLORS,
    default_priors,
    default_vocab,
    make_catalog,
    text_rule_extract,
    weak_label_accuracy,
)
from pv2tea.data.validate import load_dataset

N_PRODUCTS = 200
# The catalog directory and the records of each split.
Catalog = tuple[Path, dict[str, list[Record]]]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("catalog")
    paths = make_catalog(root, n_products=N_PRODUCTS, seed=3, image_size=96)
    return root, {name: load_dataset(path).records for name, path in paths.items()}


def _all(splits: dict[str, list[Record]]) -> list[Record]:
    return [record for records in splits.values() for record in records]


def _contains(words: list[str], phrase: list[str]) -> bool:
    return any(words[i : i + len(phrase)] == phrase for i in range(len(words)))


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    make_catalog(tmp_path / "a", n_products=12, seed=5, image_size=96)
    make_catalog(tmp_path / "b", n_products=12, seed=5, image_size=96)
    make_catalog(tmp_path / "c", n_products=12, seed=6, image_size=96)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 12 + 4
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    train = [(tmp_path / d / "train.jsonl").read_bytes() for d in ("a", "c")]
    assert train[0] != train[1]


def test_splits_are_by_product_and_rows_complete(catalog: Catalog) -> None:
    _, splits = catalog
    products = {name: {r.id.rsplit("-", 1)[0] for r in records} for name, records in splits.items()}
    assert sum(len(p) for p in products.values()) == N_PRODUCTS
    assert [len(products[n]) for n in ("train", "val", "test")] == [140, 30, 30]
    for records in splits.values():
        assert len(records) == 2 * len({r.id.rsplit("-", 1)[0] for r in records})
        assert all(r.label and r.gold and r.source in ("text", "image") for r in records)
    records = _all(splits)
    assert {r.attribute for r in records} == {"color", "pattern"}
    assert {r.source for r in records if r.attribute == "color"} == {"text", "image"}
    assert {r.source for r in records if r.attribute == "pattern"} == {"text", "image"}
    assert len({r.category for r in records}) == 5
    assert any(r.attribute == "color" and len(r.gold) > 1 for r in records)


def test_weak_labels_are_text_biased(catalog: Catalog) -> None:
    root, splits = catalog
    accuracy = weak_label_accuracy(_all(splits))
    assert accuracy["text"]["accuracy"] > 0.8
    assert accuracy["image"]["accuracy"] < 0.45
    assert accuracy["overall"]["n"] == 2 * N_PRODUCTS
    stats = json.loads((root / "catalog.json").read_text())
    assert stats["weak_label_accuracy"]["all"] == accuracy
    assert stats["n_rows"] == 2 * N_PRODUCTS and stats["seed"] == 3
    assert stats["vocab"] == default_vocab() and stats["priors"] == default_priors()


def test_source_matches_literal_mentions(catalog: Catalog) -> None:
    _, splits = catalog
    vocab = default_vocab()
    for record in _all(splits):
        words = re.findall(r"[a-z]+", record.text.lower())
        stated = {v for v in vocab[record.attribute] if _contains(words, v.split())}
        assert (record.source == "text") == (set(record.gold) <= stated), record.id


def test_images_decode_and_show_the_gold_colors(catalog: Catalog) -> None:
    _, splits = catalog
    for record in splits["val"]:
        assert len(record.images) == 1
        image = load_rgb(record.images[0])
        assert image.size == (96, 96)
        if record.attribute == "color":
            counts = {rgb: n for n, rgb in image.getcolors(96 * 96)}
            for color in record.gold:
                assert counts.get(COLORS[color], 0) >= 20, (record.id, color)


@pytest.mark.parametrize(
    ("text", "attribute", "category", "expected"),
    [
        ("Blue and Red Striped Mug", "color", "mug", ["blue", "red"]),  # stated, order kept
        ("Mug - Color: Red\nAvailable in red, blue.", "color", "mug", ["red", "blue"]),
        ("Classic Ceramic Mug, 12 oz", "color", "mug", ["white"]),  # omitted: prior
        ("Calming Green Tea Infused Mug", "color", "mug", ["green"]),  # misleading
        ("Redwood Coffee Mug", "color", "rug", ["brown"]),  # no whole-word match
        ("Polka-Dot Mug, striped box", "pattern", "mug", ["polka dot"]),  # first only
        ("Striped Bass Fishing Gift Mug", "pattern", "vase", ["striped"]),  # misleading
        ("Plain Mug", "pattern", "pillow", ["checkered"]),  # omitted: prior
        ("Plain Mug", "pattern", "lamp", []),  # no prior for the category
    ],
)
def test_text_rule_extract(text: str, attribute: str, category: str, expected: list[str]) -> None:
    vocab, priors = default_vocab(), default_priors()
    assert text_rule_extract(text, attribute, category, vocab, priors) == expected
