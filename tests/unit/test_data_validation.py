"""Validation of dataset files: every check reports its file, row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from pv2tea.data.images import ImageLoadError, check_image, load_rgb
from pv2tea.data.schema import DataValidationError, Record, RowError
from pv2tea.data.validate import load_dataset, validate_file, validate_rows


def _png(path: Path, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _row(index: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "id": f"p{index}-color",
        "text": f"Product {index} ceramic mug",
        "images": ["img/ok.png"],
        "category": "mug",
        "attribute": "color",
        "label": ["red"],
    }
    row.update(overrides)
    return row


def _write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "ok.png")
    _png(tmp_path / "img" / "second.png")
    (tmp_path / "img" / "notes.jpg").write_text("just some text, not an image\n")
    data = (tmp_path / "img" / "ok.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "img" / "ok.png") as image:
        image.save(tmp_path / "img" / "ok.jpg", quality=90)
    data = (tmp_path / "img" / "ok.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    return tmp_path


def test_valid_file_loads_with_resolved_paths(dataset_dir: Path) -> None:
    path = _write_jsonl(
        dataset_dir / "train.jsonl",
        [
            _row(1, images=["img/ok.png", "img/second.png"], label=["red", "blue"]),
            _row(2, images=[], label="green"),  # text-only product, plain-string label
            _row(3, gold=["white"]),  # gold without source
            _row(4, gold=["white"], source="image", images=[str(dataset_dir / "img" / "ok.png")]),
        ],
    )
    result = load_dataset(path)
    assert result.n_skipped == 0
    first, text_only, gold_only, absolute = result.records
    img = dataset_dir / "img"
    assert first.images == (str(img / "ok.png"), str(img / "second.png"))
    assert first.label == ("red", "blue")
    assert text_only.images == () and text_only.label == ("green",)
    assert gold_only.gold == ("white",) and gold_only.source is None
    assert absolute.images == (str(dataset_dir / "img" / "ok.png"),) and absolute.source == "image"
    assert validate_file(path) == []


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"images": ["img/missing.png"]}, "images", "image 'img/missing.png' does not exist"),
        ({"images": ["img/notes.jpg"]}, "images", "is not an image file"),
        ({"images": ["img/cut.png"]}, "images", "is truncated or corrupt"),
        ({"images": ["img/ok.jpg", "img/cut.jpg"]}, "images", "image 'img/cut.jpg' is truncated"),
        ({"text": "   \n "}, "text", "empty or whitespace-only"),
        ({"label": None}, "label", "missing required field 'label'"),
        ({"label": []}, "label", "label is empty"),
        ({"label": ["red", " "]}, "label", "value 2 is an empty string"),
        ({"gold": ["red", ""]}, "gold", "value 2 is an empty string"),
        ({"source": "visual"}, "source", "unknown source 'visual'"),
        ({"source": "1"}, "source", "unknown source '1'"),
        ({"category": ""}, "category", "empty"),
        ({"attribute": None}, "attribute", "missing required field 'attribute'"),
        ({"id": 7}, "id", "must be a string, got int"),
        ({"images": "img/ok.png", "label": {"a": 1}}, "label", "must be a list of strings"),
        ({"label_weight": 1.5}, "label_weight", "must be a number in [0, 1], got 1.5"),
        ({"label_weight": -0.1}, "label_weight", "got -0.1"),
        ({"label_weight": "high"}, "label_weight", "got 'high'"),
        ({"label_weight": True}, "label_weight", "got bool"),
        ({"label_weight": [0.5]}, "label_weight", "got list"),
        ({"label_weight": "nan"}, "label_weight", "got nan"),
        ({"label_weight": 10**400}, "label_weight", "got inf"),
    ],
)
def test_each_bad_value_is_reported_with_file_row_and_field(
    dataset_dir: Path, overrides: dict[str, Any], field: str, fragment: str
) -> None:
    path = _write_jsonl(dataset_dir / "train.jsonl", [_row(1), _row(2, **overrides), _row(3)])
    with pytest.raises(DataValidationError) as info:
        load_dataset(path)
    assert info.value.errors == [RowError(str(path), 2, field, info.value.errors[0].message)]
    assert fragment in info.value.errors[0].message
    assert f"{path} row 2, field '{field}': " in str(info.value)


def test_missing_field_key_is_reported(dataset_dir: Path) -> None:
    row = _row(1)
    del row["label"], row["text"]
    errors = validate_file(_write_jsonl(dataset_dir / "d.jsonl", [row]))
    assert [(e.field, e.message) for e in errors] == [
        ("text", "missing required field 'text'"),
        ("label", "missing required field 'label'"),
    ]


def test_duplicate_id_names_the_first_row(dataset_dir: Path) -> None:
    path = _write_jsonl(dataset_dir / "d.jsonl", [_row(1), _row(2), _row(1, label=["blue"])])
    (error,) = validate_file(path)
    assert (error.row, error.field) == (3, "id")
    assert "duplicate id 'p1-color'" in error.message and "first seen in row 1" in error.message


def test_bad_json_lines_do_not_stop_validation(dataset_dir: Path) -> None:
    path = _write_jsonl(
        dataset_dir / "d.jsonl",
        [_row(1), '{"id": "p2-color", "text": ', "[1, 2]", _row(4, text=""), _row(5)],
    )
    errors = validate_file(path)
    assert [(e.row, e.field) for e in errors] == [(2, "json"), (3, "json"), (4, "text")]
    assert "invalid JSON" in errors[0].message
    assert "expected a JSON object, got list" in errors[1].message


def test_all_errors_listed_and_message_truncated(dataset_dir: Path) -> None:
    rows = [_row(i, text="", source="bogus") for i in range(13)]
    with pytest.raises(DataValidationError) as info:
        load_dataset(_write_jsonl(dataset_dir / "d.jsonl", rows))
    assert len(info.value.errors) == 26
    message = str(info.value)
    assert "26 error(s) in 13 row(s)" in message
    assert message.count("field '") == 20
    assert message.endswith("... and 6 more")


def test_skip_invalid_drops_and_counts_bad_rows(dataset_dir: Path) -> None:
    path = _write_jsonl(
        dataset_dir / "d.jsonl",
        [_row(1), _row(2, images=["img/cut.png"], text=""), _row(3), _row(1), _row(5, source="x")],
    )
    result = load_dataset(path, skip_invalid=True)
    assert [r.id for r in result.records] == ["p1-color", "p3-color"]
    assert result.n_skipped == 3
    assert [(e.row, e.field) for e in result.skipped] == [(2, "text"), (4, "id"), (5, "source")]


def test_check_images_and_require_label_can_be_relaxed(dataset_dir: Path) -> None:
    row = _row(1, images=["img/missing.png"])
    del row["label"]
    path = _write_jsonl(dataset_dir / "d.jsonl", [row])
    assert [e.field for e in validate_file(path)] == ["label", "images"]
    (record,) = load_dataset(path, check_images=False, require_label=False).records
    assert record.label == () and record.images == (str(dataset_dir / "img" / "missing.png"),)


def test_numpy_list_values_are_accepted(dataset_dir: Path) -> None:
    rows = [_row(1, images=np.array(["img/ok.png"]), label=np.array(["red", "red", "blue"]))]
    records, problems = validate_rows(rows, dataset_dir / "d.parquet")
    assert problems == []
    assert records == [
        Record(
            "p1-color",
            "Product 1 ceramic mug",
            (str(dataset_dir / "img" / "ok.png"),),
            "mug",
            "color",
            ("red", "blue"),
            None,
            None,
        )
    ]


def test_check_image_reasons(dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_image(dataset_dir / "img" / "ok.png") is None
    assert check_image(dataset_dir / "img" / "nope.png") == "does not exist"
    assert check_image(dataset_dir / "img") == "is not a regular file"
    # Truncation is caught even if another module enabled PIL's lenient global flag.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("cut.png", "cut.jpg"):
        assert "truncated or corrupt" in (check_image(dataset_dir / "img" / name) or "")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_load_rgb_converts_and_names_the_path_on_failure(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    image = load_rgb(tmp_path / "clear.png")
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent composited on white
    (tmp_path / "fake.jpg").write_text("hello")
    data = (tmp_path / "clear.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("fake.jpg", "absent.png", "cut.png"):
        with pytest.raises(ImageLoadError, match=name):
            load_rgb(tmp_path / name)


def test_fields_outside_the_schema_are_reported_not_dropped_silently(dataset_dir: Path) -> None:
    _png(dataset_dir / "img" / "ok.png")
    path = _write_jsonl(
        dataset_dir / "extra.jsonl", [_row(1), _row(2, colour="red"), _row(3, colour="blue", note="x"), _row(4)]
    )
    result = load_dataset(path)
    assert len(result.records) == 4  # still valid rows
    colour, note = result.warnings
    assert "extra.jsonl: field 'colour' is not part of the schema and is ignored (row 2 and 1 more)" in colour
    assert "field 'note'" in note and "(row 3)" in note and "known fields: id, text" in note
    warnings: list[str] = []
    assert validate_file(path, warnings=warnings) == [] and warnings == result.warnings
    assert load_dataset(_write_jsonl(dataset_dir / "clean.jsonl", [_row(1)])).warnings == []


def test_label_weight_is_optional_and_read_as_a_number(dataset_dir: Path) -> None:
    path = _write_jsonl(
        dataset_dir / "train.jsonl",
        [
            _row(1, label_weight=0.25),
            _row(2),
            _row(3, label_weight=1),
            _row(4, label_weight=0),
            _row(5, label_weight=None),
        ],
    )
    weights = [r.label_weight for r in load_dataset(path).records]
    assert weights == [0.25, None, 1.0, 0.0, None] and isinstance(weights[2], float)
    # a CSV cell is text: "0.5" is the number, an empty cell is no weight
    csv_path = dataset_dir / "train.csv"
    csv_path.write_text(
        "id,text,images,category,attribute,label,label_weight\n"
        "a,Red mug,,mug,color,red,0.5\nb,Blue mug,,mug,color,blue,\n",
        encoding="utf-8",
    )
    assert [r.label_weight for r in load_dataset(csv_path).records] == [0.5, None]
