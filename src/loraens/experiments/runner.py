"""`loraens experiment FILE`: run every cell of an experiment, skipping finished ones.

A cell's directory is complete once its last file is written (summary.json for training,
few_shot.json for few-shot), so a rerun skips it; an interrupted training cell continues from
its last checkpoint (see loraens.training.run). A failing cell does not stop the others: the
failures are listed at the end and the command exits non-zero.

A posterior cell (``kind: posterior``) is fitted on its source training cell's members, after
every training cell, and written as a run of its own (:mod:`loraens.posteriors`).

A training or posterior cell is then scored on the experiment's ``ood_eval`` sets
(:mod:`loraens.decisions.ood`): ``ood/<set>_log_probs.safetensors`` and ``ood/<set>.json`` per
set; a set lacking either is scored again on a rerun, without retraining.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraens.experiments.spec import Cell, Experiment, source_key
from loraens.rundir import CellRecord, RunDir

log = logging.getLogger(__name__)


def cell_dir(root: Path, experiment: Experiment, cell: Cell) -> Path:
    return root / experiment.name / cell.task / cell.name / f"seed-{cell.seed}"


def _ood_task_done(run: RunDir, task: str) -> bool:
    """An OOD evaluation is complete once its per-question records and its JSON exist (the
    JSON is written last; a cell scored before the records were kept is scored again)."""
    return run.ood_log_probs(task).is_file() and run.ood_result(task).is_file()


def _ood_done(experiment: Experiment, cell: Cell, folder: Path) -> bool:
    if cell.kind == "few_shot":
        return True
    return all(_ood_task_done(RunDir(folder), t) for t in experiment.ood_eval.tasks)


def cell_status(folder: Path, cell: Cell) -> str:
    """'done', 'partial' (started, resumable) or 'todo'."""
    run = RunDir(folder)
    done_marker = run.few_shot if cell.kind == "few_shot" else run.summary
    if done_marker.exists():
        return "done"
    if run.checkpoint_state.exists():
        return "partial"
    return "todo"


@dataclass
class CellOutcome:
    cell: Cell
    folder: Path
    status: str  # done (now or before), skipped, failed
    seconds: float = 0.0
    error: str = ""


def _cell_record(experiment: Experiment, cell: Cell) -> CellRecord:
    return CellRecord(
        experiment=experiment.name, task=cell.task, cell=cell.name, seed=cell.seed, kind=cell.kind
    )


def _run_training(cell: Cell, folder: Path) -> None:
    from loraens.training.run import train_ensemble

    train_ensemble(cell.config, folder)


def _run_few_shot(cell: Cell, folder: Path) -> None:
    from loraens.baselines.few_shot import run_few_shot
    from loraens.evaluation.predictions import write_predictions

    cfg = cell.config
    scores = run_few_shot(
        cfg.model.name_or_path,
        cfg.data,
        cfg.runtime,
        k=cell.few_shot.get("k", 3),
        draws=cell.few_shot.get("draws", 3),
        seed=cell.seed,
        max_length=cell.few_shot.get("max_length", cfg.model.max_length),
        scoring=cfg.model.scoring,
        normalization=cfg.model.normalization,
    )
    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    # Draws take the members' place, so the report reads them like any run's predictions.
    write_predictions(run.predictions, scores.eval_questions, scores.log_probs)
    run.write_few_shot(scores.result)  # last: marks the cell complete


def _run_posterior(experiment: Experiment, cell: Cell, root: Path, folder: Path) -> None:
    """Fit the cell's posterior on its source cell's members (finished first: the runner
    orders posterior cells last)."""
    from loraens.decisions.run import fit_posterior_with_decisions

    assert cell.posterior is not None
    source = root / experiment.name / source_key(cell)
    if not RunDir(source).summary.exists():
        raise ValueError(
            f"{cell.key} is fitted on {source_key(cell)}, which has not finished: run it first."
        )
    runtime = cell.config.runtime
    fit_posterior_with_decisions(
        source,
        cell.posterior,
        folder,
        device=runtime.device,
        precision=runtime.precision,
        trust_remote_code=cell.config.model.trust_remote_code,
    )


def _run_ood_eval(experiment: Experiment, cell: Cell, folder: Path) -> None:
    """Score a finished training cell (LoRA, MC dropout or last-layer) on the experiment's
    ood_eval sets not yet done: per-question records, then the JSON with the "+ TS" figures
    when the run is calibrated. The model is loaded once for all of them; the in-distribution
    questions' scores are the run's own eval scores
    (:func:`~loraens.decisions.ood.stored_eval_log_probs`)."""
    from loraens.decisions.ood import evaluate_ood_sets, write_ood_evaluation

    run = RunDir(folder)
    todo = [t for t in experiment.ood_eval.tasks if not _ood_task_done(run, t)]
    if not todo:
        return
    log.info("%s: OOD evaluation on %s", cell.key, ", ".join(todo))
    # The cell's own precision: "auto" would score a pinned-fp32 experiment in bf16 on a
    # bf16-capable CPU, so its OOD figures would not compare with its in-distribution ones.
    runtime = cell.config.runtime
    evaluations = evaluate_ood_sets(
        folder,
        todo,
        limit=experiment.ood_eval.limit,
        # The subset seed, not the cell's: every seed and method of a task is then scored on
        # the same questions, so the report pairs them question by question.
        seed=cell.config.data.subset_seed,
        device=runtime.device,
        precision=runtime.precision,
        # From the user's experiment file, not the folder: training has just checked the
        # folder's config against it.
        trust_remote_code=cell.config.model.trust_remote_code,
    )
    for evaluated in evaluations:
        write_ood_evaluation(folder, evaluated)


def order_cells(cells: list[Cell]) -> list[Cell]:
    """The cells in running order: a posterior cell reads its source cell's members, so every
    training cell comes first."""
    return sorted(cells, key=lambda c: c.kind == "posterior")


def cell_complete(experiment: Experiment, cell: Cell, root: Path) -> bool:
    """Whether :func:`run_cell` would skip the cell (launchers then send it nowhere)."""
    folder = cell_dir(root, experiment, cell)
    return cell_status(folder, cell) == "done" and _ood_done(experiment, cell, folder)


def _run_cell_kind(experiment: Experiment, cell: Cell, root: Path, folder: Path) -> None:
    if cell.kind == "few_shot":
        _run_few_shot(cell, folder)
    elif cell.kind == "posterior":
        if cell_status(folder, cell) != "done":  # else only its OOD sets are left to score
            _run_posterior(experiment, cell, root, folder)
        _run_ood_eval(experiment, cell, folder)
    else:
        _run_training(cell, folder)
        _run_ood_eval(experiment, cell, folder)


def run_cell(experiment: Experiment, cell: Cell, root: Path, label: str = "") -> CellOutcome:
    """Run one cell, or skip it when it is complete; a failure is returned, not raised. Every
    launcher runs its cells through this, wherever they run."""
    label = label or cell.key
    folder = cell_dir(root, experiment, cell)
    status = cell_status(folder, cell)
    if status == "done" and _ood_done(experiment, cell, folder):
        if not RunDir(folder).cell.exists():  # finished, then stopped before tagging
            RunDir(folder).write_cell(_cell_record(experiment, cell))
        log.info("%s: already complete, skipped", label)
        return CellOutcome(cell, folder, "skipped")
    log.info("%s: %s", label, "resuming" if status == "partial" else "running")
    tick = time.perf_counter()
    try:
        _run_cell_kind(experiment, cell, root, folder)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"Interrupted in cell {cell.key}. Rerun the same `loraens experiment` command to "
            "continue: finished cells are skipped, this one resumes from its last checkpoint."
        ) from None
    except (ValueError, OSError, RuntimeError) as err:
        log.error("%s failed: %s", label, err)
        return CellOutcome(cell, folder, "failed", error=str(err))
    RunDir(folder).write_cell(_cell_record(experiment, cell))
    seconds = time.perf_counter() - tick
    log.info("%s: done in %.0f s", label, seconds)
    return CellOutcome(cell, folder, "done", seconds)


def run_experiment(experiment: Experiment, cells: list[Cell], root: Path) -> list[CellOutcome]:
    """Run ``cells`` (a selection of the experiment's) in order; return what happened to each."""
    cells = order_cells(cells)
    return [
        run_cell(experiment, cell, root, f"[{index}/{len(cells)}] {cell.key}")
        for index, cell in enumerate(cells, start=1)
    ]


def plan_table(
    experiment: Experiment,
    cells: list[Cell],
    root: Path,
    running: Callable[[Cell], bool] | None = None,
) -> str:
    """One line per cell: done, partial, todo, or running where ``running`` says a worker holds
    it now (:func:`loraens.experiments.launch_worker.cell_running`)."""
    lines = [f"{'status':<9}{'kind':<10}cell"]
    for cell in cells:
        status = cell_status(cell_dir(root, experiment, cell), cell)
        if status != "done" and running is not None and running(cell):
            status = "running"
        lines.append(f"{status:<9}{cell.kind:<10}{cell.key}")
    return "\n".join(lines)
