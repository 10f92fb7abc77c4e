"""Micro-batching (pv2tea.serve.batcher) with a fake model: coalescing, own rows, isolation, bounded queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from pv2tea.serve.batcher import Job, MicroBatcher, QueueFull


class FakeModel:
    """Answers each item with (item, key); raises on 'bad'; holds every batch until ``release`` is set."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items, key, payload):
        self.started.set()
        self.release.wait(10)
        self.batches.append(list(items))
        if "bad" in items:
            raise ValueError("bad row")
        return [(item, key, payload.get(item)) for item in items]


def test_jobs_coalesce_into_bounded_batches_and_each_gets_its_own_rows():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=5, max_wait=0.2, max_queue=16)
    blocker = batcher.submit(Job(["x"], key="other"))
    assert model.started.wait(5)  # the model thread is busy: the next jobs queue up
    jobs = [Job([f"{n}a", f"{n}b"], key=None, payload={f"{n}a": n}) for n in range(4)]
    futures = [batcher.submit(job) for job in jobs]
    model.release.set()
    blocker.result(5)
    answers = [f.result(5) for f in futures]
    assert answers == [[(f"{n}a", None, n), (f"{n}b", None, None)] for n in range(4)]
    assert model.batches[0] == ["x"]
    assert [len(b) for b in model.batches[1:]] == [4, 4]  # 2 jobs of 2 rows fit in 5 rows; never split a job
    batcher.close(5)


def test_a_failing_job_fails_alone():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=16, max_wait=0.2)
    blocker = batcher.submit(Job(["x"]))
    assert model.started.wait(5)
    good, bad, other = (batcher.submit(Job(items)) for items in (["a", "b"], ["c", "bad"], ["d"]))
    model.release.set()
    blocker.result(5)
    assert [a for a, _, _ in good.result(5)] == ["a", "b"] and [a for a, _, _ in other.result(5)] == ["d"]
    with pytest.raises(ValueError, match="bad row"):
        bad.result(5)
    # the coalesced batch failed, then each job ran alone
    assert ["a", "b", "c", "bad", "d"] in model.batches and ["c", "bad"] in model.batches
    batcher.close(5)


def test_full_queue_is_refused_and_a_cancelled_job_is_skipped():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=4, max_wait=0.0, max_queue=2)
    blocker = batcher.submit(Job(["x"]))
    assert model.started.wait(5)
    gone = batcher.submit(Job(["gone"]))
    kept = batcher.submit(Job(["kept"]))
    with pytest.raises(QueueFull):
        batcher.submit(Job(["refused"]))
    assert batcher.depth == 2
    assert gone.cancel()  # its caller gave up (timeout) before the model took it
    model.release.set()
    assert kept.result(5)[0][0] == "kept" and blocker.result(5)
    with pytest.raises(CancelledError):
        gone.result(0)
    assert all("gone" not in b for b in model.batches)
    batcher.close(5)
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit(Job(["late"]))


def test_no_coalescing_runs_one_job_per_batch_and_warmup_sets_ready():
    model = FakeModel()
    model.release.set()
    warmed = []
    batcher = MicroBatcher(model, max_batch=8, max_wait=0.2, coalesce=False, warmup=lambda: warmed.append(1))
    futures = [batcher.submit(Job([n])) for n in range(3)]
    assert [f.result(5)[0][0] for f in futures] == [0, 1, 2]
    assert batcher.ready.wait(5) and warmed == [1] and model.batches == [[0], [1], [2]]
    batcher.close(5)


def test_close_finishes_queued_jobs():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=1, max_wait=0.0)
    futures = [batcher.submit(Job([n])) for n in range(3)]
    model.release.set()
    t0 = time.perf_counter()
    batcher.close(5)
    assert [f.result(0)[0][0] for f in futures] == [0, 1, 2] and time.perf_counter() - t0 < 5
