"""Fashion Product Images import: rows per (product, attribute), sources, HTML, rare values, skips, the styles.csv
fallback and the CLI, on a twelve-product copy of Kaggle's layout built in tmp_path (and on the real copy if present).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SHARED
from pv2tea.cli import app
from pv2tea.data.fashion import (
    COLOUR_ATTRIBUTE,
    DEFAULT_ATTRIBUTES,
    FashionImportConfig,
    html_to_text,
    import_fashion_product_images,
    manifest_path,
)
from pv2tea.data.validate import load_dataset

# The shared folder next to the repository (conftest.SHARED); PV2TEA_SHARED points the test at another copy.
REAL_ROOT = Path(os.environ.get("PV2TEA_SHARED") or SHARED) / "datasets" / "fashion-product-images"

CSV_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def _style(
    product_id: int,
    title: str,
    article_type: str,
    colour: str,
    attributes: dict[str, str] | None = None,
    descriptions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A style JSON as the real files hold it (the keys the shared copy keeps), HTML descriptions included."""
    data: dict[str, Any] = {
        "id": product_id,
        "productDisplayName": title,
        "variantName": title.upper()[:12],
        "brandName": title.split()[0],
        "ageGroup": "Adults-Men",
        "gender": "Men",
        "baseColour": colour,
        "colour1": "NA",
        "colour2": "NA",
        "season": "Summer",
        "year": "2012",
        "usage": "Casual",
        "masterCategory": {"typeName": "Apparel"},
        "subCategory": {"typeName": "Topwear"},
        "articleType": {"typeName": article_type},
    }
    if attributes is not None:
        data["articleAttributes"] = attributes
    if descriptions:
        data["productDescriptors"] = {
            kind: {"descriptorType": kind, "value": html} for kind, html in descriptions.items()
        }
    return {"data": data}


STYLES = [
    _style(
        10001,
        "Roadster Men Navy Blue Checked Shirt",
        "Shirts",
        "Navy Blue",
        {"Pattern": "Checked", "Sleeve Length": "Long Sleeves", "Fit": "Slim Fit", "Neck": "NA", "Wash Care": "Hand"},
        {
            # "Slim Fit" is written with an entity and "Long Sleeves" across a <br />: found only once HTML is read
            "description": "<p>A <strong>slim&nbsp;fit</strong> shirt &amp; tie<br />Long sleeves, button cuffs</p>",
            "materials_care_desc": "100% cotton<br>Hand wash",
        },
    ),
    _style(10002, "Roadster Men Striped Shirt", "Shirts", "Navy Blue", {"Pattern": "Striped", "Neck": "na"}),
    _style(
        10003,
        "Puma Men Black T-shirt",
        "Tshirts",
        "Black",
        {"Pattern": "Solid", "Neck": "Round Neck"},
        {"description": "<ul><li>Round&#32;neck</li><li>Regular fit</li></ul>"},
    ),
    _style(10004, "Puma Men Sports T-shirt", "Tshirts", "Black", {"Pattern": "Solid", "Neck": "Round Neck"}),
    _style(10005, "Nike Men Navy Blue Polo", "Tshirts", "Navy Blue", {"Pattern": "Solid", "Neck": "Polo Collar"}),
    _style(10006, "Adidas Men White Sneakers", "Casual Shoes", "White", {"Toe Shape": "Round Toe"}),
    _style(10007, "Vans Men Old Skool Shoes", "Casual Shoes", "Black", {"Toe Shape": "Round Toe"}),
    _style(10008, "Baggit Women Handbag", "Handbags", "Pink"),  # no articleAttributes at all
    _style(10010, "Nike Men Grey Track Pants", "Track Pants", "Grey", {"Pattern": "Solid"}),  # its photo is missing
    _style(10011, "Kook N Keech Printed T-shirt", "Tshirts", "NA", {"Pattern": "Printed"}),  # colour absent
    _style(10012, "Wrogn Men Pink Shirt", "Shirts", " Pink ", {"Pattern": "Solid"}),  # spaces around a value
]
PHOTO_MISSING = 10010
BROKEN = 10009  # styles/10009.json is cut off in the middle

# the rows with DEFAULT_ATTRIBUTES and min_products=1 (the NA values, "Wash Care" and the skipped products left out)
DEFAULT_ROWS = {
    "10001-base-colour",
    "10001-pattern",
    "10001-sleeve-length",
    "10001-fit",
    "10002-base-colour",
    "10002-pattern",
    "10003-base-colour",
    "10003-pattern",
    "10003-neck",
    "10004-base-colour",
    "10004-pattern",
    "10004-neck",
    "10005-base-colour",
    "10005-pattern",
    "10005-neck",
    "10006-base-colour",
    "10006-toe-shape",
    "10007-base-colour",
    "10007-toe-shape",
    "10008-base-colour",
    "10011-pattern",
    "10012-base-colour",
    "10012-pattern",
}


