"""Readers and writers: lossless round trips, cell conventions, relocatable image paths."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pv2tea.data.readers import parse_list_cell, read_table, write_records
from pv2tea.data.schema import DataValidationError, Record, Unparsable
from pv2tea.data.validate import load_dataset, validate_file

FORMATS = ("jsonl", "csv", "parquet")


@pytest.fixture
def records(tmp_path: Path) -> list[Record]:
    catalog = tmp_path / "catalog"
    for name in ("a.png", "b.png", "c.png"):
        (catalog / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 200, 30)).save(catalog / "img" / name)
    outside = tmp_path / "shared" / "d.png"
    outside.parent.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    img = str(catalog / "img")
    return [
        Record(
            "p1-color",
            'Red, "Blue" | Green\nMug, 12 oz',
            (f"{img}/a.png", f"{img}/b.png"),
            "mug",
            "color",
            ("red", "blue", "green"),
            ("red", "blue"),
            "text",
        ),
        Record("p1-pattern", "Plain mug", (f"{img}/c.png", str(outside)), "mug", "pattern", ("solid",), None, None),
        Record(
            "p2-color",
            "Text-only tee – ünïcode",
            (),
            "t-shirt",
            "color",
            ("black|white",),
            ("[odd]",),
            "image",
            label_weight=0.8125,
        ),
        Record("p3-color", "Gold label", (), "t-shirt", "color", ("red",), None, None, label_weight=0.0),
        Record(
            "p4-color",
            "Soft label",
            (),
            "t-shirt",
            "color",
            ("red",),
            label_probs=(("red", 0.625), ("navy blue", 0.25), ("ü", 0.125)),
        ),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_lossless(tmp_path: Path, records: list[Record], fmt: str) -> None:
    first = write_records(records, tmp_path / "catalog" / f"data.{fmt}")
    loaded = load_dataset(first).records
    assert loaded == records
    # Writing the loaded records elsewhere keeps them identical too.
    second = write_records(loaded, tmp_path / "elsewhere" / f"copy.{fmt}")
    assert load_dataset(second).records == records


@pytest.mark.parametrize("fmt", FORMATS)
def test_images_inside_the_output_dir_are_written_relative(tmp_path: Path, records: list[Record], fmt: str) -> None:
    write_records(records, tmp_path / "catalog" / f"data.{fmt}")
    rows = read_table(tmp_path / "catalog" / f"data.{fmt}")
    assert list(rows[0]["images"]) == ["img/a.png", "img/b.png"]
    assert list(rows[1]["images"]) == ["img/c.png", str(tmp_path / "shared" / "d.png")]
    shutil.move(tmp_path / "catalog", tmp_path / "moved")
    moved = load_dataset(tmp_path / "moved" / f"data.{fmt}").records
    img = tmp_path / "moved" / "img"
    assert moved[0].images == (str(img / "a.png"), str(img / "b.png"))


def test_csv_cells_accept_pipes_json_lists_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "id,text,images,category,attribute,label,gold,source\n"
        'a,"Mug, white",,mug,color,red|blue,,\n'
        'b,Tee,,t-shirt,color,"[""x|y""]","[""x|y""]",text\n'
        'c,Vase,,vase,color,"[broken",,\n'
        "d,Rug,,rug,color,red||blue,,\n",
        encoding="utf-8",
    )
    rows = read_table(path)
    assert rows[0] == {
        "id": "a",
        "text": "Mug, white",
        "images": [],
        "category": "mug",
        "attribute": "color",
        "label": ["red", "blue"],
        "gold": None,
        "source": None,
    }
    assert rows[1]["label"] == ["x|y"] and rows[1]["gold"] == ["x|y"]
    errors = validate_file(path)
    assert [(e.row, e.field) for e in errors] == [(3, "label"), (4, "label")]
    assert "not a valid JSON list" in errors[0].message
    assert "value 2 is an empty string" in errors[1].message


def test_parquet_string_columns_and_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table(
        {
            "id": ["a", "b"],
            "text": ["Red mug", None],
            "images": ["", ""],
            "category": ["mug", "mug"],
            "attribute": ["color", "color"],
            "label": ["red|blue", '["green"]'],
            "gold": [None, ""],
        }
    )
    pq.write_table(table, path)
    rows = read_table(path)
    assert rows[0]["label"] == ["red", "blue"] and rows[0]["images"] == []
    assert rows[0]["gold"] is None
    (error,) = validate_file(path)
    assert (error.row, error.field, error.message) == (2, "text", "missing required field 'text'")


def test_parse_list_cell() -> None:
    assert parse_list_cell("  ") == []
    assert parse_list_cell("a | b") == ["a", "b"]
    assert parse_list_cell('["a", "b"]') == ["a", "b"]
    assert parse_list_cell('{"a": 1}') == ['{"a": 1}']  # not a list: one value
    assert isinstance(parse_list_cell("[1, 2"), Unparsable)


def test_write_dicts_and_reject_unknown_fields(tmp_path: Path) -> None:
    path = write_records(
        [{"id": "a", "text": "t", "category": "mug", "attribute": "color", "label": "red"}],
        tmp_path / "d.jsonl",
    )
    (record,) = load_dataset(path).records
    assert record.label == ("red",) and record.images == () and record.gold is None
    with pytest.raises(ValueError, match="lable"):
        write_records([{"id": "a", "lable": ["red"]}], tmp_path / "e.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_weight_written_as_a_number_and_checked(tmp_path: Path, fmt: str) -> None:
    import numpy as np

    row = {"id": "a", "text": "t", "category": "mug", "attribute": "color", "label": "red"}
    path = write_records(
        [{**row, "label_weight": np.float32(0.5)}, {**row, "id": "b", "label_weight": "0.25"}], tmp_path / f"d.{fmt}"
    )
    assert [r.label_weight for r in load_dataset(path).records] == [0.5, 0.25]
    for bad in (1.5, "high"):
        with pytest.raises(ValueError, match=r"label_weight .* of row 'a': expected a number in \[0, 1\]"):
            write_records([{**row, "label_weight": bad}], tmp_path / f"e.{fmt}")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.xlsx"):
        read_table(tmp_path / "data.xlsx")
    with pytest.raises(ValueError, match=r"data\.txt"):
        write_records([], tmp_path / "data.txt")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_table(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_bad_soft_label_names_its_row_and_field(tmp_path: Path, fmt: str) -> None:
    probs = [{"red": 0.5}, {"red": 1.5}, {"": 0.2}, {"red": "high"}, "not json"]
    rows = [
        {"id": f"r{i}", "text": "t", "category": "mug", "attribute": "color", "label": "red", "label_probs": p}
        for i, p in enumerate(probs)
    ]
    path = tmp_path / f"bad.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                p = row["label_probs"]
                writer.writerow({**row, "label_probs": p if isinstance(p, str) else json.dumps(p)})
    with pytest.raises(DataValidationError) as caught:
        load_dataset(path)
    messages = [str(e) for e in caught.value.errors]
    assert len(messages) == 4, messages
    assert "row 2, field 'label_probs'" in messages[0] and "1.5" in messages[0]
    assert "row 3, field 'label_probs'" in messages[1] and "non-empty string" in messages[1]
    assert "row 4, field 'label_probs'" in messages[2] and "'high'" in messages[2]
    assert "row 5, field 'label_probs'" in messages[3] and "JSON object" in messages[3]


def test_soft_labels_are_merged_and_checked_on_write(tmp_path: Path) -> None:
    row = Record("a", "t", (), "mug", "color", ("red",), label_probs=(("red", 0.5), ("red", 0.25), ("blue", 0.25)))
    (back,) = load_dataset(write_records([row], tmp_path / "a.jsonl")).records
    assert dict(back.label_probs) == {"red": 0.75, "blue": 0.25}  # a repeated value summed, as training does
    bad = Record("b", "t", (), "mug", "color", ("red",), label_probs=(("red", 1.5),))
    with pytest.raises(ValueError, match="label_probs of row 'b'.*'red' is not in"):
        write_records([bad], tmp_path / "b.csv")
    assert not (tmp_path / "b.csv").exists()
