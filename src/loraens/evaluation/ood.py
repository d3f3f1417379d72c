"""Out-of-distribution evaluation (§5.1, Fig. 5): how the ensemble fares on, and flags, OOD data.

Two things are measured on an OOD question set, for a model fine-tuned on another task:

- the usual metrics (accuracy, NLL, ECE, Brier) on the OOD questions, for the ensemble and for
  the single members (mean and std), when the OOD questions have answers;
- OOD detection: AUROC of telling OOD questions (positive class) from the in-distribution eval
  questions, with a score where higher means "more OOD". The paper's score is ``-max p`` of the
  ensemble (Hendrycks & Gimpel); we add the ensemble's predictive entropy, that entropy over
  log K (comparable across option counts K), the members' mutual information (epistemic
  uncertainty), and ``-max p`` of the single members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from loraens.data.records import Question
from loraens.data.sources import load_run_data, subset
from loraens.evaluation.evaluate import questions_for, score_questions
from loraens.evaluation.metrics import (
    auroc,
    ensemble_log_probs,
    max_prob,
    mutual_information,
    predictive_entropy,
)
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.rundir import RunDir
from loraens.rundir.load import LoadedEnsemble

# Train task -> the task whose eval split is its OOD test set (§5.1).
OOD_PAIRS: dict[str, str] = {"cqa": "mmlu", "mmlu-ss": "mmlu-not-ss", "mmlu-stem": "mmlu-not-stem"}

# Keys of the "auroc" table: which uncertainty score was used to rank questions.
SCORES = ("neg_max_prob", "entropy", "normalized_entropy", "mutual_information")
MI_DECIMALS = 12


def _members(log_probs: ArrayLike, name: str) -> np.ndarray:
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 3 or 0 in lp.shape:
        raise ValueError(f"{name} must have shape (M, N, K) with M, N, K >= 1, got {lp.shape}")
    return lp


def _n_options(log_probs: np.ndarray) -> np.ndarray:
    """Options per question: padded options have log p = -inf. At least 2, so log K > 0."""
    return np.maximum(np.isfinite(log_probs).sum(axis=-1), 2)


def ood_scores(member_log_probs: ArrayLike) -> dict[str, np.ndarray]:
    """Per-question OOD scores of an ensemble (higher = more OOD), each of shape (N,)."""
    lp = _members(member_log_probs, "member_log_probs")
    ens = ensemble_log_probs(lp)
    return {
        "neg_max_prob": -max_prob(ens),
        "entropy": predictive_entropy(ens),
        # Entropy over log K: when the two sets have different numbers of options (cqa's 5 vs
        # mmlu's 4), -max p and entropy mostly rank by K for an unsure model; this does not.
        # Rounded like MI, so that equal uncertainty ties exactly whatever the rounding of log K.
        "normalized_entropy": np.round(
            predictive_entropy(ens) / np.log(_n_options(ens)), MI_DECIMALS
        ),
        # MI is a difference of nearly equal entropies: members that agree leave ±1e-16 noise,
        # which would rank questions at random. Rounding makes agreement an exact tie.
        "mutual_information": np.round(np.maximum(mutual_information(lp), 0.0), MI_DECIMALS),
    }


def ood_metrics(
    in_member_log_probs: ArrayLike,
    ood_member_log_probs: ArrayLike,
    ood_labels: ArrayLike | None = None,
    in_labels: ArrayLike | None = None,
) -> dict:
    """OOD detection AUROCs and, where labels are given, the metric tables of both sets.

    ``in_member_log_probs`` is (M, N_in, K) and ``ood_member_log_probs`` (M, N_out, K') from
    the same M members; the option counts K and K' may differ. Returns::

        {"n_members", "n_in", "n_ood",
         "auroc": {"ensemble": {score: auroc for score in SCORES},
                   "single (mean)": {"neg_max_prob": ...}, "single (std)": {...},
                   "single (per member)": [...]},
         "ood": single-vs-ensemble table on the OOD set        (only with ood_labels),
         "in_distribution": the same table on the in set       (only with in_labels)}

    The tables have the shape of :func:`loraens.evaluation.tables.single_vs_ensemble`, so
    ``format_table`` prints them. A single member's AUROC uses its own ``-max p``; the mean over
    members is what the paper's solid "LoRA (M=1)" lines show. Mutual information is zero for
    identical members (or M = 1), so its AUROC is then 0.5.
    """
    lp_in = _members(in_member_log_probs, "in_member_log_probs")
    lp_out = _members(ood_member_log_probs, "ood_member_log_probs")
    if lp_in.shape[0] != lp_out.shape[0]:
        raise ValueError(
            f"in-distribution and OOD log-probs come from different ensembles: "
            f"{lp_in.shape[0]} vs {lp_out.shape[0]} members"
        )
    s_in, s_out = ood_scores(lp_in), ood_scores(lp_out)
    per_member = [auroc(-max_prob(a), -max_prob(b)) for a, b in zip(lp_in, lp_out, strict=True)]
    result: dict = {
        "n_members": int(lp_in.shape[0]),
        "n_in": int(lp_in.shape[1]),
        "n_ood": int(lp_out.shape[1]),
        "auroc": {
            "ensemble": {name: auroc(s_in[name], s_out[name]) for name in SCORES},
            "single (mean)": {"neg_max_prob": float(np.mean(per_member))},
            "single (std)": {"neg_max_prob": float(np.std(per_member))},
            "single (per member)": per_member,
        },
    }
    if ood_labels is not None:
        result["ood"] = single_vs_ensemble(metric_rows(lp_out, np.asarray(ood_labels)))
    if in_labels is not None:
        result["in_distribution"] = single_vs_ensemble(metric_rows(lp_in, np.asarray(in_labels)))
    return result


def detection_rows(
    in_member_log_probs: ArrayLike, ood_member_log_probs: ArrayLike, **keys
) -> list[dict]:
    """metrics.jsonl rows (split 'ood_detection') of the AUROCs: one per member (its own
    ``-max p``) and one for the ensemble with every score, each tagged with ``keys``."""
    result = ood_metrics(in_member_log_probs, ood_member_log_probs)["auroc"]
    rows = [
        {**keys, "split": "ood_detection", "member": m, "neg_max_prob": value}
        for m, value in enumerate(result["single (per member)"])
    ]
    rows.append({**keys, "split": "ood_detection", "member": "ensemble", **result["ensemble"]})
    return rows


def _labels(questions: Sequence[Question]) -> np.ndarray | None:
    """The answers as an array, or None unless every question has one."""
    if any(q.answer is None for q in questions):
        return None
    return np.asarray([q.answer for q in questions])


def evaluate_ood(
    loaded: LoadedEnsemble,
    in_questions: Sequence[Question],
    ood_questions: Sequence[Question],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Score a trained run on in-distribution and OOD questions and compute :func:`ood_metrics`.

    Accuracy-type tables are included for each set whose questions all have answers; the
    detection AUROCs need none.
    """
    if not in_questions or not ood_questions:
        raise ValueError("OOD evaluation needs at least one in-distribution and one OOD question.")
    lp_in = score_questions(loaded, in_questions, batch_size=batch_size, progress=progress)
    lp_out = score_questions(loaded, ood_questions, batch_size=batch_size, progress=progress)
    return ood_metrics(lp_in, lp_out, _labels(ood_questions), _labels(in_questions))


def ood_partner(task: str | None) -> str:
    """The paper's OOD task for a run trained on ``task`` (:data:`OOD_PAIRS`)."""
    if task not in OOD_PAIRS:
        raise ValueError(
            f"The run's task {task!r} has no OOD partner in the paper; "
            f"give --ood_task or --ood_file."
        )
    return OOD_PAIRS[task]


@dataclass(frozen=True)
class RunOOD:
    """:func:`evaluate_ood` of a run, and the name of the OOD set it was given."""

    ood_set: str
    """The OOD task or file."""
    metrics: dict
    """What :func:`ood_metrics` returns."""
    in_log_probs: np.ndarray | None = None
    """(M, N_in, K) member log-probs on the in-distribution questions."""
    ood_log_probs: np.ndarray | None = None
    """(M, N_out, K') member log-probs on the OOD questions."""
    in_labels: np.ndarray | None = None
    ood_labels: np.ndarray | None = None
    """The answers, where every question of the set has one."""
    in_ids: tuple[str, ...] = ()
    ood_ids: tuple[str, ...] = ()
    """The questions' ids, in the log-probs' order."""


def in_distribution_questions(run: str | Path, limit: int | None, seed: int) -> list[Question]:
    """The run's own eval questions an OOD set is told apart from: at most ``limit`` of them,
    drawn with ``seed`` (the same subset whatever the OOD set)."""
    return subset(load_run_data(RunDir(Path(run)).read_config().data)[1], limit, seed)


def ood_questions(
    run: str | Path,
    ood_task: str | None,
    ood_file: str | None,
    limit: int | None,
    seed: int,
) -> tuple[str, list[Question]]:
    """The OOD set's name and at most ``limit`` of its questions drawn with ``seed``:
    ``ood_task``'s eval split or ``ood_file``'s questions, with neither the paper's partner of
    the run's task (:func:`ood_partner`)."""
    if ood_task is None and ood_file is None:
        ood_task = ood_partner(RunDir(Path(run)).read_config().data.task)
    questions = questions_for(ood_task, ood_file, require_answer=False)
    return str(ood_task or ood_file), subset(questions, limit, seed)


def check_ood_sets(in_questions: Sequence[Question], ood: Sequence[Question]) -> None:
    if not in_questions or not ood:
        raise ValueError("OOD evaluation needs at least one in-distribution and one OOD question.")


def run_ood(
    ood_set: str,
    in_questions: Sequence[Question],
    ood: Sequence[Question],
    lp_in: np.ndarray,
    lp_out: np.ndarray,
) -> RunOOD:
    """:func:`ood_metrics` of a run's log-probs on both sets, kept with them, their labels
    and their question ids."""
    y_in, y_out = _labels(in_questions), _labels(ood)
    return RunOOD(
        ood_set,
        ood_metrics(lp_in, lp_out, y_out, y_in),
        lp_in,
        lp_out,
        y_in,
        y_out,
        tuple(q.id for q in in_questions),
        tuple(q.id for q in ood),
    )


def evaluate_run_ood(
    run: str | Path,
    ood_task: str | None,
    ood_file: str | None,
    score: Callable[[Sequence[Question]], np.ndarray],
    *,
    limit: int | None = None,
    seed: int = 0,
) -> RunOOD:
    """OOD evaluation of a trained run against its own eval split (the ``ood`` command), each
    set scored by ``score`` (every member's (M, N, K) log p_T).

    The OOD set is ``ood_task``'s eval split or the questions of ``ood_file``; with neither, the
    paper's partner of the run's task (:func:`ood_partner`). ``limit`` scores a random subset of
    at most that many questions from each set, drawn with ``seed``.
    """
    name, ood = ood_questions(run, ood_task, ood_file, limit, seed)
    in_questions = in_distribution_questions(run, limit, seed)
    check_ood_sets(in_questions, ood)
    lp_in = score(in_questions)
    lp_out = score(ood)
    return run_ood(name, in_questions, ood, lp_in, lp_out)
