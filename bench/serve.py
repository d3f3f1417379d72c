"""Load test of `loraens serve`: the batched server against a naive one, then an optional soak.

For each server mode, the script starts `python -m loraens serve RUN` on a free port, waits for
/health, and runs closed-loop asyncio + httpx clients (each sends a request, waits for the
answer, sends the next) at every ``--clients`` level for ``--duration`` seconds after a short
warm-up. Modes:

* **batched**: the server as shipped: concurrent requests gathered (up to ``--max_batch``
  questions, ``--max_wait_ms``) into one length-sorted stacked pass of all members.
* **naive**: the same server with ``--naive``: every request on its own, members one after the
  other (what a multi-adapter server does when asked for several adapters on one input).

Reported per (mode, clients): questions/s, p50/p95/p99 request latency, failed requests; and the
batched/naive throughput ratio per client count. Targets (issue 14): >= 3x at 64 clients, zero
failures.

``--soak-minutes N`` then runs the batched server at ``--soak-clients`` (8) for N minutes,
sampling the server's resident memory (VmRSS from /proc) every ``--rss-every`` seconds, and
reports the curve, its first/last/max and a least-squares slope in MB/min over the second half
(target: flat).

Questions: ``--file`` (JSONL, CSV or Parquet), or else the eval split of the run's own task.
Each request carries ``--questions-per-request`` questions (default 1), taken round-robin.
Everything is written to ``--json`` (default bench/results/serve-<timestamp>.json).

    .venv/bin/python bench/serve.py runs/demo-XXXX                  # 1, 8, 64 clients, 30 s each
    .venv/bin/python bench/serve.py runs/demo-XXXX --soak-minutes 10 # plus the 10-minute soak
    .venv/bin/python bench/serve.py runs/demo-XXXX --duration 10 --clients 1,8   # a short check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loraens.data.files import load_questions_file
from loraens.data.records import Question
from loraens.data.tasks import load_task
from loraens.provenance import library_versions
from loraens.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run directory written by `loraens train` (e.g. by `make demo`)")
    p.add_argument("--clients", default="1,8,64", help="concurrency levels, comma-separated")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured per level")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    p.add_argument("--modes", default="batched,naive", help="batched, naive or both")
    p.add_argument("--file", default=None, help="questions file (default: the run's eval split)")
    p.add_argument("--questions-per-request", type=int, default=1)
    p.add_argument("--soak-minutes", type=float, default=0.0)
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", type=Path, default=None, help="default bench/results/<timestamp>")
    return p.parse_args(argv)


def load_questions(args) -> list[Question]:
    if args.file:
        return load_questions_file(args.file, require_answer=False)
    cfg = RunDir(Path(args.run)).read_config()
    if cfg.data.task:
        return load_task(cfg.data.task)[1]
    if cfg.data.eval_file:
        return load_questions_file(cfg.data.eval_file, require_answer=False)
    raise ValueError("The run names no task or eval file: pass --file.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen
    url: str

    @classmethod
    def start(cls, args, naive: bool) -> Server:
        port = free_port()
        command = [
            sys.executable, "-m", "loraens", "serve", args.run, "--port", str(port),
            "--device", args.device, "--precision", args.precision,
            "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms),
            "--max_queue", str(max(1024, 4 * 64 * args.questions_per_request)),
            "--max_request_questions", str(max(64, args.questions_per_request)),
        ] + (["--naive", "true"] if naive else [])  # fmt: skip
        process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
        server = cls(process, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        server.stop()
        raise RuntimeError("the server did not come up in 10 minutes")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    questions: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def drive(url: str, payloads: list[dict], clients: int, seconds: float) -> tuple[Load, float]:
    """``clients`` closed-loop clients for ``seconds``: what they got and the elapsed time."""
    load = Load()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def one_client(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                payload = payloads[i % len(payloads)]
                i += clients
                sent = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", json=payload)
                    ok = response.status_code == 200
                    key = str(response.status_code)
                except httpx.HTTPError as err:
                    ok, key = False, type(err).__name__
                if ok:
                    load.latencies.append(time.perf_counter() - sent)
                    load.questions += len(payload["questions"])
                else:
                    load.failures += 1
                    load.errors[key] = load.errors.get(key, 0) + 1

        await asyncio.gather(*(one_client(c) for c in range(clients)))
        return load, time.perf_counter() - start


def summarize(load: Load, elapsed: float) -> dict:
    ms = np.asarray(load.latencies) * 1000
    pct = {
        f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)
    }
    return {
        "requests": len(load.latencies),
        "questions": load.questions,
        "failures": load.failures,
        "errors": load.errors,
        "seconds": round(elapsed, 2),
        "questions_per_s": round(load.questions / elapsed, 2),
        **pct,
    }


def payloads_of(questions: list[Question], per_request: int) -> list[dict]:
    payloads = []
    for start in range(0, len(questions) - per_request + 1, per_request):
        chunk = questions[start : start + per_request]
        payloads.append(
            {
                "questions": [
                    {"id": q.id, "question": q.question, "choices": list(q.choices)} for q in chunk
                ]
            }
        )
    return payloads


def measure(args, naive: bool, levels: list[int], payloads: list[dict]) -> list[dict]:
    mode = "naive" if naive else "batched"
    server = Server.start(args, naive)
    rows = []
    try:
        info = httpx.get(f"{server.url}/v1/info", timeout=30).json()
        keep = ("model", "method", "members", "device", "precision", "batching")
        print(f"{mode}: " + json.dumps({k: info[k] for k in keep}), file=sys.stderr)
        for clients in levels:
            asyncio.run(drive(server.url, payloads, clients, args.warmup))
            load, elapsed = asyncio.run(drive(server.url, payloads, clients, args.duration))
            row = {"mode": mode, "clients": clients, **summarize(load, elapsed)}
            row["server"] = {k: info[k] for k in keep}
            print(f"  {mode:<8}{clients:>4} clients: {row['questions_per_s']:>8.2f} q/s, "
                  f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                  f"{row['failures']} failed", file=sys.stderr)  # fmt: skip
            rows.append(row)
    finally:
        server.stop()
    return rows


def soak(args, payloads: list[dict]) -> dict:
    server = Server.start(args, naive=False)
    samples: list[tuple[float, float]] = []
    minutes = args.soak_minutes

    async def sample_rss(stop: asyncio.Event) -> None:
        start = time.perf_counter()
        while not stop.is_set():
            samples.append(
                (round(time.perf_counter() - start, 1), round(rss_mb(server.process.pid), 1))
            )
            try:
                await asyncio.wait_for(stop.wait(), args.rss_every)
            except TimeoutError:
                pass

    async def run() -> tuple[Load, float]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        result = await drive(server.url, payloads, args.soak_clients, minutes * 60)
        stop.set()
        await sampler
        return result

    try:
        load, elapsed = asyncio.run(run())
    finally:
        server.stop()
    t = np.asarray([s[0] for s in samples])
    rss = np.asarray([s[1] for s in samples])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half] / 60, rss[half], 1)[0]) if half.sum() >= 2 else None
    return {
        "minutes": minutes,
        "clients": args.soak_clients,
        **summarize(load, elapsed),
        "rss_mb_first": float(rss[0]),
        "rss_mb_last": float(rss[-1]),
        "rss_mb_max": float(rss.max()),
        "rss_slope_mb_per_min_second_half": None if slope is None else round(slope, 3),
        "rss_curve": samples,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | clients | questions/s | p50 ms | p95 ms | p99 ms | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['questions_per_s']:.2f} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['failures']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    payloads = payloads_of(load_questions(args), args.questions_per_request)
    if not payloads:
        raise ValueError("No questions to send.")
    result: dict = {
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "run": args.run,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "versions": library_versions(("loraens", "torch", "fastapi", "uvicorn", "httpx")),
        },
        "rows": [],
    }
    for mode in modes:
        if mode not in ("batched", "naive"):
            raise ValueError(f"unknown mode {mode!r}: batched or naive")
        result["rows"] += measure(args, mode == "naive", levels, payloads)
    by = {(r["mode"], r["clients"]): r["questions_per_s"] for r in result["rows"]}
    result["speedup"] = {
        str(c): round(by[("batched", c)] / by[("naive", c)], 2)
        for c in levels
        if by.get(("naive", c)) and ("batched", c) in by
    }
    if args.soak_minutes > 0:
        result["soak"] = soak(args, payloads)
    result["environment"]["load_average_end"] = os.getloadavg()

    out = args.json or ROOT / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result["rows"]))
    for clients, ratio in result["speedup"].items():
        print(f"batched / naive at {clients} clients: {ratio:.2f}x")
    if "soak" in result:
        s = result["soak"]
        print(
            f"soak: {s['minutes']} min at {s['clients']} clients, {s['failures']} failed, RSS "
            f"{s['rss_mb_first']:.0f} -> {s['rss_mb_last']:.0f} MB (max {s['rss_mb_max']:.0f}), "
            f"slope over the second half {s['rss_slope_mb_per_min_second_half']} MB/min"
        )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
