"""``pv2tea bench catalog``: the split into a text-labelled share and the catalogue, the headline and its table from
hand-made summaries, the config errors, and the whole protocol at micro size (tiny random backbones, a made-up
catalogue of 24 products), resumed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageDraw

from conftest import tiny_overrides
from pv2tea.bench.catalog import (
    CatalogBenchConfig,
    catalog_headline,
    format_source_table,
    run_catalog_bench,
    split_catalog,
)
from pv2tea.bench.protocol import summarize_runs
from pv2tea.cli import main
from pv2tea.data.readers import write_records
from pv2tea.data.schema import Record
from pv2tea.eval.normalize import occurs_in

COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}
SYNONYM = {"Red": "crimson", "Blue": "navy"}  # what the text says when it does not name the colour


def _product_rows(n: int) -> list[Record]:
    """``n`` products of two rows each (Colour, Pattern); a product's rows share its photo."""
    rows = []
    for i in range(n):
        image = f"/photos/{10000 + i}.jpg"
        for attribute, value in (("Colour", "Red" if i % 2 else "Blue"), ("Pattern", "Striped" if i % 3 else "Solid")):
            rows.append(Record(f"{10000 + i}-{attribute}", f"shirt {i}", (image,), "Shirts", attribute, (), (value,)))
    return rows


def test_split_keeps_products_together_and_labels_the_text_share_with_gold():
    rows = _product_rows(1000)
    text_rows, catalogue = split_catalog(rows, 0.3)
    assert len(text_rows) + len(catalogue) == len(rows)
    text_products = {r.id.split("-")[0] for r in text_rows}
    catalogue_products = {r.id.split("-")[0] for r in catalogue}
    assert not text_products & catalogue_products  # a product's two rows on the same side
    assert all(len([r for r in text_rows if r.id.startswith(p)]) == 2 for p in list(text_products)[:50])
    assert 0.25 < len(text_products) / 1000 < 0.35  # the share asked for, roughly
    # text-labelled rows: no photo, the gold value as the (fully trusted) label; the catalogue: no label
    assert all(r.images == () and r.label == r.gold and r.label_weight is None for r in text_rows)
    assert all(r.images and r.label == () and r.gold for r in catalogue)
    assert {r.id: r.text for r in text_rows + catalogue} == {r.id: r.text for r in rows}
    # stable: the same draw on every call (a hash of the product, not of the process), nested in the share
    assert split_catalog(rows, 0.3) == (text_rows, catalogue)
    assert split_catalog(list(reversed(rows)), 0.3)[0] == list(reversed(text_rows))
    wider = {r.id for r in split_catalog(rows, 0.6)[0]}
    assert {r.id for r in text_rows} < wider and 0.55 < len(wider) / 2000 < 0.65
    # a weak label or extractor confidence already in the file is dropped on both sides
    weak = [Record(r.id, r.text, r.images, r.category, r.attribute, ("Green",), r.gold, label_weight=0.2) for r in rows]
    assert split_catalog(weak, 0.3) == (text_rows, catalogue)


def test_split_does_not_depend_on_where_the_catalogue_is_stored():
    rows = _product_rows(200)
    moved = [replace(r, images=tuple(f"/mnt/elsewhere{image}" for image in r.images)) for r in rows]
    assert [r.id for r in split_catalog(moved, 0.5)[0]] == [r.id for r in split_catalog(rows, 0.5)[0]]


def _summary(scores: dict[str, tuple[float | None, float | None, float | None]], **tests: float | None) -> dict:
    """A protocol summary with the per-attribute means the headline reads, and the t-tests given as p-values."""
    block = {
        a: {
            "f1": {"mean": f1, "std": 1.0},
            "f1_text": {"mean": text},
            "f1_image": {"mean": image},
            "n_text": None if text is None else 20.0,
            "n_image": None if image is None else 20.0,
        }
        for a, (f1, text, image) in scores.items()
    }
    out: dict[str, Any] = {"runs": 2, "constrained": {"by_attribute": block}}
    for ref, p in tests.items():
        out[f"ttest_vs_{ref}"] = {"t": 1.5, "p": p, "n": 2}
    return out


