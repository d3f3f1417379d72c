"""A full queue gets 503 with Retry-After; SIGTERM finishes the request in flight, then exits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

import httpx
import pytest

# A long gathering wait keeps a request pending for seconds: long enough to see it queued.
FLAGS = ("--max_queue", "4", "--max_request_questions", "4", "--max_wait_ms", "3000")
QUESTION = {"question": "Which is red?", "choices": ["red", "blue", "green"]}


@pytest.fixture(scope="module")
def server(start_server, served_run):
    return start_server(served_run, *FLAGS)


def _in_background(server, n_questions: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def send():
        with server.client() as client:
            result["response"] = client.post(
                "/v1/predict", json={"questions": [QUESTION] * n_questions}
            )

    thread = threading.Thread(target=send)
    thread.start()
    return thread, result


def _wait_until_pending(server, n: int, below: bool = False) -> None:
    """Wait until at least ``n`` questions are pending (``below``: at most ``n``)."""

    def reached(pending: int) -> bool:
        return pending <= n if below else pending >= n

    with server.client() as client:
        deadline = time.monotonic() + 60  # a readiness wait, not a timing assertion
        while not reached(client.get("/health").json()["pending_questions"]):
            assert time.monotonic() < deadline, f"pending questions never reached {n}"
            time.sleep(0.02)


def test_a_full_queue_gets_503_with_retry_after_and_the_server_goes_on(server):
    thread, result = _in_background(server, 4)
    _wait_until_pending(server, 4)
    with server.client() as client:
        refused = client.post("/v1/predict", json={"questions": [QUESTION]})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1" and "pending" in refused.json()["detail"]
    thread.join(120)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["answers"]) == 4


def test_a_request_whose_client_left_is_dropped_before_its_pass(server):
    with server.client() as client:
        passes = client.get("/health").json()["passes"]

    async def leave_early():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            task = asyncio.create_task(
                client.post("/v1/predict", json={"questions": [QUESTION] * 3})
            )
            await asyncio.to_thread(_wait_until_pending, server, 3)
            task.cancel()  # closes its connection while the request waits for its pass
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())
    _wait_until_pending(server, 0, below=True)
    with server.client() as client:
        health = client.get("/health").json()
        assert health["passes"] == passes  # no pass was spent on it
        assert client.post("/v1/predict", json={"questions": [QUESTION]}).status_code == 200


def test_sigterm_answers_the_request_in_flight_then_exits(server):
    thread, result = _in_background(server, 2)
    _wait_until_pending(server, 2)
    code = server.stop(signal.SIGTERM)
    thread.join(120)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["answers"]) == 2
    # uvicorn re-raises the signal after its graceful shutdown: killed by SIGTERM, or 0
    assert code in (0, -signal.SIGTERM)
    assert "batcher drained" in server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=5)
