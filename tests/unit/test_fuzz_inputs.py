"""Property-based fuzzing (hypothesis, bounded examples) of the dataset readers with validation, and of image
decoding: every input yields records or clear per-row errors (never a traceback, never a silently dropped row),
and every image decodes to RGB or is refused with a reason."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pv2tea.data.readers import read_table
from pv2tea.data.schema import FIELDS
from pv2tea.data.validate import validate_rows
from pv2tea.serve.limits import ImageRejected, Limits, open_image

FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    [
        "",
        " ",
        "\u2028",
        "a\u2029b",
        "\x00",
        "\ufeffid",
        "e\u0301",
        "\U0001f600",
        "x" * 300,
        '["a", 1]',
        "a|b|",
        "null",
        "NaN",
        "1e999",
    ]
)
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3), max_leaves=8
)
field_name = st.sampled_from([*FIELDS, "colour", "labels", ""]) | odd_text
row = st.dictionaries(field_name, json_value, max_size=8) | st.fixed_dictionaries(
    {
        "id": odd_text,
        "text": odd_text,
        "category": odd_text,
        "attribute": odd_text,
        "label": st.lists(odd_text, max_size=3) | json_value,
    },
    optional={"images": json_value, "gold": json_value, "source": json_value, "label_weight": json_value},
)


def check_accounted(rows: list, path: Path, n_rows: int) -> None:
    """Each row read is a record or a listed problem with a message; nothing dropped, nothing raised."""
    assert len(rows) == n_rows
    for require_label in (True, False):
        records, problems = validate_rows(rows, path, require_label=require_label)
        assert len(records) + len(problems) == len(rows)
        assert all(errors and all(e.message and 1 <= e.row <= len(rows) for e in errors) for _, errors in problems)


@FUZZ
@given(
    lines=st.lists(
        row.map(lambda r: json.dumps(r, ensure_ascii=False)) | json_value.map(json.dumps) | odd_text,
        min_size=1,
        max_size=6,
    )
)
def test_jsonl_rows_are_records_or_errors(lines):
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        check_accounted(read_table(path), path, len(lines))


@FUZZ
@given(
    rows=st.lists(st.dictionaries(st.sampled_from([*FIELDS, "extra"]), odd_text, max_size=9), min_size=1, max_size=5)
)
def test_csv_rows_are_records_or_errors(rows):
    rows = [{k: v.replace("\x00", "") for k, v in r.items()} for r in rows]  # csv cannot hold NUL
    columns = sorted({k for r in rows for k in r}) or ["id"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        check_accounted(read_table(path), path, len(rows))


parquet_column = st.sampled_from(["string", "int", "float", "list", "null"])


@settings(FUZZ, max_examples=12)
@given(
    kinds=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), parquet_column, min_size=1, max_size=9),
    n=st.integers(1, 4),
    data=st.data(),
)
def test_parquet_rows_are_records_or_errors(kinds, n, data):
    draw = {
        "string": odd_text,
        "int": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(),
        "list": st.lists(odd_text.filter(lambda s: "\x00" not in s), max_size=3),
        "null": st.none(),
    }
    table = pa.table(
        {
            name: pa.array(
                [data.draw(draw[kind] | st.none()) for _ in range(n)],
                type={
                    "string": pa.string(),
                    "int": pa.int64(),
                    "float": pa.float64(),
                    "list": pa.list_(pa.string()),
                    "null": pa.null(),
                }[kind],
            )
            for name, kind in kinds.items()
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(table, path)
        check_accounted(read_table(path), path, n)


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _samples() -> list[bytes]:
    palette = Image.new("P", (9, 7))
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    return [
        _encoded(Image.new("RGB", (12, 10), "green"), "PNG"),
        _encoded(Image.new("RGB", (12, 10)), "JPEG"),
        _encoded(Image.new("CMYK", (6, 6)), "JPEG"),
        _encoded(Image.new("I;16", (5, 5)), "PNG"),
        _encoded(palette, "PNG", transparency=0),
        _encoded(Image.new("LA", (4, 4)), "PNG"),
        _encoded(Image.new("RGBA", (5, 5)), "WEBP"),
        _encoded(Image.new("1", (9, 9)), "BMP"),
        _encoded(Image.new("RGB", (6, 6)), "TIFF"),
        animated.getvalue(),
    ]


SAMPLES = _samples()


# Pillow warns about the damaged metadata these bytes are made to have; the verdict is what is tested
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")
@settings(max_examples=80, deadline=None, database=None)
@given(
    base=st.sampled_from(SAMPLES),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    junk=st.binary(max_size=64),
    mode=st.sampled_from(["keep", "cut", "flip", "junk", "append"]),
)
def test_any_image_bytes_decode_to_rgb_or_are_refused_with_a_reason(base, cut, flips, junk, mode):
    data = bytearray(base)
    if mode == "cut":
        data = data[:cut]
    elif mode == "flip":
        for at, value in flips:
            if at < len(data):
                data[at] = value
    elif mode == "junk":
        data = bytearray(junk)
    elif mode == "append":
        data += junk
    limits = Limits(max_image_pixels=10_000)
    try:
        image = open_image(bytes(data), limits)
    except ImageRejected as exc:
        assert exc.reason in ("format", "pixels", "aspect", "corrupt") and str(exc)
    else:
        assert image.mode == "RGB" and image.width * image.height <= 10_000
    if mode == "keep":
        assert open_image(bytes(data), limits).mode == "RGB"  # every untouched sample decodes


def test_found_by_fuzzing_raw_line_separators_and_overlong_paths(tmp_path):
    """A JSON string may hold U+2028, U+0085 or \\x1e raw: the row stays one row; an image path too long for the
    file system is that row's error, not a traceback."""
    path = tmp_path / "data.jsonl"
    rows = [
        {"id": "a", "text": "blue\u2028mug\x85\x1e", "category": "mug", "attribute": "color", "label": ["blue"]},
        {
            "id": "b",
            "text": "red mug",
            "category": "mug",
            "attribute": "color",
            "label": ["red"],
            "images": ["x" * 5000],
        },
    ]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    records, problems = validate_rows(read_table(path), path)
    assert [r.text for r in records] == ["blue\u2028mug\x85\x1e"]
    [(row, [error])] = problems
    assert row == 2 and error.field == "images" and "cannot be looked up" in error.message
