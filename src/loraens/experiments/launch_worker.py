"""What a launcher's worker does with one cell (a Ray task, a SLURM job): take the cell's lock,
log to the cell's own file, run it through :func:`loraens.experiments.runner.run_cell`.

Launcher state lives under ``OUT/<experiment>/.launcher/`` (hidden: the report never takes it
for a run, and the cell folders hold exactly what a serial run writes):

- ``logs/<task>/<cell>/seed-<s>.log``: the cell's log, appended to by every attempt, whose tail
  the launcher shows when the cell fails;
- ``locks/<task>/<cell>/seed-<s>.lock``: held (``flock``) while a worker runs the cell, so a
  second launcher, or a retry that overlaps the first attempt, leaves it alone instead of
  writing the same folder twice; the lock goes with the process, so a killed worker leaves none
  behind, and ``--plan`` reports the cell as running while it is held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraens.experiments.runner import CellOutcome, cell_dir, run_cell
from loraens.experiments.spec import Cell, Experiment

try:
    import fcntl
except ImportError:  # Windows: no flock; cells run unlocked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LAUNCHER_DIR = ".launcher"
RUNNING = "running"
"""A :class:`CellOutcome` status: another worker holds the cell, nothing was done."""


def launcher_dir(root: Path, experiment: Experiment) -> Path:
    return root / experiment.name / LAUNCHER_DIR


def cell_log(root: Path, experiment: Experiment, cell: Cell) -> Path:
    return launcher_dir(root, experiment) / "logs" / cell.task / cell.name / f"seed-{cell.seed}.log"


def _lock_path(root: Path, experiment: Experiment, cell: Cell) -> Path:
    return (
        launcher_dir(root, experiment) / "locks" / cell.task / cell.name / f"seed-{cell.seed}.lock"
    )


@contextlib.contextmanager
def cell_lock(root: Path, experiment: Experiment, cell: Cell) -> Iterator[bool]:
    """Hold the cell's lock while the block runs; yields False when another process holds it.
    A file system without locks (some network mounts) yields True: the cell runs unlocked."""
    path = _lock_path(root, experiment, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as err:  # ENOLCK and friends: no lock service on this mount
            log.warning("%s: cannot lock %s (%s); running unlocked", cell.key, path, err)
            yield True
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.uname().nodename} pid {os.getpid()} since {time.ctime()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cell_running(root: Path, experiment: Experiment, cell: Cell) -> bool:
    """Whether a worker, on any machine sharing the folder, holds the cell's lock now."""
    path = _lock_path(root, experiment, cell)
    if fcntl is None or not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a cell's log ("" when it has none yet)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Send loraens's log records to ``path`` too (appending: a resumed cell keeps the log of
    its earlier attempts). A worker process has no CLI to set up logging, so the level is set
    here and restored after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("loraens")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run_logged_cell(experiment: Experiment, cell: Cell, root: Path, *after: Any) -> CellOutcome:
    """Run one cell in a worker: locked, logged to its file, skipped when complete. ``after``
    is ignored: Ray passes the source cell's result there, so a posterior cell waits for it."""
    folder = cell_dir(root, experiment, cell)
    with cell_lock(root, experiment, cell) as held:
        if not held:
            return CellOutcome(cell, folder, RUNNING, error="another worker is running it")
        with _logging_to(cell_log(root, experiment, cell)):
            log.info("%s: on %s, pid %d", cell.key, os.uname().nodename, os.getpid())
            try:
                return run_cell(experiment, cell, root)
            except BaseException:
                # Whatever kills the cell (a bug, an interrupt) ends up in the tail shown.
                log.exception("%s: stopped by", cell.key)
                raise


class CellJob:
    """A submitit job for one cell, run from the submitting command's folder (``cwd``: relative
    paths then mean what they meant there). It has submitit's ``checkpoint`` hook, so on
    preemption or timeout (SIGUSR2 before SLURM's kill) submitit requeues the same job, which
    resumes the cell from its last epoch checkpoint."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd

    def __call__(self, experiment: Experiment, cell: Cell, root: Path) -> CellOutcome:
        if Path(self.cwd).is_dir():
            os.chdir(self.cwd)
        return run_logged_cell(experiment, cell, root)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)
