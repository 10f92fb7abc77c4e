"""The pieces of predicting on several processes (inference/sharded.py): which rank owns a row, the scan of the
whole file from the ranks' scans, the merge of the parts in input order, and leftovers of interrupted runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pv2tea.data.readers import write_records
from pv2tea.data.validate import iter_records, scan_dataset
from pv2tea.inference.sharded import (
    JobError,
    Shard,
    _joint_scan,
    check_leftovers,
    launched_shard,
    merge_parts,
    part_path,
)


def _rows(n: int, bad: tuple[int, ...] = ()) -> list[dict]:
    rows = [
        {"id": f"p{i}", "text": f"mug {i}", "category": "mug", "attribute": "color", "label": ["red"]}
        for i in range(1, n + 1)
    ]
    for row in bad:
        rows[row - 1]["text"] = " "
    return rows


def test_rows_are_dealt_round_robin_and_every_row_has_one_owner(monkeypatch) -> None:
    shards = [Shard(rank, 3) for rank in range(3)]
    assert [[row for row in range(1, 11) if s.owns(row)] for s in shards] == [[1, 4, 7, 10], [2, 5, 8], [3, 6, 9]]
    assert all(Shard().owns(row) for row in range(1, 5))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_shard() == Shard(1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(JobError, match="RANK=2 and WORLD_SIZE=2"):
        launched_shard()


def test_the_ranks_scans_together_are_the_scan_of_the_file(tmp_path: Path) -> None:
    path = write_records(_rows(9, bad=(2, 7)), tmp_path / "d.jsonl")
    whole = scan_dataset(path, require_label=False)
    joint = _joint_scan([scan_dataset(path, require_label=False, rows=Shard(r, 2).owns) for r in range(2)])
    assert (joint.n_rows, joint.n_valid, joint.n_labelled, joint.bad_rows) == (9, 7, 7, {2, 7})
    assert joint.errors == whole.errors and [e.row for e in joint.errors] == [2, 7]


def _write_part(out: Path, shard: Shard, ids: list[str]) -> None:
    part_path(out, shard).write_text("".join(json.dumps({"id": i, "values": [i]}) + "\n" for i in ids))


def test_parts_merge_in_input_order_skipping_bad_rows(tmp_path: Path) -> None:
    path = write_records(_rows(7, bad=(3,)), tmp_path / "d.jsonl")
    out = tmp_path / "preds.jsonl"
    # rank 0 owns rows 1, 3 (bad), 5, 7; rank 1 rows 2, 4, 6
    _write_part(out, Shard(0, 2), ["p1", "p5", "p7"])
    _write_part(out, Shard(1, 2), ["p2", "p4", "p6"])
    assert merge_parts(out, iter_records(path, skip_rows={3}), 2) == 6
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p1", "p2", "p4", "p5", "p6", "p7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "preds.jsonl"]  # parts deleted


@pytest.mark.parametrize(
    ("part0", "part1", "message"),
    [
        (["p1", "p5", "p7"], ["p2", "p6", "p4"], "row 4 \\(id 'p4'\\) should be its next line, found 'p6'"),
        (["p1", "p5"], ["p2", "p4", "p6"], "row 7 \\(id 'p7'\\) should be its next line, found nothing"),
        (["p1", "p5", "p7", "p9"], ["p2", "p4", "p6"], "holds more rows than the input gives it"),
    ],
)
def test_a_part_that_does_not_match_the_input_is_refused_and_out_untouched(
    tmp_path: Path, part0: list[str], part1: list[str], message: str
) -> None:
    path = write_records(_rows(7, bad=(3,)), tmp_path / "d.jsonl")
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")
    _write_part(out, Shard(0, 2), part0)
    _write_part(out, Shard(1, 2), part1)
    with pytest.raises(JobError, match=message):
        merge_parts(out, iter_records(path, skip_rows={3}), 2)
    assert out.read_text() == "old\n" and part_path(out, Shard(1, 2)).exists()
    assert not (tmp_path / "preds.jsonl.merging").exists()


def test_leftovers_of_an_interrupted_run(tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    check_leftovers(out, Shard(0, 2), resume=False)  # nothing left over
    (tmp_path / "preds.jsonl.part-1-of-2.partial").write_text("")
    with pytest.raises(JobError, match="pass --resume"):
        check_leftovers(out, Shard(0, 2), resume=False)  # another rank's part: every rank refuses alike
    check_leftovers(out, Shard(1, 2), resume=True)
    for shard in (Shard(0, 1), Shard(2, 3)):
        with pytest.raises(JobError, match=r"interrupted run on 2 process\(es\): resume it on 2"):
            check_leftovers(out, shard, resume=True)
    (tmp_path / "preds.jsonl.part-1-of-2.partial").unlink()
    (tmp_path / "preds.jsonl.partial").write_text("")
    with pytest.raises(JobError, match="interrupted run on one process"):
        check_leftovers(out, Shard(0, 2), resume=True)
    check_leftovers(out, Shard(0, 1), resume=True)  # batch.predict_to_file resumes it
