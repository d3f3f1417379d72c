"""Wall time of one `loraens train` run in 1 process vs N processes (torchrun) on one machine.

    .venv/bin/python bench/distributed.py                       # SmolLM2-135M, cqa, M=2, 1 vs 2
    .venv/bin/python bench/distributed.py --nproc 1 2 4 --members 4 --device cuda

Each configuration is the same run (same seeds, same questions): only the number of processes
changes, and the CPU threads are shared among them (``--threads`` in all, default every core), so
1 process × 2 threads is compared with 2 processes × 1 thread on a 2-core machine. The model is
converted / loaded once before timing. Reported per configuration: wall time of the whole
command (process start, imports, model load, training, evaluation, writing), the run's own train
seconds and tokens/s from summary.json, and the largest difference of any metric from the
1-process run (the runs must agree; see docs/distributed.md). Results also go to
bench/results/distributed-<timestamp>.json with the environment and load average, since a busy
machine makes such timings meaningless.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraens.rundir import RunDir, read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument("--task", default="cqa")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=32)
    parser.add_argument("--eval-limit", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--keep", type=Path, default=None, help="keep run folders here")
    parser.add_argument("--json", type=Path, default=None, help="results file")
    return parser.parse_args()


def _command(args: argparse.Namespace, nproc: int, out: Path) -> list[str]:
    train = [
        "train", "--out", str(out), "--model.name_or_path", args.model,
        "--data.task", args.task, "--data.train_limit", str(args.train_limit),
        "--data.eval_limit", str(args.eval_limit), "--ensemble.members", str(args.members),
        "--optim.epochs", str(args.epochs), "--runtime.device", args.device,
        "--runtime.precision", args.precision, "--runtime.progress", "false",
    ]  # fmt: skip
    if nproc == 1:
        return [sys.executable, "-m", "loraens.cli.main", *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc_per_node", str(nproc), "-m", "loraens.cli.main", *train]


def _metric_rows(run: Path) -> list[dict]:
    return read_jsonl(RunDir(run).metrics)


def _max_difference(a: list[dict], b: list[dict]) -> float:
    return max(
        (abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x if isinstance(x[k], float)),
        default=0.0,
    )


def main() -> None:
    args = _args()
    from loraens.models.loading import resolve_model_path

    resolve_model_path(args.model)  # convert the default model now, not inside a timing
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loraens-dist-bench-"))
    results = []
    for nproc in args.nproc:
        out = folder / f"nproc-{nproc}"
        threads = max(1, args.threads // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        print(f"{nproc} process(es) x {threads} thread(s) ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        subprocess.run(_command(args, nproc, out), env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = RunDir(out).read_summary()
        results.append(
            {
                "processes": nproc,
                "threads_per_process": threads,
                "wall_seconds": wall,
                "train_seconds": summary.train_seconds,
                "train_tokens_per_second": summary.train_tokens_per_second,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0],
                "rows": _metric_rows(out),
            }
        )
    base = results[0]
    print(f"\n{args.model}, {args.task}, M={args.members}, {args.train_limit} train / "
          f"{args.eval_limit} eval questions, {args.epochs} epoch(s)")  # fmt: skip
    print(f"{'procs':>5} {'threads':>7} {'wall s':>8} {'train s':>8} {'tok/s':>8} "
          f"{'speed-up':>9} {'max metric diff':>16}")  # fmt: skip
    for r in results:
        diff = _max_difference(base["rows"], r["rows"])
        print(
            f"{r['processes']:>5} {r['threads_per_process']:>7} {r['wall_seconds']:>8.1f} "
            f"{r['train_seconds']:>8.1f} {r['train_tokens_per_second']:>8.0f} "
            f"{base['wall_seconds'] / r['wall_seconds']:>8.2f}x {diff:>16.2e}"
        )
    print("load average (1 min) before/after: "
          + ", ".join(f"{r['load_average_before']:.2f}/{r['load_average_after']:.2f}"
                      for r in results))  # fmt: skip
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS / f"distributed-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for r in results:
        r.pop("rows")
    path.write_text(json.dumps({"args": vars(args) | {"keep": str(args.keep)},
                                "environment": environment, "results": results},
                               indent=2, default=str))  # fmt: skip
    print(f"results: {path}")


if __name__ == "__main__":
    main()
