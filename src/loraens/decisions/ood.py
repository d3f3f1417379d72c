"""OOD evaluations of a finished run of any method, kept question by question (an experiment's
``ood_eval``).

:func:`evaluate_ood_sets` loads a run once (any method, a posterior's folder included:
:func:`~loraens.posteriors.load.run_scorer`), takes the in-distribution questions' scores
from the run's own eval (:func:`stored_eval_log_probs`; scored once otherwise) and scores each
OOD set in turn. :func:`write_ood_evaluation` writes each evaluation's
per-question records (``ood/<set>_log_probs.safetensors``) and then its JSON
(``ood/<set>.json``, :func:`~loraens.decisions.run.ood_json`): the JSON, written last, marks
the evaluation complete, so an interrupted run redoes only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from loraens.data.records import Question
from loraens.decisions.run import ood_json
from loraens.evaluation.ood import (
    RunOOD,
    check_ood_sets,
    in_distribution_questions,
    ood_questions,
    run_ood,
)
from loraens.io import write_json_atomic
from loraens.posteriors.load import run_scorer
from loraens.rundir import OODLogProbs, RunDir, read_jsonl

__all__ = ["evaluate_ood_sets", "ood_record", "stored_eval_log_probs", "write_ood_evaluation"]

log = logging.getLogger(__name__)


def evaluate_ood_sets(
    run: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = False,
    trust_remote_code: bool = False,
) -> Iterator[RunOOD]:
    """The run's OOD evaluation on each task's eval split, in order: at most ``limit``
    questions of each set and of the run's own eval split, drawn with ``seed`` (so every task
    is told apart from the same in-distribution questions, scored once)."""
    if not tasks:
        return
    in_questions = in_distribution_questions(run, limit, seed)
    sets = [ood_questions(run, task, None, limit, seed) for task in tasks]
    for _, questions in sets:
        check_ood_sets(in_questions, questions)
    score = run_scorer(
        run,
        device=device,
        precision=precision,
        batch_size=batch_size,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    lp_in = stored_eval_log_probs(run, in_questions)
    if lp_in is None:
        log.info("%s: scoring %d in-distribution questions", run, len(in_questions))
        lp_in = score(in_questions)
    else:
        log.info("%s: its own eval scores of the %d in-distribution questions", run, len(lp_in[0]))
    for name, questions in sets:
        log.info("%s: OOD evaluation on %s (%d questions)", run, name, len(questions))
        yield run_ood(name, in_questions, questions, lp_in, score(questions))


def stored_eval_log_probs(run: str | Path, questions: Sequence[Question]) -> np.ndarray | None:
    """The run's (M, N, K) log-probs of ``questions`` as its own eval scored them at the kept
    epoch, when it scored every one of them; None otherwise.

    The in-distribution questions of an OOD evaluation are drawn from the run's eval set, so
    scoring them again repeats the eval pass: the same numbers for LoRA members and a
    posterior's fixed draws (MC dropout: other masks of the same model), at the price of what
    is a posterior's costliest pass (Laplace's Jacobians, TFB's draws)."""
    folder = RunDir(Path(run))
    try:
        evals = folder.read_eval_log_probs()
        kept = folder.read_summary().epoch_kept
        ids = [str(row["id"]) for row in read_jsonl(folder.predictions)]
    except (OSError, ValueError, KeyError):
        return None
    if kept not in evals.epochs or len(ids) != len(evals.labels):
        return None
    where = {question_id: i for i, question_id in enumerate(ids)}
    if any(q.id not in where for q in questions):
        return None
    rows = [where[q.id] for q in questions]
    labels = zip(questions, evals.labels[rows], strict=True)
    if any(q.answer is not None and q.answer != y for q, y in labels):
        return None  # the same ids, other questions: the eval set was not this one
    k = max(len(q.choices) for q in questions)
    return evals.at(kept)[:, rows, :k].astype(np.float64)


def _labels(labels: np.ndarray | None, n: int) -> np.ndarray:
    return np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64)


def ood_record(evaluated: RunOOD) -> OODLogProbs:
    """The per-question record of an evaluation (labels -1 for a set not wholly labelled)."""
    lp_in, lp_out = evaluated.in_log_probs, evaluated.ood_log_probs
    if lp_in is None or lp_out is None:
        raise ValueError(f"the evaluation on {evaluated.ood_set} carries no log-probs")
    return OODLogProbs(
        in_log_probs=lp_in,
        in_labels=_labels(evaluated.in_labels, lp_in.shape[1]),
        in_ids=list(evaluated.in_ids),
        ood_log_probs=lp_out,
        ood_labels=_labels(evaluated.ood_labels, lp_out.shape[1]),
        ood_ids=list(evaluated.ood_ids),
    )


def write_ood_evaluation(run: str | Path, evaluated: RunOOD) -> None:
    """``ood/<set>_log_probs.safetensors``, then ``ood/<set>.json`` (its JSON, with the "+ TS"
    figures of a calibrated run), each atomically."""
    folder = RunDir(Path(run))
    folder.write_ood_log_probs(evaluated.ood_set, ood_record(evaluated))
    write_json_atomic(folder.ood_result(evaluated.ood_set), ood_json(run, evaluated))
