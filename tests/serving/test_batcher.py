"""The batcher on its own, with a stand-in for the model: deterministic, no torch, no HTTP."""

from __future__ import annotations

import threading

import pytest

from loraens.serving.batcher import Batcher, Closed, QueueFull


class Gate:
    """A ``process`` that records every batch and holds the first one until released, so a test
    can queue requests while the worker is busy (what concurrent clients do)."""

    def __init__(self):
        self.batches: list[list] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        if "boom" in items:
            raise ValueError("boom")
        return [item * 10 for item in items]


def test_requests_queued_while_busy_share_one_pass_and_get_their_own_results():
    gate = Gate()
    batcher = Batcher(gate, max_batch=10, max_wait_s=0)
    batcher.start()
    first = batcher.submit([1])
    assert gate.started.wait(10)
    # the worker is busy with [1]: these three queue up, 2 + 3 + 4 = 9 <= max_batch
    others = [batcher.submit([2, 3]), batcher.submit([4, 5, 6]), batcher.submit([7, 8, 9, 10])]
    assert batcher.pending == 10
    gate.release.set()
    assert first.result(10) == [10]
    assert [f.result(10) for f in others] == [[20, 30], [40, 50, 60], [70, 80, 90, 100]]
    assert gate.batches == [[1], [2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batcher.close(10)
    assert batcher.pending == 0


def test_a_batch_holds_at_most_max_batch_questions_but_never_splits_a_request():
    gate = Gate()
    batcher = Batcher(gate, max_batch=4, max_wait_s=0)
    batcher.start()
    batcher.submit([0])
    assert gate.started.wait(10)
    futures = [batcher.submit([1, 2, 3]), batcher.submit([4, 5]), batcher.submit([6, 7, 8, 9, 10])]
    gate.release.set()
    assert [f.result(10) for f in futures] == [[10, 20, 30], [40, 50], [60, 70, 80, 90, 100]]
    assert gate.batches[1:] == [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    batcher.close(10)


def test_without_gathering_every_request_is_its_own_pass():
    gate = Gate()
    batcher = Batcher(gate, max_batch=10, max_wait_s=0, gather=False)
    batcher.start()
    batcher.submit([0])
    assert gate.started.wait(10)
    futures = [batcher.submit([1]), batcher.submit([2])]
    gate.release.set()
    assert [f.result(10) for f in futures] == [[10], [20]]
    assert gate.batches == [[0], [1], [2]]
    batcher.close(10)


def test_a_full_queue_refuses_and_a_closed_batcher_drains_then_refuses():
    gate = Gate()
    batcher = Batcher(gate, max_batch=10, max_wait_s=0, max_pending=3)
    batcher.start()
    running = batcher.submit([1, 2])  # being computed: still counts as pending
    assert gate.started.wait(10)
    queued = batcher.submit([3])
    with pytest.raises(QueueFull):
        batcher.submit([4])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert running.result(0) == [10, 20] and queued.result(0) == [30]  # drained, not dropped
    with pytest.raises(Closed):
        batcher.submit([5])


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    gate = Gate()
    gate.release.set()
    batcher = Batcher(gate, max_batch=10, max_wait_s=0)
    batcher.start()
    with pytest.raises(ValueError, match="boom"):
        batcher.submit(["boom"]).result(10)
    assert batcher.submit([3]).result(10) == [30]
    batcher.close(10)


def test_a_cancelled_request_is_not_computed():
    gate = Gate()
    batcher = Batcher(gate, max_batch=10, max_wait_s=0)
    batcher.start()
    batcher.submit([1])
    assert gate.started.wait(10)
    gone = batcher.submit([2])
    kept = batcher.submit([3])
    assert gone.cancel()  # its client disconnected
    gate.release.set()
    assert kept.result(10) == [30]
    assert gate.batches == [[1], [3]]
    batcher.close(10)
    assert batcher.pending == 0


def test_after_pass_runs_once_per_pass_and_its_failure_does_not_stop_the_worker():
    calls = []

    def after_pass():
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("after_pass broke")

    batcher = Batcher(lambda items: [i * 10 for i in items], max_wait_s=0, after_pass=after_pass)
    batcher.start()
    assert batcher.submit([1]).result(10) == [10]
    assert batcher.submit([2, 3]).result(10) == [20, 30]
    batcher.close(10)
    assert calls == [0, 1]
    assert batcher.passes == 2