def test_headline_means_over_attributes_gap_and_p_values():
    results = {
        "domains": {
            "fashion": {
                "text_extractor": _summary(
                    {"Colour": (60.0, 80.0, 40.0), "Pattern": (50.0, 70.0, 30.0)}, tea=0.0123, pv2tea=0.5
                ),
                "tea": _summary(
                    {"Colour": (64.444, 81.116, 47.772), "Pattern": (51.0, 69.0, 33.0)}, text_extractor=0.0456
                ),
                "pv2tea": _summary(
                    {"Colour": (70.0, 75.0, 65.0), "Pattern": (40.0, 50.0, 30.0)}, text_extractor=0.001, tea=None
                ),
                "pv2tea+no_images": _summary({"Colour": (30.0, 30.0, None), "Pattern": (20.0, 20.0, None)}),
            }
        },
        "seconds": 12.345,
        "peak_rss_gb": 1.23456,
    }
    head = catalog_headline(results)["catalog"]
    assert head["overall"]["text_extractor"] == {"f1": 55.0, "f1_text": 75.0, "f1_image": 35.0, "gap": 40.0}
    # means over the two attributes, rounded to 2 decimals; the GAP = F1 on text rows − F1 on image rows
    assert head["overall"]["tea"] == {"f1": 57.72, "f1_text": 75.06, "f1_image": 40.39, "gap": 34.67}
    assert head["overall"]["pv2tea"] == {"f1": 55.0, "f1_text": 62.5, "f1_image": 47.5, "gap": 15.0}
    # no image rows scored: no F1 on them and no GAP (not a 0)
    assert head["overall"]["pv2tea+no_images"] == {"f1": 25.0, "f1_text": 25.0, "f1_image": None, "gap": None}
    # a source with fewer than MIN_SOURCE_ROWS rows per run does not count: its F1 is None, and so is the GAP's term
    few = _summary({"Colour": (60.0, 100.0, 40.0), "Pattern": (50.0, 70.0, 30.0)})
    few["constrained"]["by_attribute"]["Colour"]["n_text"] = 1.0
    head_few = catalog_headline({"domains": {"x": {"pv2tea": few}}})["catalog"]
    assert head_few["overall"]["pv2tea"] == {"f1": 55.0, "f1_text": 70.0, "f1_image": 35.0, "gap": 40.0}
    assert head_few["attributes"]["Colour"]["pv2tea"]["f1_text"] is None
    assert head["attributes"]["Colour"]["tea"] == {"f1": 64.44, "f1_text": 81.12, "f1_image": 47.77}
    assert set(head["attributes"]) == {"Colour", "Pattern"} and set(head["attributes"]["Pattern"]) == set(
        head["overall"]
    )
    # p-values: ttest_vs_text_extractor and ttest_vs_tea of each summary; None where there is no such test
    assert head["p"] == {
        "text_extractor": {"vs_extractor": None, "vs_tea": 0.0123},
        "tea": {"vs_extractor": 0.0456, "vs_tea": None},
        "pv2tea": {"vs_extractor": 0.001, "vs_tea": None},
        "pv2tea+no_images": {"vs_extractor": None, "vs_tea": None},
    }
    assert (head["seconds"], head["peak_rss_gb"]) == (12.3, 1.23)
    assert json.loads(json.dumps(head)) == head  # printable as the last line

    table = format_source_table(results)
    lines = table.splitlines()
    assert lines[2] == "| variant | F1 | F1 text rows | F1 image rows | GAP | p vs extractor | p vs tea |"
    assert lines[4:] == [
        "| text_extractor | 55.0 | 75.0 | 35.0 | 40.0 | – | 0.0123 |",
        "| tea | 57.7 | 75.1 | 40.4 | 34.7 | 0.0456 | – |",
        "| pv2tea | 55.0 | 62.5 | 47.5 | 15.0 | 0.001 | – |",
        "| pv2tea+no_images | 25.0 | 25.0 | – | – | – | – |",
    ]


