"""`pv2tea predict` on 2 CPU processes (gloo) launched by torchrun, against one process (inference/sharded.py).

Three torchruns of 2 ranks: the first runs the real console script on the input; the second runs this file as its
worker (``python test_distributed_predict.py worker ...``), which predicts it with rank 1 killing itself (SIGKILL) in
its second chunk; the third runs the real console script, ``torchrun --no-python pv2tea predict ... --resume``, to finish the killed job. The input
holds an invalid row (skipped with --skip-invalid), so rows and parts are not simply aligned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
CHUNK = 3  # --chunk-size: rank 1 is killed after its first chunk is on disk


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--skip-invalid",
        "--keep-labels",
        "--batch-size",
        "4",
        "--chunk-size",
        str(CHUNK),
        "--device",
        "cpu",
        *extra,
    ]


def _worker(model: Path, data: Path, root: Path) -> None:
    """Each rank: a 2-rank prediction whose rank 1 dies in its second chunk."""
    import torch

    from pv2tea.cli import main
    from pv2tea.inference.predictor import Predictor

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    real = Predictor.predict
    calls = []

    def dying(self, chunk, *a, **k):
        calls.append(len(chunk))
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # like an OOM kill: no cleanup, no flush
        return real(self, chunk, *a, **k)

    Predictor.predict = dying
    main(_args(model, data, root / "killed.jsonl"))  # rank 0 ends when torchrun stops it or its peer vanishes


def _torchrun(*command: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _lines_on_disk(path: Path) -> list[str]:
    """The complete lines of a part file (a torn last line is redone by a resume)."""
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n")[:-1] if line]


@pytest.fixture(scope="module")
def runs(tiny_trained, tmp_path_factory):
    from pv2tea.cli import main

    model, catalog = tiny_trained
    root = tmp_path_factory.mktemp("distributed_predict")
    rows = [json.loads(line) for line in Path(catalog["train"]).read_text().splitlines()]
    for row in rows:  # image paths relative to the catalog: make them absolute for the copy
        row["images"] = [str(Path(catalog["train"]).parent / p) for p in row.get("images") or []]
    bad = {**rows[0], "id": "broken", "text": " "}  # row 5: invalid, skipped
    data = root / "products.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:4], bad, *rows[4:]]))
    assert main(_args(model, data, root / "one.jsonl")) == 0
    # one launch per job: a process group made twice in one process could read the first one's addresses from
    # torchrun's store
    two = _torchrun(str(Path(sys.executable).with_name("pv2tea")), *_args(model, data, root / "two.jsonl"))
    assert two.returncode == 0, two.stderr[-4000:]
    first = _torchrun(sys.executable, str(HERE), "worker", str(model), str(data), str(root))
    state = {
        "parts": {
            name: _lines_on_disk(root / name)
            for name in (
                "killed.jsonl.part-0-of-2",
                "killed.jsonl.part-0-of-2.partial",
                "killed.jsonl.part-1-of-2.partial",
            )
        },
        "files": sorted(p.name for p in root.iterdir()),
        "two_stderr": two.stderr,
    }
    one_process_resume = subprocess.run(
        [Path(sys.executable).with_name("pv2tea"), *_args(model, data, root / "killed.jsonl", "--resume")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=600,
    )
    second = _torchrun(
        str(Path(sys.executable).with_name("pv2tea")), *_args(model, data, root / "killed.jsonl"), "--resume"
    )
    return root, len(rows), first, state, one_process_resume, second


def test_two_ranks_write_what_one_process_writes(runs):
    root, n_rows, _, state, _, _ = runs
    expected = (root / "one.jsonl").read_text()
    log = state["two_stderr"]
    assert len(expected.splitlines()) == n_rows  # the invalid row skipped, every other row once
    assert (root / "two.jsonl").read_text() == expected, log[-3000:]
    assert "written to" in log and "by 2 processes" in " ".join(log.split())
    assert not [p for p in root.iterdir() if p.name.startswith("two.jsonl.")]  # parts merged and deleted


def test_a_killed_rank_leaves_its_flushed_chunk_and_no_output(runs):
    root, _, first, state, _, _ = runs
    assert first.returncode != 0  # torchrun reports the killed rank
    assert len(state["parts"]["killed.jsonl.part-1-of-2.partial"]) == CHUNK, first.stderr[-3000:]
    assert "killed.jsonl" not in state["files"] and "killed.jsonl.merging" not in state["files"]


def test_a_job_of_two_ranks_is_not_resumed_on_one_process(runs):
    _, _, _, _, one, _ = runs
    assert one.returncode == 2
    assert "interrupted run on 2 process(es): resume it on 2" in " ".join(one.stderr.split())


def test_the_resumed_job_predicts_only_the_missing_rows_and_writes_each_row_once_in_order(runs):
    root, n_rows, _, state, _, second = runs
    assert second.returncode == 0, second.stderr[-4000:]
    assert (root / "killed.jsonl").read_text() == (root / "one.jsonl").read_text()
    on_disk = sum(len(lines) for lines in state["parts"].values())
    assert 0 < on_disk < n_rows
    message = " ".join(second.stderr.split())
    assert f"{n_rows} prediction(s) written to" in message and f"({on_disk} from the interrupted run)" in message
    assert "1 invalid row(s)" in message
    assert not [p for p in root.iterdir() if p.name.startswith("killed.jsonl.")]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
