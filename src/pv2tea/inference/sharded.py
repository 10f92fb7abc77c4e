"""Predicting a dataset file of any size, on one process or on several (``torchrun ... pv2tea predict``).

The file is read twice as a stream (:mod:`pv2tea.data.validate`): a scan finds every bad row before anything is
predicted, then the records are predicted chunk by chunk into a resumable file (:mod:`pv2tea.inference.batch`);
memory holds one chunk, the ids and the problems, never the file.

Under a launcher that starts N processes (``RANK``/``WORLD_SIZE``), row r of the input (1-based) belongs to rank
(r − 1) mod N. Every rank reads the whole file and checks every row's fields and ids (a repeated id is found
across ranks) but opens only its own rows' images; the ranks then exchange their problems (gloo), so all of them
stop on the same errors or skip the same rows. Each rank predicts its rows into its own part,
``OUT.part-R-of-N.partial``, renamed ``OUT.part-R-of-N`` when complete; when every part is complete, rank 0
merges them into ``OUT`` in input order, checking that each line holds the id of the row it stands for, and
deletes them. A job killed at any point and run again with ``--resume`` on as many processes continues every
part where it stopped, so each row is predicted into ``OUT`` exactly once. ``OUT`` must be on a file system all
ranks see.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from pv2tea.data.schema import DataValidationError, RowError
from pv2tea.data.validate import DatasetScan, iter_records, scan_dataset
from pv2tea.launcher import launched_rank, launched_world_size

__all__ = [
    "FileResult",
    "JobError",
    "Shard",
    "launched_shard",
    "merge_parts",
    "part_path",
    "predict_file",
    "process_group",
]

# How long a rank waits for the others at a collective: a rank whose part was finished before a resume waits for
# the slowest one, which may take hours, so the default half hour of torch.distributed would end a healthy job
COLLECTIVE_TIMEOUT = timedelta(days=7)


class JobError(ValueError):
    """A problem every process of the job finds alike (only rank 0 needs to report it)."""


@dataclass(frozen=True)
class Shard:
    """This process's share of the rows: row r (1-based) is rank (r − 1) mod ``world_size``'s."""

    rank: int = 0
    world_size: int = 1

    def owns(self, row: int) -> bool:
        """Whether this process predicts ``row`` (1-based)."""
        return (row - 1) % self.world_size == self.rank


def launched_shard() -> Shard:
    """The share the launcher gave this process (``RANK``, ``WORLD_SIZE``; one process without a launcher)."""
    world_size, rank = launched_world_size(), launched_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise JobError(f"RANK={rank} and WORLD_SIZE={world_size} set by the launcher do not describe a process")
    return Shard(rank, world_size)


class process_group:  # noqa: N801 - used as a context manager, like a function
    """Join the launcher's processes in a gloo group for the duration of a ``with`` (nothing in one process, or if
    a group already exists); prediction only exchanges small Python objects, so gloo serves CPUs and GPUs."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.created = False

    def __enter__(self) -> Shard:
        import torch.distributed as dist

        if self.shard.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
            self.created = True
        return self.shard

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self.created:
            dist.destroy_process_group()


def all_gather(value: Any, shard: Shard) -> list[Any]:
    """Every rank's ``value`` (picklable) in rank order; ``[value]`` in one process."""
    if shard.world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * shard.world_size
    dist.all_gather_object(out, value)
    return out


def part_path(out: Path, shard: Shard) -> Path:
    """The complete part of rank ``shard.rank`` (its partial file is :func:`~pv2tea.inference.batch.partial_path`
    of it)."""
    return out.with_name(f"{out.name}.part-{shard.rank}-of-{shard.world_size}")


def merging_path(out: Path) -> Path:
    """The file the parts are merged into before it is renamed to ``out``."""
    return out.with_name(out.name + ".merging")