def test_headline_reads_what_the_protocol_summarizes():
    """From run reports through summarize_runs (the protocol's summary): F1 by source comes from each attribute's
    ``by_source`` block of the ranked (constrained) answers, averaged over runs, then over attributes."""

    def report(colour: tuple[float, float, float], pattern: tuple[float, float, float]) -> dict[str, Any]:
        def attribute(f1: float, text: float, image: float) -> dict[str, Any]:
            sources = {"text": {"f1": text, "n": 12}, "image": {"f1": image, "n": 30}}
            return {"overall": {"f1": f1, "accuracy": f1}, "by_source": sources}

        ranked = {
            "overall": {"f1": 50.0, "accuracy": 50.0, "precision": 50.0, "recall": 50.0},
            "by_attribute": {"Colour": attribute(*colour), "Pattern": attribute(*pattern)},
        }
        free = {**ranked, "by_attribute": {"Colour": attribute(0.0, 0.0, 0.0), "Pattern": attribute(0.0, 0.0, 0.0)}}
        return {**free, "constrained": ranked}

    summary = summarize_runs([report((60.0, 70.0, 50.0), (40.0, 50.0, 30.0)), report((80.0, 90.0, 70.0), (20, 30, 10))])
    head = catalog_headline({"domains": {"x": {"pv2tea": summary}}})["catalog"]
    # Colour: 70 (text 80, image 60); Pattern: 30 (text 40, image 20)
    assert head["overall"]["pv2tea"] == {"f1": 50.0, "f1_text": 60.0, "f1_image": 40.0, "gap": 20.0}
    assert head["attributes"]["Pattern"]["pv2tea"] == {"f1": 30.0, "f1_text": 40.0, "f1_image": 20.0}
    assert head["p"]["pv2tea"] == {"vs_extractor": None, "vs_tea": None} and head["seconds"] == 0.0