def _write_catalogue(root: Path) -> Path:
    """The twelve products in Kaggle's layout: styles/<id>.json, images/<id>.jpg (PNG and JPEG bytes), styles.csv."""
    (root / "styles").mkdir(parents=True)
    (root / "images").mkdir()
    csv_lines = [CSV_HEADER]
    for i, style in enumerate(STYLES):
        data = style["data"]
        (root / "styles" / f"{data['id']}.json").write_text(json.dumps(style), encoding="utf-8")
        if data["id"] != PHOTO_MISSING:
            image = Image.new("RGB", (12, 16), (40 * (i % 6), 90, 200 - 15 * i))
            image.save(root / "images" / f"{data['id']}.jpg", format="PNG" if i % 2 else "JPEG")
        csv_lines.append(
            f"{data['id']},Men,Apparel,Topwear,{data['articleType']['typeName']},{data['baseColour'].strip()},"
            f"Summer,2012,Casual,{data['productDisplayName']}"
        )
    (root / "styles" / f"{BROKEN}.json").write_text('{"data": {"id": 10009, "productDisplayName": "Cut', "utf-8")
    Image.new("RGB", (12, 16), "red").save(root / "images" / f"{BROKEN}.jpg", format="JPEG")
    (root / "styles.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    return _write_catalogue(tmp_path / "fashion")


def _run(root: Path, out: Path, **settings: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Import with ``settings``; returns (rows by id, as written, and the manifest)."""
    settings.setdefault("min_products", 1)
    manifest = import_fashion_product_images(FashionImportConfig(root=root, out=out, **settings))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows)  # ids are unique
    assert json.loads(manifest_path(out).read_text(encoding="utf-8")) == manifest
    return by_id, manifest


def _photo(out: Path, row: dict[str, Any]) -> Path:
    """The row's photo as a file (the writer keeps a path under the output's folder relative to it)."""
    (image,) = row["images"]
    path = (out.parent / image).resolve()
    assert path.is_file(), image
    return path


def test_html_to_text_decodes_entities_and_breaks_blocks() -> None:
    assert html_to_text("<p>Soft&nbsp;cotton &amp; linen<br/>Machine wash</p>") == "Soft cotton & linen. Machine wash"
    assert html_to_text("<p><strong>Wash Care</strong><br /> <span>Wash cold<br /> Dry flat</span></p>") == (
        "Wash Care. Wash cold. Dry flat"
    )
    assert html_to_text("<ul><li>One</li><li>Two</li></ul>") == "One. Two"
    assert html_to_text("Made in India.<br>Dry clean") == "Made in India. Dry clean"  # no ". ." after a full stop
    assert html_to_text("a &lt;b&gt; &quot;x&quot; caf&eacute;") == 'a <b> "x" café'
    assert html_to_text("<br><br/><p></p>") == ""


def test_rows_per_product_and_attribute(catalogue: Path, tmp_path: Path) -> None:
    out = tmp_path / "fashion.jsonl"
    rows, manifest = _run(catalogue, out)
    assert set(rows) == DEFAULT_ROWS
    shirt = rows["10001-sleeve-length"]
    assert shirt["attribute"] == "Sleeve Length" and shirt["gold"] == ["Long Sleeves"]
    assert shirt["category"] == "Shirts"  # articleType.typeName
    assert rows["10006-toe-shape"]["category"] == "Casual Shoes"
    assert rows["10012-base-colour"]["gold"] == ["Pink"]  # whitespace around a value is dropped
    assert rows["10001-base-colour"]["attribute"] == COLOUR_ATTRIBUTE == "Base Colour"
    for row in rows.values():
        assert not row.get("label")  # weak labels come later, from a text extractor
        assert _photo(out, row) == (catalogue / "images" / f"{row['id'].split('-')[0]}.jpg").resolve()
    # the file is a valid pv2tea dataset without labels (photos decoded, gold and source read back)
    records = load_dataset(out, require_label=False).records
    assert {r.id: (r.gold, r.source) for r in records} == {
        i: (tuple(row["gold"]), row["source"]) for i, row in rows.items()
    }
    assert manifest["products"] == 10 and manifest["rows"] == len(DEFAULT_ROWS)
    assert manifest["text"] == "full" and manifest["min_products"] == 1
    colour = manifest["attributes"]["Base Colour"]
    assert colour["rows"] == 9 and colour["values"] == ["Black", "Navy Blue", "Pink", "White"]
    assert colour["text"] + colour["image"] == 9
    # asked for by default but held by no product here
    assert manifest["attributes_not_found"] == ["Collar", "Fabric", "Length", "Occasion", "Type"]
    assert list(manifest["attributes"]) == ["Base Colour", "Pattern", "Neck", "Toe Shape", "Sleeve Length", "Fit"]


def test_source_follows_the_text_setting(catalogue: Path, tmp_path: Path) -> None:
    full, full_manifest = _run(catalogue, tmp_path / "full.jsonl", text="full")
    title, title_manifest = _run(catalogue, tmp_path / "title.jsonl", text="title")
    assert set(full) == set(title) == DEFAULT_ROWS  # the text setting changes text and source only
    # the title and the descriptions, their HTML read: the entity, the tags and the <br /> are gone
    assert full["10001-fit"]["text"] == (
        "Roadster Men Navy Blue Checked Shirt. A slim fit shirt & tie. Long sleeves, button cuffs. 100% cotton. "
        "Hand wash"
    )
    assert "<" not in full["10003-neck"]["text"] and "&" not in full["10003-neck"]["text"]
    assert full["10003-neck"]["text"] == "Puma Men Black T-shirt. Round neck. Regular fit"
    assert all(row["text"] == row_title for row, row_title in [(title[i], _title(i)) for i in title])
    assert full["10002-pattern"]["text"] == "Roadster Men Striped Shirt"  # no description: the title alone
    # in the description only: a text value with it, an image value without it
    for row_id in ("10001-sleeve-length", "10001-fit", "10003-neck"):
        assert (full[row_id]["source"], title[row_id]["source"]) == ("text", "image"), row_id
    # in the title: text either way; in neither: image either way
    for row_id in ("10001-base-colour", "10001-pattern", "10002-pattern", "10011-pattern", "10012-base-colour"):
        assert full[row_id]["source"] == title[row_id]["source"] == "text", row_id
    for row_id in ("10003-pattern", "10004-neck", "10005-neck", "10006-toe-shape", "10007-base-colour"):
        assert full[row_id]["source"] == title[row_id]["source"] == "image", row_id
    assert full_manifest["attributes"]["Fit"] == {
        "rows": 1,
        "text": 1,
        "image": 0,
        "values": ["Slim Fit"],
        "rare_value_rows": 0,
    }
    assert (title_manifest["attributes"]["Fit"]["text"], title_manifest["attributes"]["Fit"]["image"]) == (0, 1)
    assert title_manifest["text"] == "title"


def _title(row_id: str) -> str:
    product = int(row_id.split("-")[0])
    return next(s["data"]["productDisplayName"] for s in STYLES if s["data"]["id"] == product)


def test_min_products_drops_rare_values_and_counts_them(catalogue: Path, tmp_path: Path) -> None:
    rows, manifest = _run(catalogue, tmp_path / "out.jsonl", min_products=2)
    colour = manifest["attributes"]["Base Colour"]
    # Navy Blue and Black: 3 products each; Pink: 2 (" Pink " is Pink); White: 1 (dropped)
    assert colour["values"] == ["Black", "Navy Blue", "Pink"] and colour["rare_value_rows"] == 1
    assert "10006-base-colour" not in rows and "10006-toe-shape" in rows  # the product keeps its other rows
    assert manifest["attributes"]["Neck"]["values"] == ["Round Neck"]  # "Polo Collar": one product
    assert manifest["attributes"]["Neck"]["rare_value_rows"] == 1
    assert "10005-neck" not in rows
    assert manifest["attributes"]["Pattern"]["rare_value_rows"] == 3  # Checked, Striped, Printed
    assert {row["gold"][0] for row in rows.values() if row["attribute"] == "Pattern"} == {"Solid"}
    assert manifest["rows"] == len(rows) == len(DEFAULT_ROWS) - 1 - 1 - 3 - 2  # and Fit, Sleeve Length: 1 each
    assert manifest["products"] == 9  # 10011's one row (Pattern: Printed) was rare
    # an attribute whose every value is rare keeps its entry, so that its dropped rows are counted too
    for attribute in ("Fit", "Sleeve Length"):
        assert manifest["attributes"][attribute] == {
            "rows": 0,
            "text": 0,
            "image": 0,
            "values": [],
            "rare_value_rows": 1,
        }, attribute
        assert not any(row["attribute"] == attribute for row in rows.values())
    assert sum(a["rare_value_rows"] for a in manifest["attributes"].values()) == len(DEFAULT_ROWS) - len(rows)
    assert all(row["gold"][0] in manifest["attributes"][row["attribute"]]["values"] for row in rows.values())


def test_all_attributes_and_a_chosen_few(catalogue: Path, tmp_path: Path) -> None:
    everything, manifest = _run(catalogue, tmp_path / "all.jsonl", attributes=None)
    assert set(everything) == DEFAULT_ROWS | {"10001-wash-care"}  # an attribute outside the default list
    assert everything["10001-wash-care"]["gold"] == ["Hand"]
    assert manifest["attributes_not_found"] == []
    few, few_manifest = _run(catalogue, tmp_path / "few.jsonl", attributes=("Neck", "Toe Shape", "Collar"))
    assert set(few) == {r for r in DEFAULT_ROWS if r.endswith(("-neck", "-toe-shape"))}
    assert few_manifest["attributes_not_found"] == ["Collar"] and few_manifest["products"] == 5


def test_broken_json_and_missing_photo_are_counted_skips(catalogue: Path, tmp_path: Path) -> None:
    rows, manifest = _run(catalogue, tmp_path / "out.jsonl")
    assert not any(r.startswith((f"{BROKEN}-", f"{PHOTO_MISSING}-")) for r in rows)
    assert manifest["n_skipped"] == 2
    by_field = {s["field"]: s for s in manifest["skipped"]}
    assert set(by_field) == {"data", "images"}
    assert Path(by_field["data"]["file"]) == catalogue / "styles" / f"{BROKEN}.json"
    assert "not a readable style JSON" in by_field["data"]["message"]
    assert Path(by_field["images"]["file"]) == catalogue / "images" / f"{PHOTO_MISSING}.jpg"
    assert by_field["images"]["message"] == "photo not found"
    # a JSON without its "data" object and one without an article type are skipped the same way
    (catalogue / "styles" / "10002.json").write_text(json.dumps({"meta": {}}), encoding="utf-8")
    no_type = _style(10004, "Puma Men Sports T-shirt", "", "Black", {"Pattern": "Solid"})
    (catalogue / "styles" / "10004.json").write_text(json.dumps(no_type), encoding="utf-8")
    rows, manifest = _run(catalogue, tmp_path / "again.jsonl")
    assert manifest["n_skipped"] == 4 and manifest["products"] == 8
    assert {(Path(s["file"]).name, s["field"]) for s in manifest["skipped"]} == {
        ("10002.json", "data"),
        ("10004.json", "articleType"),
        (f"{BROKEN}.json", "data"),
        (f"{PHOTO_MISSING}.jpg", "images"),
    }


def test_limit_reads_the_first_products_by_id(catalogue: Path, tmp_path: Path) -> None:
    rows, manifest = _run(catalogue, tmp_path / "out.jsonl", limit=3)
    assert {r.split("-")[0] for r in rows} == {"10001", "10002", "10003"}
    assert manifest["products"] == 3 and manifest["n_skipped"] == 0


def test_styles_csv_alone(catalogue: Path, tmp_path: Path) -> None:
    """Without styles/, styles.csv is read: the colour only, the title and article type from its columns; a Kaggle
    row whose name holds an unquoted comma keeps it in the name; a row with too few cells is a counted skip."""
    shutil.rmtree(catalogue / "styles")
    table = catalogue / "styles.csv"
    lines = table.read_text(encoding="utf-8").splitlines()
    lines[4] = "10004,Men,Apparel,Topwear,Tshirts,Black,Summer,2012,Sports,Puma Men Black, Grey Sports T-shirt"
    lines.append("10013,Men,Apparel")  # cut short
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, manifest = _run(catalogue, tmp_path / "out.jsonl", attributes=None)
    assert {r.split("-", 1)[1] for r in rows} == {"base-colour"}
    # 10011's colour is NA in the table too; 10010 has no photo; the JSON-only product 10009 is not in the table
    assert set(rows) == {f"{i}-base-colour" for i in (10001, 10002, 10003, 10004, 10005, 10006, 10007, 10008, 10012)}
    comma = rows["10004-base-colour"]
    assert comma["text"] == "Puma Men Black, Grey Sports T-shirt" and comma["gold"] == ["Black"]
    assert comma["category"] == "Tshirts" and comma["source"] == "text"
    assert rows["10006-base-colour"]["source"] == "text" and rows["10007-base-colour"]["source"] == "image"
    assert manifest["products"] == 9 and manifest["n_skipped"] == 2
    by_field = {s["field"]: s for s in manifest["skipped"]}
    assert Path(by_field["row"]["file"]) == table and by_field["row"]["row"] == 12
    assert "3 cells" in by_field["row"]["message"]
    assert Path(by_field["images"]["file"]).name == f"{PHOTO_MISSING}.jpg"


def test_nothing_left_is_a_value_error(catalogue: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="no row to write"):
        import_fashion_product_images(FashionImportConfig(root=catalogue, out=out, attributes=("Collar",)))
    with pytest.raises(ValueError, match="min_products=50"):  # every value rarer than asked
        import_fashion_product_images(FashionImportConfig(root=catalogue, out=out, min_products=50))
    assert not out.exists() and not manifest_path(out).exists()
    assert list(tmp_path.iterdir()) == [catalogue]  # no partial file left behind
    with pytest.raises(ValueError, match="text must be one of"):
        FashionImportConfig(root=catalogue, out=out, text="description")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_products"):
        FashionImportConfig(root=catalogue, out=out, min_products=0)
    assert FashionImportConfig(root=catalogue, out=out).attributes == DEFAULT_ATTRIBUTES


def test_cli_prints_the_table_and_fails_in_one_line(catalogue: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fashion.jsonl"
    command = ["data", "import", "fashion-product-images", str(catalogue), "--out", str(out)]
    result = runner.invoke(app, [*command, "--min-products", "2", "--text", "title"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    assert manifest["text"] == "title" and manifest["min_products"] == 2
    table = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 6
    }
    colour = manifest["attributes"]["Base Colour"]
    assert table["Base Colour"] == [str(colour[k]) for k in ("rows", "text", "image")] + ["3", "1"]
    assert table["Pattern"] == [str(manifest["attributes"]["Pattern"][k]) for k in ("rows", "text", "image")] + [
        "1",
        "3",
    ]
    assert (
        f"{manifest['rows']} rows of 9 products; 2 product(s) skipped; "
        "attributes not found: Collar, Fabric, Length, Occasion, Type"
    ) in (" ".join(result.stdout.split()))
    assert f"wrote {out}" in " ".join(result.stderr.split())
    # --attributes: a list, or all
    result = runner.invoke(app, [*command, "--min-products", "1", "--attributes", "Toe Shape, Neck"])
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["attribute"] for line in out.read_text().splitlines()} == {"Toe Shape", "Neck"}
    result = runner.invoke(app, [*command, "--min-products", "1", "--attributes", "all"])
    assert result.exit_code == 0 and "Wash Care" in result.stdout
    # a folder that is not a catalogue: exit 2, one line naming it, no traceback
    empty = tmp_path / "not_a_catalogue"
    empty.mkdir()
    result = runner.invoke(
        app, ["data", "import", "fashion-product-images", str(empty), "--out", str(tmp_path / "x.jsonl")]
    )
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert message.startswith("error:") and str(empty) in message and "styles.csv" in message
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.skipif(
    not REAL_ROOT.is_dir(), reason=f"no Fashion Product Images copy at {REAL_ROOT} (set PV2TEA_SHARED to its folder)"
)
def test_real_copy_first_200_products(tmp_path: Path) -> None:
    out = tmp_path / "fashion.jsonl"
    rows, manifest = _run(REAL_ROOT, out, limit=200, min_products=5)
    assert manifest["n_skipped"] == 0 and 150 <= manifest["products"] <= 200
    assert manifest["rows"] == len(rows) > manifest["products"]  # the colour and at least some article attributes
    assert set(manifest["attributes"]) <= set(DEFAULT_ATTRIBUTES) and "Base Colour" in manifest["attributes"]
    assert {"Pattern", "Sleeve Length"} <= set(manifest["attributes"])
    ids = {int(r.split("-")[0]) for r in rows}
    assert min(ids) >= 10000 and max(ids) < 10000 + 200 + 50  # the first products by id
    for row in rows.values():
        assert row["gold"] and row["gold"][0].casefold() not in {"na", ""} and row["category"]
        assert row["source"] in {"text", "image"} and _photo(out, row).parent == (REAL_ROOT / "images").resolve()
        assert "<" not in row["text"] and "&nbsp;" not in row["text"]
    sources = [row["source"] for row in rows.values()]
    assert 0 < sources.count("text") < len(sources)  # both sources occur
    for entry in manifest["attributes"].values():
        assert entry["rows"] == entry["text"] + entry["image"]
        assert bool(entry["values"]) == (entry["rows"] > 0) and (entry["rows"] or entry["rare_value_rows"])
    records = load_dataset(out, require_label=False).records
    assert len(records) == manifest["rows"]
