"""Decisions for a trained run: its temperatures and held-out log-probs, read from the run
directory, applied to what ``evaluate``, ``predict`` and ``ood`` score.

Training writes ``holdout_log_probs.safetensors`` and ``calibration.json`` when it holds out
training questions (``data.calibrate`` or ``optim.patience``); :func:`calibrate_run` does it
afterwards, from those saved log-probs or from a labelled questions file the run never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraens.data.files import load_questions_file
from loraens.data.prompts import LETTERS
from loraens.data.records import Question
from loraens.decisions.conformal import Score, conformal_sets
from loraens.decisions.selective import SelectiveThreshold, choose_threshold
from loraens.decisions.tables import decision_rows, temperature_table
from loraens.decisions.temperature import Temperatures, fit_temperatures
from loraens.evaluation.evaluate import answer_rows, score_questions
from loraens.evaluation.metrics import auroc, ensemble_log_probs, max_prob, nll
from loraens.evaluation.ood import RunOOD, ood_scores
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.io import write_jsonl_atomic
from loraens.rundir import CalibrationRecord, RunDir
from loraens.rundir.load import LoadedEnsemble, load_run

__all__ = [
    "HOLDOUT_SOURCE",
    "RunDecisions",
    "calibrate_run",
    "evaluate_with_decisions",
    "fit_calibration",
    "ood_with_temperature",
    "predict_with_decisions",
    "read_decisions",
    "write_calibration",
]

HOLDOUT_SOURCE = "training hold-out"


def fit_calibration(
    member_log_probs: np.ndarray, labels: np.ndarray, source: str
) -> tuple[Temperatures, CalibrationRecord]:
    """Temperatures fitted on held-out (M, N, K) log-probs, and the record that stores them."""
    temps = fit_temperatures(member_log_probs, labels)
    models = {
        "single": np.mean([nll(x, labels) for x in member_log_probs]),
        "single + TS": np.mean([nll(x, labels) for x in temps.members_scaled(member_log_probs)]),
        "ensemble": nll(ensemble_log_probs(member_log_probs), labels),
        "ensemble + TS": nll(temps.ensemble_scaled(member_log_probs), labels),
    }
    record = CalibrationRecord(
        member_temperatures=list(temps.members),
        ensemble_temperature=temps.ensemble,
        questions=int(len(labels)),
        source=source,
        holdout_nll={k: float(v) for k, v in models.items()},
    )
    return temps, record


def write_calibration(
    run: RunDir, epoch: int, member_log_probs: np.ndarray, labels: np.ndarray, source: str
) -> Temperatures:
    """Save the held-out log-probs and the temperatures fitted on them; the temperatures."""
    temps, record = fit_calibration(member_log_probs, labels, source)
    run.write_holdout_log_probs(epoch, member_log_probs, labels)
    run.write_calibration(record)
    return temps


@dataclass(frozen=True)
class RunDecisions:
    """What a run directory holds for decisions: temperatures and held-out log-probs."""

    temperatures: Temperatures | None
    holdout_log_probs: np.ndarray | None
    """(M, N, K) of the last recorded entry of holdout_log_probs.safetensors."""
    holdout_labels: np.ndarray | None

    @property
    def has_holdout(self) -> bool:
        return self.holdout_log_probs is not None and self.holdout_labels is not None


def temperatures_of(record: CalibrationRecord) -> Temperatures:
    return Temperatures(tuple(record.member_temperatures), record.ensemble_temperature)


def read_decisions(run_dir: str | Path) -> RunDecisions:
    """A run's temperatures and held-out log-probs (each None when the run has none)."""
    run = RunDir(Path(run_dir))
    record = run.read_calibration()
    temps = None if record is None else temperatures_of(record)
    if not run.holdout_log_probs.is_file():
        return RunDecisions(temps, None, None)
    held = run.read_holdout_log_probs()
    return RunDecisions(temps, held.member_log_probs[-1], np.asarray(held.labels))


def calibrate_run(
    run_dir: str | Path,
    file: str | None = None,
    *,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = False,
) -> CalibrationRecord:
    """Fit (again) a run's temperatures: on ``file``'s labelled questions, which are scored and
    become the run's held-out set, or on the held-out log-probs training saved."""
    run = RunDir(Path(run_dir))
    if file is not None:
        questions = load_questions_file(file, require_answer=True)
        loaded = load_run(run.root, device, precision)
        lp = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
        labels = np.asarray([q.answer for q in questions])
        write_calibration(run, 0, lp, labels, source=str(file))
    elif run.holdout_log_probs.is_file():
        held = run.read_holdout_log_probs()
        labels = np.asarray(held.labels)
        _, record = fit_calibration(held.member_log_probs[-1], labels, HOLDOUT_SOURCE)
        run.write_calibration(record)
    else:
        raise ValueError(
            f"{run.root} has no held-out questions ({run.holdout_log_probs.name}): train with "
            f"--data.calibrate true (or optim.patience), or give --file with labelled questions "
            f"the run was not trained on."
        )
    record = run.read_calibration()
    assert record is not None
    return record