def _write_catalogue(folder: Path, n: int = 24) -> Path:
    """``n`` products in pv2tea's row format, two attributes each, gold and source set, a photo per product: the
    colour is named in half the texts ('red') and only hinted at ('crimson') in the others; the pattern is named
    in a third of the texts and painted on the photo."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        colour, pattern = ("Red" if i % 2 else "Blue"), ("Striped" if i % 3 == 0 else "Solid")
        image = Image.new("RGB", (16, 16), COLOURS[colour])
        if pattern == "Striped":
            draw = ImageDraw.Draw(image)
            for y in range(0, 16, 4):
                draw.line([(0, y), (15, y)], fill="white")
        path = folder / "images" / f"{10000 + i}.jpg"
        image.save(path, format="JPEG")
        words = colour.lower() if i % 4 < 2 else SYNONYM[colour]
        text = f"Men shirt model {i} in {words}" + (" with stripes" if i % 6 == 0 else "")
        for attribute, value in (("Colour", colour), ("Pattern", pattern)):
            rows.append(
                {
                    "id": f"{10000 + i}-{attribute.lower()}",
                    "text": text,
                    "images": [str(path)],
                    "category": "Shirts" if i % 4 < 2 else "Tshirts",
                    "attribute": attribute,
                    "gold": [value],
                    "source": "text" if occurs_in(value, text) else "image",
                }
            )
    return write_records(rows, folder / "fashion.jsonl")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return _write_catalogue(tmp_path_factory.mktemp("catalog"))


def test_config_errors(catalogue, tmp_path, capsys):
    for share in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="--text-share must be strictly between 0 and 1"):
            CatalogBenchConfig(data=catalogue, out=tmp_path, text_share=share)
    with pytest.raises(ValueError, match="folds"):
        CatalogBenchConfig(data=catalogue, out=tmp_path, folds=1)
    # through the CLI: exit code 2 and the message, no traceback
    assert main(["bench", "catalog", str(catalogue), "--out", str(tmp_path / "b"), "--text-share", "1"]) == 2
    assert "--text-share must be strictly between 0 and 1, got 1.0" in " ".join(capsys.readouterr().err.split())

    lines = catalogue.read_text().splitlines()
    no_gold = catalogue.with_name("no_gold.jsonl")  # the third row has no gold value (photos beside, as in the file)
    no_gold.write_text("\n".join([*lines[:2], json.dumps({**json.loads(lines[2]), "gold": []}), *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"no_gold.jsonl: row 3 \('10001-colour'\) has no gold value"):
        run_catalog_bench(CatalogBenchConfig(data=no_gold, out=tmp_path / "g"))
    no_images = catalogue.with_name("no_images.jsonl")
    no_images.write_text("".join(json.dumps({**json.loads(line), "images": []}) + "\n" for line in lines))
    with pytest.raises(ValueError, match="no_images.jsonl: no row has an image"):
        run_catalog_bench(CatalogBenchConfig(data=no_images, out=tmp_path / "i"))
    with pytest.raises(ValueError, match="leaves 0 text-labelled"):  # a share that draws no product
        run_catalog_bench(CatalogBenchConfig(data=catalogue, out=tmp_path / "s", text_share=1e-9))
    assert not (tmp_path / "g" / "runs").exists() and not (tmp_path / "i" / "runs").exists()  # failed before training


def test_bench_catalog_end_to_end_and_resume(catalogue, tiny_text_ckpt, tmp_path, capsys, monkeypatch):
    import pv2tea.bench.catalog as catalog_bench

    monkeypatch.setattr(catalog_bench, "MIN_SOURCE_ROWS", 1)  # a micro catalogue: a few rows per source and fold
    out = tmp_path / "bench"
    args = [
        "bench",
        "catalog",
        str(catalogue),
        "--out",
        str(out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--warm-start-epochs",
        "1",
        "--variants",
        "tea,pv2tea",
        "--no-gold-ceiling",
        *[x for o in tiny_overrides(tiny_text_ckpt) if not o.startswith("train.epochs=") for x in ("--set", o)],
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    head = json.loads(printed[-1])
    for name in ("bench.json", "tables.md", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == head
    catalog = head["catalog"]
    expected = {
        "text_extractor",
        "warm_start",
        "tea",
        "pv2tea",
        "pv2tea+no_images",
        "tea+extractor",
        "pv2tea+extractor",
        "tea+calibrated",
        "pv2tea+calibrated",
    }
    assert expected <= set(catalog["overall"]) and "pv2tea_gold" not in catalog["overall"]
    for name, scores in catalog["overall"].items():
        assert scores["f1"] is not None and 0.0 <= scores["f1"] <= 100.0, name
        for key in ("f1_text", "f1_image"):
            assert scores[key] is None or 0.0 <= scores[key] <= 100.0, (name, key)
        both = [
            a[name]["f1_text"] - a[name]["f1_image"]
            for a in catalog["attributes"].values()
            if a[name]["f1_text"] is not None and a[name]["f1_image"] is not None
        ]  # the GAP: over the attributes with rows of both sources
        assert scores["gap"] == (pytest.approx(sum(both) / len(both), abs=0.011) if both else None), name
    assert set(catalog["attributes"]) == {"Colour", "Pattern"}
    assert catalog["p"]["tea"]["vs_tea"] is None and set(catalog["p"]) == set(catalog["overall"])
    assert catalog["seconds"] > 0 and catalog["peak_rss_gb"] > 0
    assert set(catalog["rows_per_s"]) == {"warm_start", "tea", "pv2tea"}
    assert all(rate > 0 for rate in catalog["rows_per_s"].values())
    # no text names the pattern ('stripes' is not 'Striped'): no F1 on text rows, and the GAP left out
    assert all(v["f1_text"] is None for v in catalog["attributes"]["Pattern"].values())
    assert all(v["f1_image"] is not None for v in catalog["attributes"]["Pattern"].values())

    saved = json.loads((out / "bench.json").read_text())
    (summaries,) = saved["domains"].values()
    assert list(saved["domains"]) == ["fashion"]  # the file's stem names the catalogue
    assert summaries["pv2tea"]["runs"] == 2 and summaries["tea+calibrated"]["runs"] == 2  # 2 folds, 1 seed
    assert catalog_headline(saved) == head
    split = saved["split"]
    assert split["text_rows"] + split["catalogue_rows"] == 48 and split["text_rows"] % 2 == 0
    assert set(split["candidates"]) == {"Colour", "Pattern"}
    assert saved["config"]["fold_score"] == "attribute_mean" and saved["config"]["text_share"] == 0.5
    tables = (out / "tables.md").read_text()
    assert tables.startswith("### fashion") and format_source_table(saved) in tables
    assert format_source_table(saved).splitlines()[-1] in printed  # the tables are printed before the JSON line

    runs = out / "runs"
    run_cfg = yaml.safe_load((runs / "fold_1" / "pv2tea" / "seed_0" / "config.yaml").read_text())
    assert run_cfg["train"]["epochs"] == 1 and run_cfg["train"]["warm_start"] == str(runs / "warm_start" / "final")
    pre_cfg = yaml.safe_load((runs / "warm_start" / "config.yaml").read_text())
    assert pre_cfg["train"]["epochs"] == 1 and pre_cfg["vision"]["enabled"] is False
    models = sorted(runs.glob("**/final/model.safetensors"))
    reports = sorted(runs.glob("fold_*/*/seed_0/test_report.json"))
    assert [p.relative_to(runs).parts[:2] for p in models] == [
        ("fold_0", "pv2tea"),
        ("fold_0", "tea"),
        ("fold_1", "pv2tea"),
        ("fold_1", "tea"),
        ("warm_start", "final"),
    ]
    assert len(reports) == 4
    stamps = [p.stat().st_mtime_ns for p in [*models, *reports]]
    assert main(args) == 0  # re-run: every finished run and the warm start are reused, nothing retrains
    assert [p.stat().st_mtime_ns for p in [*models, *reports]] == stamps
    captured = capsys.readouterr()
    assert "text pretraining" not in captured.err and "soft labels:" not in captured.err
    again = json.loads(captured.out.strip().splitlines()[-1])["catalog"]
    assert {k: v for k, v in again.items() if k not in ("seconds", "peak_rss_gb")} == {
        k: v for k, v in catalog.items() if k not in ("seconds", "peak_rss_gb")
    }


def test_training_rates_count_the_rows_of_finished_epochs_per_second(tmp_path):
    from pv2tea.bench.catalog import training_rates

    def run(folder, batch, accumulation, epochs):
        folder.mkdir(parents=True)
        train = {"train": {"batch_size": batch, "grad_accumulation_steps": accumulation}}
        (folder / "config.yaml").write_text(yaml.safe_dump(train))
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in epochs) + "\n")

    run(tmp_path / "warm_start", 16, 1, [{"epoch": 1, "step": 10, "finished": True, "seconds": 4.0}])
    for k in range(2):  # two folds of one variant pool their rows and seconds
        run(
            tmp_path / f"fold_{k}" / "pv2tea" / "seed_0",
            8,
            2,
            [
                {"epoch": 1, "step": 5, "finished": True, "seconds": 2.0},
                {"epoch": 2, "step": 8, "finished": True, "seconds": 1.0 + k},
                {"epoch": 3, "step": 9, "finished": False, "seconds": 9.0},  # an unfinished epoch is left out
            ],
        )
    (tmp_path / "fold_0" / "tea" / "seed_0").mkdir(parents=True)
    (tmp_path / "fold_0" / "tea" / "seed_0" / "metrics.jsonl").write_text("not json\n")  # unreadable: left out
    rates = training_rates(tmp_path)
    assert rates == {"pv2tea": round(2 * 8 * 16 / 7.0, 1), "warm_start": 40.0}


def test_sample_products_keeps_whole_products_and_is_stable():
    from pv2tea.bench.catalog import sample_products

    rows = _product_rows(100)
    kept = sample_products(rows, 30)
    assert len({r.images[0] for r in kept}) == 30 and len(kept) == 60  # both rows of each product
    assert sample_products(rows, 30) == kept
    moved = [replace(r, images=tuple(f"/elsewhere{image}" for image in r.images)) for r in rows]
    assert [r.id for r in sample_products(moved, 30)] == [r.id for r in kept]
    assert sample_products(rows, 1000) == rows


def test_a_saved_extractor_or_warm_start_of_other_rows_is_not_reused(tmp_path, tiny_text_ckpt):
    from pv2tea.bench.protocol import ProtocolConfig, _text_extractor, _train_warm_start

    rows = [replace(r, images=(), label=r.gold) for r in _product_rows(20)]
    first = _text_extractor(rows, tmp_path / "extractor")
    again = _text_extractor(rows, tmp_path / "extractor")
    assert again.predict(rows) == first.predict(rows)
    flipped = [
        replace(r, label=("Blue",) if r.gold == ("Red",) else ("Red",)) if r.attribute == "Colour" else r for r in rows
    ]
    retrained = _text_extractor(flipped, tmp_path / "extractor")  # other rows: trained again, not reloaded
    colour = [i for i, r in enumerate(rows) if r.attribute == "Colour"]
    assert [retrained.predict(rows)[i] for i in colour] != [first.predict(rows)[i] for i in colour]

    folder = tmp_path / "warm"
    folder.mkdir()
    (folder / "rows_sha256").write_text("0" * 64)
    with pytest.raises(ValueError, match="other text-only rows"):
        _train_warm_start(
            rows, folder, ProtocolConfig(warm_start_epochs=1, config=None), tiny_overrides(tiny_text_ckpt), print
        )
