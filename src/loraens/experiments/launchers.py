"""Where an experiment's cells run: here one after another (``local``), as Ray tasks (``ray``), or
as SLURM jobs through submitit (``slurm``). The engines schedule; this module only maps cells to
their tasks or jobs and reports what happened.

Every launcher keeps the serial runner's invariants, because every cell, wherever it runs, goes
through :func:`loraens.experiments.runner.run_cell` (in a worker, through
:func:`loraens.experiments.launch_worker.run_logged_cell`): finished cells are skipped (here,
before anything is sent), an interrupted one resumes from its checkpoint, a failure is returned
and does not stop the others, and the records are those of a serial run with the same seeds.
A posterior cell starts only after its source cell has ended: Ray passes it the source task's
result, SLURM holds it with ``--dependency=afterany`` (submitit's local executor, which has no
dependencies, submits it once the source job has ended).

The run directories must be on a file system every worker sees at the same path.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraens.experiments.launch_worker import (
    RUNNING,
    CellJob,
    cell_log,
    launcher_dir,
    log_tail,
    run_logged_cell,
)
from loraens.experiments.runner import (
    CellOutcome,
    cell_complete,
    cell_dir,
    order_cells,
    run_cell,
    run_experiment,
)
from loraens.experiments.spec import Cell, Experiment, source_key

log = logging.getLogger(__name__)

Launcher = Literal["local", "ray", "slurm"]
Work = Callable[..., CellOutcome]
"""What a worker runs for a cell: ``(experiment, cell, root, *after) -> CellOutcome``."""


@dataclass(frozen=True)
class CellResources:
    """What one cell asks of the Ray cluster or of SLURM (the local launcher ignores it)."""

    cpus: int = 1
    gpus: float = 0
    """Ray accepts a fraction (0.5: two cells share a GPU); SLURM needs a whole number."""
    mem_gb: float | None = None


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None
    """A running cluster ("auto", "HOST:6379", "ray://HOST:10001"); None: the RAY_ADDRESS
    environment variable, or else a cluster started here for this command."""
    num_cpus: int | None = None
    """CPUs of a cluster started here (None: all cores)."""
    max_retries: int = 2
    """Times Ray reruns a cell whose worker died (a lost node, an OOM kill); the rerun resumes
    from the cell's checkpoint."""


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time_min: int = 240
    """Per job. A job reaching it is requeued by submitit and resumes from its checkpoint."""
    account: str | None = None
    max_parallel: int = 256
    """Array tasks of this experiment running at once."""
    cluster: Literal["slurm", "local"] = "slurm"
    """"local": submitit runs the jobs as processes on this machine, all at once (to try a
    small experiment, or in tests), with the same job files."""