def evaluate_with_decisions(
    loaded: LoadedEnsemble,
    decisions: RunDecisions,
    questions: Sequence[Question],
    *,
    batch_size: int = 32,
    coverage: float = 0.9,
    score: Score = "lac",
    progress: bool = True,
) -> tuple[list[dict], dict[str, dict[str, float]], list[dict]]:
    """Metric rows, the single-vs-ensemble table (with "+ TS" rows when the run is calibrated)
    and the decision rows (:func:`loraens.decisions.tables.decision_rows`)."""
    if any(q.answer is None for q in questions):
        raise ValueError("Evaluation needs an answer for every question; use predict instead.")
    lp = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    labels = np.asarray([q.answer for q in questions])
    rows = metric_rows(lp, labels, split="eval")
    table = single_vs_ensemble(rows)
    if decisions.temperatures is not None:
        table |= temperature_table(lp, labels, decisions.temperatures)
    decided = decision_rows(
        lp,
        labels,
        decisions.temperatures,
        decisions.holdout_log_probs,
        decisions.holdout_labels,
        coverage=coverage,
        score=score,
    )
    return rows, table, decided


def _calibrated_ensemble(lp: np.ndarray, temps: Temperatures | None) -> np.ndarray:
    return ensemble_log_probs(lp) if temps is None else temps.ensemble_scaled(lp)


def predict_with_decisions(
    loaded: LoadedEnsemble,
    decisions: RunDecisions,
    questions: Sequence[Question],
    output: Path,
    *,
    max_risk: float | None = None,
    coverage: float | None = None,
    score: Score = "lac",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """:func:`~loraens.evaluation.evaluate.answer_rows` plus, from the run's held-out
    questions: ``calibrated_probs`` (the ensemble + TS, when calibrated; ``probability`` is
    then its top probability), ``abstain`` (with ``max_risk``) and ``prediction_set`` (with
    ``coverage``). Returns the rows and a summary (threshold, expected coverage, ...)."""
    if (max_risk is not None or coverage is not None) and not decisions.has_holdout:
        raise ValueError(
            "--max_risk and --coverage are chosen on the run's held-out questions, which this "
            "run lacks: run `loraens calibrate RUN --file LABELLED.jsonl` first (or train with "
            "--data.calibrate true)."
        )
    lp = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = answer_rows(questions, lp)
    temps = decisions.temperatures
    ens = _calibrated_ensemble(lp, temps)
    summary: dict = {
        "questions": len(rows),
        "temperature": None if temps is None else temps.ensemble,
    }
    if temps is not None:
        for row, x in zip(rows, np.exp(ens), strict=True):
            k = len(row["ensemble_probs"])
            row["calibrated_probs"] = x[:k].round(6).tolist()
            row["probability"] = row["calibrated_probs"][row["prediction"]]
    if max_risk is not None:
        assert decisions.holdout_log_probs is not None and decisions.holdout_labels is not None
        held = _calibrated_ensemble(decisions.holdout_log_probs, temps)
        correct = held.argmax(axis=1) == decisions.holdout_labels
        chosen: SelectiveThreshold = choose_threshold(max_prob(held), correct, max_risk)
        confidence = max_prob(ens)
        for row, c in zip(rows, confidence, strict=True):
            row["abstain"] = bool(c < chosen.threshold)
        summary["selective"] = {
            "max_risk": max_risk,
            "threshold": chosen.threshold,
            "expected_coverage": chosen.coverage,
            "holdout_risk": chosen.risk,
            "answered": int(sum(not r["abstain"] for r in rows)),
        }
    if coverage is not None:
        assert decisions.holdout_log_probs is not None and decisions.holdout_labels is not None
        held = _calibrated_ensemble(decisions.holdout_log_probs, temps)
        sets = conformal_sets(held, decisions.holdout_labels, ens, coverage, score)
        for row, q, member in zip(rows, questions, sets.sets, strict=True):
            chosen_options = [int(k) for k in np.flatnonzero(member[: len(q.choices)])]
            row["prediction_set"] = {
                "letters": [LETTERS[k] for k in chosen_options],
                "texts": [q.choices[k] for k in chosen_options],
            }
        summary["conformal"] = {
            "coverage": coverage,
            "score": score,
            "q_hat": sets.q_hat,
            "mean_set_size": sets.mean_size,
        }
    write_jsonl_atomic(output, rows)
    return rows, summary


def ood_with_temperature(result: RunOOD, temps: Temperatures) -> dict:
    """The "+ TS" figures of an OOD evaluation: the OOD table's "single + TS" and
    "ensemble + TS" rows (labelled OOD sets) and the detection AUROC of the calibrated
    ensemble's scores (TS changes how questions with different option counts rank)."""
    if result.in_log_probs is None or result.ood_log_probs is None:
        raise ValueError("the OOD result carries no log-probs to rescale")
    out: dict = {}
    if result.ood_labels is not None:
        out["ood"] = temperature_table(result.ood_log_probs, result.ood_labels, temps)
    scaled_in = temps.ensemble_scaled(result.in_log_probs)[None]
    scaled_out = temps.ensemble_scaled(result.ood_log_probs)[None]
    s_in, s_out = ood_scores(scaled_in), ood_scores(scaled_out)
    out["auroc"] = {name: auroc(s_in[name], s_out[name]) for name in ("neg_max_prob", "entropy")}
    return out
