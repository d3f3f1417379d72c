"""A trained tiny run on disk and real `loraens serve` processes on it (one per test module)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import make_questions, train_argv

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl

DEVICE = ("--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="session")
def served_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-member run of the tiny model, trained in fp32 through the CLI."""
    root = tmp_path_factory.mktemp("served")
    train, evaluation = root / "train.jsonl", root / "eval.jsonl"
    write_questions_jsonl(make_questions(16, seed=1), train)
    write_questions_jsonl(make_questions(8, seed=2), evaluation)
    out = root / "run"
    fp32 = ("--runtime.device", "cpu", "--runtime.precision", "fp32")
    main(train_argv(tiny_model_dir, train, evaluation, out, "--optim.epochs", "1", *fp32))
    return out


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def start_server(tmp_path_factory) -> Iterator[Callable[..., Server]]:
    """Start `python -m loraens serve RUN FLAGS...` and wait until /health answers."""
    servers: list[Server] = []

    def start(run: Path, *flags: str) -> Server:
        port = _free_port()
        log = tmp_path_factory.mktemp("server") / "server.log"
        command = [sys.executable, "-m", "loraens", "serve", str(run), "--port", str(port)]
        # One thread: the tiny model is latency-bound, and the test process holds other cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "w") as handle:
            process = subprocess.Popen(
                [*command, *DEVICE, *flags], stdout=handle, stderr=subprocess.STDOUT, env=env
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        deadline = time.monotonic() + 180  # a readiness wait, not a timing assertion
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{log.read_text()}")
            time.sleep(0.2)

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