@dataclass(frozen=True)
class LaunchOptions:
    launcher: Launcher = "local"
    resources: CellResources = field(default_factory=CellResources)
    ray: RayOptions = field(default_factory=RayOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


def launch(
    experiment: Experiment, cells: list[Cell], root: Path, options: LaunchOptions
) -> list[CellOutcome]:
    """Run ``cells`` with the chosen launcher; outcomes in running order (posterior cells
    last), as :func:`loraens.experiments.runner.run_experiment` returns them."""
    if options.launcher == "local":
        return run_experiment(experiment, cells, root)
    if options.launcher == "ray":
        return launch_ray(experiment, cells, root, options.resources, options.ray)
    if options.launcher == "slurm":
        return launch_slurm(experiment, cells, root, options.resources, options.slurm)
    raise ValueError(f"--launcher must be local, ray or slurm, not {options.launcher!r}.")


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        # RuntimeError: the CLI shows it as one line a user can act on, not a traceback.
        raise RuntimeError(
            f"{module} is not installed: pip install 'loraens[{extra}]' (or --launcher local)."
        ) from None


def _split(
    experiment: Experiment, cells: list[Cell], root: Path
) -> tuple[list[CellOutcome], list[Cell]]:
    """Complete cells, skipped here (no task or job for them), and the cells to send, in
    running order."""
    skipped, todo = [], []
    for cell in order_cells(cells):
        if cell_complete(experiment, cell, root):
            skipped.append(run_cell(experiment, cell, root))  # tags it if it was not yet
        else:
            todo.append(cell)
    return skipped, todo


def _failed(experiment: Experiment, cell: Cell, root: Path, error: str) -> CellOutcome:
    return CellOutcome(cell, cell_dir(root, experiment, cell), "failed", error=error)


def _finish(
    experiment: Experiment, cells: list[Cell], root: Path, outcomes: list[CellOutcome]
) -> list[CellOutcome]:
    """Outcomes in running order; each failure logged with the tail of the cell's log, and its
    error pointing at the whole log."""
    order = {cell.key: index for index, cell in enumerate(order_cells(cells))}
    finished = []
    for outcome in sorted(outcomes, key=lambda o: order[o.cell.key]):
        if outcome.status == "failed":
            path = cell_log(root, experiment, outcome.cell)
            tail = log_tail(path)
            log.error(
                "%s failed: %s\n--- last lines of %s ---\n%s",
                outcome.cell.key,
                outcome.error,
                path,
                tail or "(no log: the worker stopped before the cell started)",
            )
            if path.is_file() and str(path) not in outcome.error:
                outcome.error = f"{outcome.error} (log: {path})"
        finished.append(outcome)
    return finished


def _progress(done: int, total: int, outcome: CellOutcome) -> None:
    detail = f" in {outcome.seconds:.0f} s" if outcome.status == "done" else ""
    if outcome.status == RUNNING:
        detail = " elsewhere (another worker holds it): left alone"
    log.info("[%d/%d] %s: %s%s", done, total, outcome.cell.key, outcome.status, detail)


# ----------------------------------------------------------------------------- Ray


def launch_ray(
    experiment: Experiment,
    cells: list[Cell],
    root: Path,
    resources: CellResources,
    options: RayOptions,
    work: Work = run_logged_cell,
) -> list[CellOutcome]:
    """Each cell a Ray task with ``resources``; a posterior cell's task takes its source's
    result as an argument, so Ray starts it only once the source has ended. ``work`` is what a
    task runs (tests pass one that dies mid-cell)."""
    ray = _require("ray", "ray")
    skipped, todo = _split(experiment, cells, root)
    if not todo:  # nothing to send: no cluster to join or start
        return _finish(experiment, cells, root, skipped)
    started = _connect_ray(ray, options)
    try:
        refs = _submit_ray(ray, experiment, todo, root, resources, options, work)
        outcomes = _collect_ray(ray, experiment, todo, root, refs)
    finally:
        if started:
            ray.shutdown()
    return _finish(experiment, cells, root, skipped + outcomes)


def _connect_ray(ray: Any, options: RayOptions) -> bool:
    """Join the cluster (or start one here); True when this call started the connection."""
    if ray.is_initialized():  # the caller's own session (a notebook, the tests)
        return False
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log.info("joined the Ray cluster at %s", address)
    else:
        # No dashboard: it needs ray[default], and nobody watches a cluster this short-lived.
        ray.init(num_cpus=options.num_cpus, include_dashboard=False)
        log.info("started a local Ray cluster (%s CPUs)", options.num_cpus or "all")
    return True


def _in_folder(cwd: str, work: Work, *args: Any) -> CellOutcome:
    """Run ``work`` from the driver's working directory, so relative paths (``--out``, model
    folders and data files in the experiment file) mean the same on a worker with the same file
    system, and the records (a run's README names its folder) equal a serial run's."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
    return work(*args)


def _submit_ray(
    ray: Any,
    experiment: Experiment,
    todo: list[Cell],
    root: Path,
    resources: CellResources,
    options: RayOptions,
    work: Work,
) -> dict[str, Any]:
    task = ray.remote(_in_folder)
    asked = {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "memory": int(resources.mem_gb * 1e9) if resources.mem_gb else None,
        "max_retries": options.max_retries,
    }
    shared = ray.put(experiment)  # one copy in the object store, not one per task
    refs: dict[str, Any] = {}
    for cell in todo:  # running order: a source is submitted before its posterior cells
        source = refs.get(source_key(cell)) if cell.kind == "posterior" else None
        after = [] if source is None else [source]
        refs[cell.key] = task.options(**asked, name=f"loraens {cell.key}").remote(
            os.getcwd(), work, shared, cell, root, *after
        )
    return refs


def _collect_ray(
    ray: Any, experiment: Experiment, todo: list[Cell], root: Path, refs: dict[str, Any]
) -> list[CellOutcome]:
    by_ref = {refs[cell.key]: cell for cell in todo}
    pending, outcomes = list(by_ref), []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        cell = by_ref[ready[0]]
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            outcome = _failed(experiment, cell, root, _ray_error(ray, cell, err, refs))
        outcomes.append(outcome)
        _progress(len(outcomes), len(todo), outcome)
    return outcomes


def _ray_error(ray: Any, cell: Cell, err: Exception, refs: dict[str, Any]) -> str:
    """One line: why the task failed, or that it never ran because its source's task failed
    (Ray then raises the source's error for it too)."""
    source = refs.get(source_key(cell)) if cell.kind == "posterior" else None
    if source is not None:
        try:
            ray.get(source, timeout=0)  # ended already: this task's failure came after
        except ray.exceptions.GetTimeoutError:
            pass
        except ray.exceptions.RayError:
            return f"not run: the task of its source cell {source_key(cell)} failed"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ----------------------------------------------------------------------------- SLURM


def slurm_executor(
    folder: Path, experiment: Experiment, resources: CellResources, options: SlurmOptions
) -> Any:
    """A submitit executor whose jobs ask for ``resources``: one job per cell, the first wave
    (every cell but the posterior ones) submitted as one job array."""
    submitit = _require("submitit", "slurm")
    if resources.gpus != int(resources.gpus):
        raise ValueError(f"SLURM allocates whole GPUs: --gpus_per_cell {resources.gpus}.")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    except RuntimeError as err:  # submitit found no srun
        raise RuntimeError(
            f"{err} Submit from a SLURM login node, or pass --slurm_cluster local to run the "
            "jobs as processes on this machine."
        ) from None
    parameters: dict[str, Any] = {
        "name": f"loraens-{experiment.name}",
        "timeout_min": options.time_min,
        "cpus_per_task": resources.cpus,
        "gpus_per_node": int(resources.gpus),
        "mem_gb": resources.mem_gb,  # None: the partition's default
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_array_parallelism": options.max_parallel,
    }
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return executor


def launch_slurm(
    experiment: Experiment,
    cells: list[Cell],
    root: Path,
    resources: CellResources,
    options: SlurmOptions,
    work: Work | None = None,
) -> list[CellOutcome]:
    """Submit every cell not complete as a SLURM job (through submitit) and wait for them."""
    _require("submitit", "slurm")
    skipped, todo = _split(experiment, cells, root)
    if not todo:
        return _finish(experiment, cells, root, skipped)
    jobs = submit_slurm(experiment, todo, root, resources, options, work)
    outcomes = _collect_slurm(experiment, todo, root, jobs)
    return _finish(experiment, cells, root, skipped + outcomes)


def submit_slurm(
    experiment: Experiment,
    cells: list[Cell],
    root: Path,
    resources: CellResources,
    options: SlurmOptions,
    work: Work | None = None,
) -> dict[str, Any]:
    """Submit one job per cell: every cell but the posterior ones as one job array, then each
    posterior cell held until its source's job has ended. ``work`` replaces the job's callable
    (tests); by default a :class:`CellJob`, which requeues itself on preemption."""
    submitit = _require("submitit", "slurm")
    folder = launcher_dir(root, experiment) / "submitit"
    executor = slurm_executor(folder, experiment, resources, options)
    job = work or CellJob(os.getcwd())
    cells = order_cells(cells)
    first = [c for c in cells if c.kind != "posterior"]
    jobs: dict[str, Any] = {}
    # clean_env: a driver that is itself a SLURM job must not pass its own job's variables on.
    if first:
        with submitit.helpers.clean_env(), executor.batch():
            for cell in first:
                jobs[cell.key] = executor.submit(job, experiment, cell, root)
    for cell in cells[len(first) :]:
        source = jobs.get(source_key(cell))
        dependency = {}
        if source is not None and options.cluster == "slurm":
            # afterany, not afterok: a failed source still releases the job, which then fails
            # at once saying so, instead of pending forever.
            dependency = {"dependency": f"afterany:{source.job_id}"}
        elif source is not None:
            source.wait()  # submitit's local executor knows no dependencies
        executor.update_parameters(slurm_additional_parameters=dependency)
        with submitit.helpers.clean_env():
            jobs[cell.key] = executor.submit(job, experiment, cell, root)
    log.info("submitted %d job(s) for %s; submitit's files: %s", len(jobs), experiment.name, folder)
    return jobs


def _collect_slurm(
    experiment: Experiment, todo: list[Cell], root: Path, jobs: dict[str, Any]
) -> list[CellOutcome]:
    from submitit.helpers import as_completed

    cells = {jobs[cell.key].job_id: cell for cell in todo}
    outcomes = []
    for job in as_completed(list(jobs.values()), poll_frequency=2):
        cell = cells[job.job_id]
        try:
            outcome = job.result()
        except Exception as err:  # whatever ended the job; its stderr is kept by submitit
            lines = [line for line in str(err).splitlines() if line.strip()]
            outcome = _failed(
                experiment, cell, root, f"job {job.job_id}: {lines[0] if lines else err!r}"
            )
            if not cell_log(root, experiment, cell).is_file():
                log.error(
                    "%s: job stderr:\n%s",
                    cell.key,
                    "\n".join((job.stderr() or "").splitlines()[-20:]),
                )
        outcomes.append(outcome)
        _progress(len(outcomes), len(todo), outcome)
    return outcomes
