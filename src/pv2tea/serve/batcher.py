"""Dynamic micro-batching: concurrent requests coalesced into model batches on one model thread.

Requests are queued as :class:`Job` s. The model thread takes the oldest job, waits at most ``max_wait``
seconds for more jobs with the same generation options until ``max_batch`` rows are gathered, predicts them
as one batch and hands each job exactly its own rows. If a coalesced batch fails, each of its jobs is run
alone, so a bad request fails by itself and never corrupts another's answer. The queue is bounded: a full
queue raises :class:`QueueFull` (the server answers 503), and a job whose caller gave up is skipped.

The model thread is a plain thread and results are :class:`concurrent.futures.Future` s, so the batcher
works under any event loop (and under several, as in tests).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "MicroBatcher", "QueueFull"]


class QueueFull(RuntimeError):
    """The batcher's queue holds its maximum number of requests."""


@dataclass(eq=False)
class Job:
    """One request's rows to predict together with others that share its ``key`` (generation options)."""

    items: Sequence[Any]  # the request's rows (Records)
    key: Hashable = None  # rows are coalesced only with rows of the same key, e.g. num_beams
    payload: dict = field(default_factory=dict)  # request data the predict function needs (decoded images)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


# predict(items, key, payload) -> one answer per item; payload merges the batch's job payloads; key is the jobs' own
# (of whatever type they carry)
PredictFn = Callable[[Sequence[Any], Any, dict], Sequence[Any]]


class MicroBatcher:
    """Coalesces jobs into batches of at most ``max_batch`` rows, waiting at most ``max_wait`` seconds.

    ``coalesce=False`` runs one job per batch (one request at a time, the baseline). ``on_batch(rows)`` is
    called after each batch predicted (for metrics).
    """

    def __init__(
        self,
        predict: PredictFn,
        *,
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_queue: int = 256,
        coalesce: bool = True,
        on_batch: Callable[[int], None] | None = None,
        warmup: Callable[[], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be ≥ 1 and max_wait ≥ 0")
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait, max_queue
        self.coalesce, self.on_batch = coalesce, on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.ready = threading.Event()  # set once the warm-up prediction has run
        self.warmup_error: BaseException | None = None
        self._warmup = warmup
        self._thread = threading.Thread(target=self._run, name="pv2tea-model", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet taken into a batch)."""
        return len(self._queue)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets its answers (or the exception its rows raised)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already queued")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the model thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch (jobs sharing a key, oldest first), or None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], len(first.items)
            if not self.coalesce:
                return batch
            deadline = time.perf_counter() + self.max_wait
            while rows < self.max_batch:
                for job in list(self._queue):
                    if job.key == first.key and rows + len(job.items) <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        rows += len(job.items)
                remaining = deadline - time.perf_counter()
                if rows >= self.max_batch or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        if self._warmup is not None:
            try:
                self._warmup()
            except BaseException as exc:  # reported by /ready; requests still get their own errors
                self.warmup_error = exc
        self.ready.set()
        while (batch := self._take()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # callers gone: skip
            if batch:
                self._predict(batch)

    def _predict(self, batch: list[Job]) -> None:
        items = [item for job in batch for item in job.items]
        payload = {k: v for job in batch for k, v in job.payload.items()}
        try:
            answers = list(self.predict(items, batch[0].key, payload))
            if len(answers) != len(items):
                raise RuntimeError(f"predict returned {len(answers)} answers for {len(items)} rows")
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for job in batch:  # find the culprit: each job alone
                self._predict_alone(job)
            return
        start = 0
        for job in batch:
            job.future.set_result(answers[start : start + len(job.items)])
            start += len(job.items)
        if self.on_batch is not None:
            self.on_batch(len(items))

    def _predict_alone(self, job: Job) -> None:
        try:
            answers = list(self.predict(job.items, job.key, job.payload))
            if len(answers) != len(job.items):
                raise RuntimeError(f"predict returned {len(answers)} answers for {len(job.items)} rows")
        except BaseException as exc:
            job.future.set_exception(exc)
            return
        job.future.set_result(answers)
        if self.on_batch is not None:
            self.on_batch(len(job.items))
