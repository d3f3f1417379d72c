"""Dynamic batching: concurrent requests gathered into one pass on a single worker thread.

Requests arrive on the event loop; torch work must not run there (it would stall every other
connection), and it must not run on many threads at once (each pass already uses every core,
and the stacked pass is only efficient when it sees many questions at once). So one worker
thread owns the model: it waits for the first pending request, keeps gathering until the batch
holds ``max_batch`` questions or ``max_wait_s`` has passed since that request arrived, then runs
the whole batch through ``process`` and hands each request its own slice of the results.

The queue is bounded in questions (``max_pending``, counting those being computed), so overload
is refused up front (:class:`QueueFull`, HTTP 503) instead of growing latency and memory without
limit. :meth:`Batcher.close` stops accepting and lets the worker finish everything queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More questions are pending than the server may hold; retry later."""


class Closed(RuntimeError):
    """The server is shutting down and accepts no new work."""


@dataclass
class _Job:
    items: Sequence[Any]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Feed ``process(items) -> results`` (one result per item, same order) from many callers.

    With ``gather=False`` every request is processed on its own as soon as the worker is free
    (the naive server the load test compares against). ``after_pass`` runs on the worker after
    every pass, once its results are handed out (the server returns freed memory there).
    """

    def __init__(
        self,
        process: Callable[[list[Any]], list[Any]],
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        max_pending: int = 1024,
        gather: bool = True,
        after_pass: Callable[[], object] | None = None,
    ):
        if max_batch < 1 or max_pending < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_pending must be >= 1 and max_wait_s >= 0.")
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.gather = gather
        self._after_pass = after_pass
        self._queue: deque[_Job] = deque()
        self._queued = 0  # questions in _queue
        self._pending = 0  # questions queued or being computed
        self._closed = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loraens-batcher", daemon=True)
        self.passes = 0  # passes started so far (for /health and tests)

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: Sequence[Any]) -> Future:
        """Queue one request's items; the future resolves to their results, in order."""
        job = _Job(list(items))
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._pending + len(job.items) > self.max_pending:
                raise QueueFull(f"{self._pending} questions are pending (limit {self.max_pending})")
            self._queue.append(job)
            self._queued += len(job.items)
            self._pending += len(job.items)
            self._lock.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting; the worker finishes every queued request, then exits."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next_batch(self) -> list[_Job] | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if not self._queue:
                return None  # closed and drained
            if self.gather:
                deadline = self._queue[0].arrived + self.max_wait_s
                while self._queued < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
            jobs = [self._queue.popleft()]
            size = len(jobs[0].items)  # a request larger than max_batch still goes whole
            while (
                self.gather and self._queue and size + len(self._queue[0].items) <= self.max_batch
            ):
                size += len(self._queue[0].items)
                jobs.append(self._queue.popleft())
            self._queued -= size
            return jobs

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            # A request whose client went away is dropped here, before any work is spent on it.
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            items = [item for job in live for item in job.items]
            if items:
                self.passes += 1
            try:
                results = self._process(items) if items else []
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for {len(items)} items")
            except Exception as err:  # one bad batch must not take the server down
                log.exception("a batch of %d questions failed", len(items))
                for job in live:
                    job.future.set_exception(err)
            else:
                start = 0
                for job in live:
                    job.future.set_result(results[start : start + len(job.items)])
                    start += len(job.items)
            finally:
                with self._lock:
                    self._pending -= sum(len(job.items) for job in jobs)
            if items and self._after_pass is not None:
                try:
                    self._after_pass()
                except Exception:
                    log.exception("after_pass failed")