def _parts_on_disk(out: Path) -> dict[int, list[Path]]:
    """The part files (complete or partial) of ``out`` by the world size that wrote them."""
    pattern = re.compile(re.escape(out.name) + r"\.part-(\d+)-of-(\d+)(\.partial)?")
    found: dict[int, list[Path]] = {}
    if out.parent.is_dir():
        for path in sorted(out.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match:
                found.setdefault(int(match.group(2)), []).append(path)
    return found


def check_leftovers(out: Path, shard: Shard, resume: bool) -> None:
    """Refuse to start over an interrupted run without ``resume``, or to resume one on another number of
    processes (its rows were split otherwise)."""
    parts = _parts_on_disk(out)
    other = sorted(n for n in parts if n != shard.world_size)
    if other:
        n = other[0]
        raise JobError(
            f"{parts[n][0]} is part of an interrupted run on {n} process(es): resume it on {n} "
            f"(torchrun --nproc_per_node {n} ... --resume), or delete the {out.name}.part-* files to start over"
        )
    single = out.with_name(out.name + ".partial")  # batch.partial_path
    if shard.world_size > 1 and single.exists():
        raise JobError(
            f"{single} holds the predictions of an interrupted run on one process: resume it on one process "
            f"(--resume without a launcher), or delete it to start over"
        )
    ours = parts.get(shard.world_size, [])
    if ours and not resume:
        raise JobError(
            f"{ours[0]} holds the predictions of an interrupted run; pass --resume to continue it, or delete the "
            f"{out.name}.part-* files to start over"
        )


def merge_parts(out: Path, records: Iterator[tuple[int, Any]], world_size: int) -> int:
    """Write ``out`` from the complete parts of ``world_size`` ranks, in the order of ``records`` (the input's
    (row, record) stream): row r's line is the next line of part (r − 1) mod N, and must hold that record's id.
    The parts are deleted once ``out`` is in place. Returns the number of rows written.

    Raises:
        JobError: a part lacks a row, holds another row's line, or has lines left over.
    """
    parts = [part_path(out, Shard(rank, world_size)) for rank in range(world_size)]
    temp = merging_path(out)
    handles = [open(part, encoding="utf-8") for part in parts]  # noqa: SIM115 - closed below
    written = 0
    try:
        with open(temp, "w", encoding="utf-8") as merged:
            for row, record in records:
                rank = (row - 1) % world_size
                line = handles[rank].readline()
                got = json.loads(line).get("id") if line.endswith("\n") else None
                if got != record.id:
                    found = f"'{got}'" if got is not None else "nothing"
                    raise JobError(
                        f"{parts[rank]} does not match the input: row {row} (id '{record.id}') should be its next "
                        f"line, found {found}; delete the {out.name}.part-* files and run again"
                    )
                merged.write(line)
                written += 1
            for part, handle in zip(parts, handles):
                if handle.readline():
                    raise JobError(f"{part} holds more rows than the input gives it; delete it and run again")
            merged.flush()
            os.fsync(merged.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        for handle in handles:
            handle.close()
    os.replace(temp, out)
    for part in parts:
        part.unlink()
    return written


@dataclass
class FileResult:
    """What :func:`predict_file` did, summed over the ranks."""

    scan: DatasetScan  # the input's scan (every rank's problems, counts over the whole file)
    written: int  # rows predicted by this run
    resumed: int  # rows found already predicted by an interrupted run
    kept: int  # rows that kept their label (keep_labels)


def _joint_scan(scans: list[DatasetScan]) -> DatasetScan:
    """The scan of the whole file from the scans of the ranks' shares."""
    errors: list[RowError] = sorted((e for s in scans for e in s.errors), key=lambda e: e.row)  # stable
    return replace(
        scans[0],
        n_valid=sum(s.n_valid for s in scans),
        n_labelled=sum(s.n_labelled for s in scans),
        errors=errors,
        bad_rows={row for s in scans for row in s.bad_rows},
        ids=None,
    )


def predict_file(
    predictor,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard: Shard = Shard(),  # noqa: B008 - a frozen dataclass
    skip_invalid: bool = False,
    resume: bool = False,
    check_input: Callable[[DatasetScan], None] | None = None,
    progress: bool = True,
    **options: Any,
) -> FileResult:
    """Predict every valid row of the dataset file ``data`` into ``out`` (JSON Lines, in input order), this
    process doing the rows of ``shard``; every process of the job calls it with its own shard (under
    :class:`process_group`). ``check_input`` sees the scan of the whole file before anything is predicted (it
    raises to stop every rank). ``options`` go to :func:`~pv2tea.inference.batch.predict_to_file`
    (``batch_size``, ``chunk_size``, ``candidates``, ``keep_labels``, ...).

    Raises:
        DataValidationError: the file has bad rows and ``skip_invalid`` is false (every problem of every share).
        JobError: leftovers of an interrupted run without ``resume``, or of a run on another number of
            processes; parts that do not match the input at the merge.
        ValueError: a partial file written for other input (see :func:`~pv2tea.inference.batch.predict_to_file`).
    """
    from pv2tea.inference.batch import BatchResult, predict_to_file  # the model's libraries load here

    out = Path(out)
    data = Path(data)
    check_leftovers(out, shard, resume)
    mine = shard.owns if shard.world_size > 1 else None
    own_scan = scan_dataset(data, require_label=False, rows=mine, keep_ids=True)
    ids = own_scan.ids
    scan = _joint_scan(all_gather(replace(own_scan, ids=None), shard))
    if scan.errors and not skip_invalid:
        raise DataValidationError(scan.errors)
    if check_input is not None:
        try:
            check_input(scan)
        except ValueError as exc:
            raise JobError(str(exc)) from exc
    target = out if shard.world_size == 1 else part_path(out, shard)
    if shard.world_size > 1 and target.exists():  # this rank's part was finished by the interrupted run
        result = BatchResult(written=0, resumed=own_scan.n_valid, kept=_kept(target))
    else:
        records = (record for _, record in iter_records(data, skip_rows=scan.bad_rows, require_label=False, rows=mine))
        result = predict_to_file(
            predictor,
            records,
            target,
            resume=resume,
            total=own_scan.n_valid,
            known_ids=ids,
            progress=progress and shard.rank == 0,
            **options,
        )
    results = all_gather(result, shard)  # every part is complete after this
    if shard.world_size > 1 and shard.rank == 0:
        merge_parts(out, iter_records(data, skip_rows=scan.bad_rows, require_label=False), shard.world_size)
    return FileResult(
        scan=scan,
        written=sum(r.written for r in results),
        resumed=sum(r.resumed for r in results),
        kept=sum(r.kept for r in results),
    )


def _kept(path: Path) -> int:
    """Rows of a finished part that kept their label."""
    with open(path, encoding="utf-8") as handle:
        return sum(bool(json.loads(line).get("kept_label")) for line in handle)
