"""Dataset files read as streams: rows are parsed and validated as they are consumed, a late row's error names its
file row, and a validating pass keeps problems and counts, not rows (data/readers.py, data/validate.py)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pv2tea.data import readers, validate
from pv2tea.data.readers import iter_table, read_table, write_records
from pv2tea.data.schema import DataValidationError
from pv2tea.data.validate import iter_records, iter_validated, load_dataset, scan_dataset, validate_file

N_ROWS = 3000
BAD_ROW = 2718  # far past the first Parquet batch and CSV buffer


def _row(i: int) -> dict:
    return {"id": f"p{i}", "text": f"mug number {i}", "category": "mug", "attribute": "color", "label": ["red"]}


def _catalog(tmp_path: Path, fmt: str, n: int = N_ROWS, bad: int | None = BAD_ROW) -> Path:
    rows = [_row(i) for i in range(1, n + 1)]
    if bad is not None:
        rows[bad - 1]["category"] = "  "  # whitespace-only: invalid in every format
    return write_records(rows, tmp_path / f"data.{fmt}")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_late_bad_row_is_named_by_its_file_row(tmp_path: Path, fmt: str, monkeypatch) -> None:
    path = _catalog(tmp_path, fmt)
    if fmt == "csv":  # a quoted cell over several lines: still one data row
        text = path.read_text(encoding="utf-8").replace("mug number 5,", '"mug\nnumber\n5",', 1)
        path.write_text(text, encoding="utf-8")
    if fmt == "parquet":  # several row groups, read in batches smaller than one
        pq.write_table(pq.read_table(path), path, row_group_size=700)
        assert pq.ParquetFile(path).metadata.num_row_groups == 5
        monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 256)
    (error,) = validate_file(path)
    assert (error.file, error.row, error.field) == (str(path), BAD_ROW, "category")
    assert str(error).startswith(f"{path} row {BAD_ROW}, field 'category'")
    # the same number in a load, a skipping load and a scan
    with pytest.raises(DataValidationError, match=f"row {BAD_ROW}, field 'category'"):
        load_dataset(path)
    loaded = load_dataset(path, skip_invalid=True)
    assert len(loaded.records) == N_ROWS - 1 and [e.row for e in loaded.skipped] == [BAD_ROW]
    assert loaded.records[BAD_ROW - 1].id == f"p{BAD_ROW + 1}"
    scan = scan_dataset(path)
    assert (scan.n_rows, scan.n_valid, scan.bad_rows) == (N_ROWS, N_ROWS - 1, {BAD_ROW})


def test_jsonl_rows_are_parsed_only_as_they_are_consumed(tmp_path: Path, monkeypatch) -> None:
    path = _catalog(tmp_path, "jsonl", bad=None)
    with path.open("a") as f:
        f.write("{not json at the very end\n")
    parsed: list[str] = []
    loads = json.loads

    def counting(text, *a, **k):
        parsed.append(text)
        return loads(text, *a, **k)

    monkeypatch.setattr(readers.json, "loads", counting)
    stream = iter_validated(iter_table(path), path)
    first = next(stream)
    assert first.record is not None and first.record.id == "p1"
    assert len(parsed) == 1  # the other 3000 lines were not read
    second = next(stream)
    assert second.row == 2 and len(parsed) == 2
    stream.close()
    rest = [r for r in iter_validated(iter_table(path), path) if r.record is None]
    assert [(r.row, r.errors[0].field) for r in rest] == [(N_ROWS + 1, "json")]


def test_csv_rows_are_parsed_only_as_they_are_consumed(tmp_path: Path, monkeypatch) -> None:
    path = _catalog(tmp_path, "csv", bad=None)
    parse = readers._parse_cells
    seen: list[dict] = []
    monkeypatch.setattr(readers, "_parse_cells", lambda row: seen.append(row) or parse(row))
    rows = iter_table(path)
    assert next(rows)["id"] == "p1" and len(seen) == 1
    assert next(rows)["id"] == "p2" and len(seen) == 2
    rows.close()
    assert len(read_table(path)) == N_ROWS and len(seen) == N_ROWS + 2


def test_parquet_is_decoded_one_batch_at_a_time(tmp_path: Path) -> None:
    """Holding the first row of a file of many row groups holds about one decoded batch, not the file: a few
    hundred kB of Arrow memory where the whole file decodes to ~40 MB."""
    n, width = 20_000, 2000
    ids = pa.array(range(n)).cast(pa.string())
    table = pa.table({"id": ids, "text": pa.repeat(pa.scalar("x" * width), n)})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=500)
    del table, ids
    assert pq.ParquetFile(path).metadata.num_row_groups == 40
    gc.collect()
    base = pa.total_allocated_bytes()
    whole = pq.read_table(path)
    full = pa.total_allocated_bytes() - base
    del whole
    assert full > n * width  # the comparison below can fail
    rows = iter_table(path, batch_rows=250)
    first = next(rows)
    held = pa.total_allocated_bytes() - base
    assert first["id"] == "0" and held < full / 20, (held, full)
    assert next(rows)["id"] == "1"
    rows.close()


def test_scan_then_stream_the_records(tmp_path: Path) -> None:
    """A scan finds every problem and keeps counts; iter_records then yields the good rows (optionally one share
    of them) with their file rows, and notices a file changed under it."""
    rows = [_row(i) for i in range(1, 11)]
    rows[3]["label"] = []  # row 4: empty label
    rows[6]["id"] = "p2"  # row 7: repeats row 2's id
    rows[8]["label"] = []  # row 9
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"colour": "red"}\n')
    scan = scan_dataset(path, keep_ids=True)
    assert (scan.n_rows, scan.n_valid, scan.bad_rows) == (11, 7, {4, 7, 9, 11})
    assert [(e.row, e.field) for e in scan.skipped] == [(4, "label"), (7, "id"), (9, "label"), (11, "id")]
    assert "first seen in row 2" in next(e.message for e in scan.errors if e.row == 7)
    assert scan.ids == {f"p{i}" for i in (1, 2, 3, 5, 6, 8, 10)} and scan.n_labelled == 7
    assert scan.warnings and "'colour'" in scan.warnings[0] and "row 11" in scan.warnings[0]
    streamed = list(iter_records(path, skip_rows=scan.bad_rows))
    assert [(row, r.id) for row, r in streamed] == [
        (1, "p1"),
        (2, "p2"),
        (3, "p3"),
        (5, "p5"),
        (6, "p6"),
        (8, "p8"),
    ] + [(10, "p10")]
    assert streamed == [
        (row, r) for row, r in zip([1, 2, 3, 5, 6, 8, 10], load_dataset(path, skip_invalid=True).records)
    ]
    odd = list(iter_records(path, skip_rows=scan.bad_rows, rows=lambda row: row % 2 == 1))
    assert [row for row, _ in odd] == [1, 3, 5]
    share = scan_dataset(path, rows=lambda row: row % 2 == 0, keep_ids=True)
    assert (share.bad_rows, share.n_valid, share.ids) == ({4}, 4, {"p2", "p6", "p8", "p10"})
    assert scan_dataset(path, rows=lambda row: row % 2 == 1).bad_rows == {
        7,
        9,
        11,
    }  # 7 repeats a row of the other share
    with pytest.raises(DataValidationError, match="row 4, field 'label'"):
        list(iter_records(path, skip_rows={7, 9, 11}))  # row 4 became bad since the scan


def test_images_are_checked_once_each_and_only_for_the_rows_asked(tmp_path: Path, monkeypatch) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    rows = [{**_row(i), "images": ["a.png", "missing.png" if i == 5 else "a.png"]} for i in range(1, 7)]
    path = write_records(rows, tmp_path / "d.jsonl")
    checked: list[str] = []
    check = validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda p: checked.append(p) or check(p))
    assert [(e.row, e.field) for e in validate_file(path)] == [(5, "images")]
    assert sorted(checked) == sorted({str(image), str(tmp_path / "missing.png")})  # once per distinct image
    checked.clear()
    scan = scan_dataset(path, rows=lambda row: row % 2 == 0)  # the even rows' share
    assert scan.bad_rows == set() and checked == [str(image)]  # row 5's missing image was not opened
    assert (scan.n_rows, scan.n_valid) == (6, 3)
    odd = scan_dataset(path, rows=lambda row: row % 2 == 1)
    assert (odd.n_valid, odd.bad_rows, [e.row for e in odd.errors]) == (2, {5}, [5])
    monkeypatch.setattr(validate, "IMAGE_VERDICTS_KEPT", 1)  # a verdict forgotten is checked again
    checked.clear()
    validate_file(path)
    assert len(checked) == 3  # a.png, missing.png, a.png again


def test_unreadable_bytes_name_the_file_and_row(tmp_path: Path) -> None:
    good = json.dumps(_row(1)) + "\n"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + good.encode() + b'{"id": "caf\xe9"}\n' + json.dumps(_row(3)).encode() + b"\n")
    errors = validate_file(jsonl)  # a byte-order mark is accepted; a Latin-1 line is that row's error
    assert [(e.row, e.field) for e in errors] == [(2, "json")] and "not UTF-8" in errors[0].message
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(b"id,text,category,attribute,label\na,mug,mug,color,red\nb,caf\xe9,mug,color,red\n")
    with pytest.raises(ValueError, match=r"d\.csv line 3: not UTF-8"):
        validate_file(csv_file)
    fake = tmp_path / "d.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: not a readable Parquet file"):
        validate_file(fake)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_record_writer_writes_chunk_by_chunk_and_a_failed_write_leaves_the_old_file(
    tmp_path: Path, fmt: str, monkeypatch
) -> None:
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 4)
    rows = [_row(i) for i in range(1, 11)]
    out = tmp_path / f"out.{fmt}"
    with readers.RecordWriter(out) as writer:
        for start in range(0, 10, 3):
            writer.write(rows[start : start + 3])
        assert not out.exists()  # the file appears when complete
    assert writer.written == 10
    assert [r.id for r in load_dataset(out).records] == [f"p{i}" for i in range(1, 11)]
    if fmt == "parquet":
        assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 4 + 4 + 2 rows
    before = out.read_bytes()
    with pytest.raises(ValueError, match="label_weight"):
        with readers.RecordWriter(out) as writer:
            writer.write(rows[:5])
            writer.write([{**_row(11), "label_weight": 2.0}])
    assert out.read_bytes() == before and list(tmp_path.iterdir()) == [out]
