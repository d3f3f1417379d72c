"""Decisions for a trained run: its temperatures and held-out log-probs (:mod:`.stored`),
applied to what ``evaluate``, ``predict`` and ``ood`` score.

Training writes ``holdout_log_probs.safetensors`` and ``calibration.json`` when it holds out
training questions (``data.calibrate`` or ``optim.patience``); :func:`calibrate_run` does it
afterwards, from those saved log-probs or from a labelled questions file the run never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loraens.config import PosteriorConfig
from loraens.data.files import load_questions_file
from loraens.data.prompts import LETTERS
from loraens.data.records import Question
from loraens.decisions.conformal import Score, conformal_sets
from loraens.decisions.selective import SelectiveThreshold, choose_threshold
from loraens.decisions.stored import (
    HOLDOUT_SOURCE,
    RunDecisions,
    fit_calibration,
    read_decisions,
    write_calibration,
)
from loraens.decisions.tables import decision_rows, temperature_table
from loraens.decisions.temperature import Temperatures
from loraens.evaluation.evaluate import score_questions
from loraens.evaluation.metrics import auroc, ensemble_log_probs, max_prob
from loraens.evaluation.ood import RunOOD, evaluate_run_ood, ood_scores
from loraens.evaluation.predictions import answer_rows
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.io import write_jsonl_atomic
from loraens.posteriors.fit import PosteriorFit, fit_posterior
from loraens.posteriors.load import load_scorer, run_scorer
from loraens.rundir import CalibrationRecord, RunDir
from loraens.rundir.load import LoadedEnsemble

__all__ = [
    "HOLDOUT_SOURCE",
    "RunDecisions",
    "apply_decisions",
    "calibrate_run",
    "calibrated_ensemble",
    "check_decisions",
    "evaluate_with_decisions",
    "fit_calibration",
    "fit_posterior_with_decisions",
    "ood_json",
    "ood_result",
    "ood_with_temperature",
    "predict_with_decisions",
    "read_decisions",
    "write_calibration",
]


def calibrate_run(
    run_dir: str | Path,
    file: str | None = None,
    *,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = False,
    trust_remote_code: bool = False,
) -> CalibrationRecord:
    """Fit (again) a run's temperatures: on ``file``'s labelled questions, which are scored and
    become the run's held-out set, or on the held-out log-probs training saved.
    ``trust_remote_code``: as :func:`~loraens.rundir.load.load_run`'s."""
    run = RunDir(Path(run_dir))
    if file is not None:
        questions = load_questions_file(file, require_answer=True)
        loaded = load_scorer(run.root, device, precision, trust_remote_code=trust_remote_code)
        lp = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
        labels = np.asarray([q.answer for q in questions])
        write_calibration(run, 0, lp, labels, source=str(file))
    elif run.holdout_log_probs.is_file():
        held = run.read_holdout_log_probs()
        before = run.read_calibration()  # keeps naming the file the held-out set came from
        source = HOLDOUT_SOURCE if before is None else before.source
        _, fitted = fit_calibration(held.member_log_probs[-1], np.asarray(held.labels), source)
        run.write_calibration(fitted)
    else:
        raise ValueError(
            f"{run.root} has no held-out questions ({run.holdout_log_probs.name}): train with "
            f"--data.calibrate true (or optim.patience), or give --file with labelled questions "
            f"the run was not trained on."
        )
    record = run.read_calibration()
    assert record is not None
    return record


def fit_posterior_with_decisions(
    run_dir: str | Path, cfg: PosteriorConfig, out: str | Path | None = None, **options
) -> PosteriorFit:
    """:func:`~loraens.posteriors.fit.fit_posterior` (``options`` are its keywords) with, when
    it scores held-out questions, temperatures fitted on them and "+ TS" rows in its summary
    (written before the summary, which marks the posterior complete)."""
    return fit_posterior(run_dir, cfg, out, calibrate=_calibrate_posterior, **options)


def _calibrate_posterior(
    run: RunDir,
    epoch: int,
    held: tuple[np.ndarray, np.ndarray],
    scored: tuple[np.ndarray, np.ndarray],
) -> dict[str, dict[str, float]]:
    """Write ``held`` (log-probs, labels) and the temperatures fitted on them, as training
    does; the "+ TS" rows of ``scored``."""
    temps = write_calibration(run, epoch, *held, HOLDOUT_SOURCE)
    return temperature_table(*scored, temps)


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


def calibrated_ensemble(lp: np.ndarray, temps: Temperatures | None) -> np.ndarray:
    """(N, K) log-probs of the ensemble, temperature-scaled when ``temps`` is given."""
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
    """:func:`~loraens.evaluation.predictions.answer_rows` with :func:`apply_decisions`,
    written to ``output``. Returns the rows and the decisions' summary."""
    check_decisions(decisions, max_risk, coverage)
    lp = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = answer_rows(list(questions), lp)
    ensemble = calibrated_ensemble(lp, decisions.temperatures)
    summary = apply_decisions(
        rows, questions, ensemble, decisions, max_risk=max_risk, coverage=coverage, score=score
    )
    write_jsonl_atomic(output, rows)
    return rows, summary


def check_decisions(
    decisions: RunDecisions, max_risk: float | None, coverage: float | None
) -> None:
    """Refuse ``max_risk``/``coverage`` for a run without held-out questions to choose them on."""
    if (max_risk is not None or coverage is not None) and not decisions.has_holdout:
        raise ValueError(
            "--max_risk and --coverage are chosen on the run's held-out questions, which this "
            "run lacks: run `loraens calibrate RUN --file LABELLED.jsonl` first (or train with "
            "--data.calibrate true)."
        )


def apply_decisions(
    rows: list[dict],
    questions: Sequence[Question],
    ensemble: np.ndarray,
    decisions: RunDecisions,
    *,
    max_risk: float | None = None,
    coverage: float | None = None,
    score: Score = "lac",
) -> dict:
    """Add to each answer row, from the run's held-out questions: ``calibrated_probs`` (the
    ensemble + TS, when calibrated; ``probability`` is then its top probability), ``abstain``
    (with ``max_risk``) and ``prediction_set`` (with ``coverage``). ``ensemble`` is
    :func:`calibrated_ensemble` of the rows' questions. Returns a summary (temperature,
    threshold, expected coverage, ...). `predict` and `serve` both decide here."""
    check_decisions(decisions, max_risk, coverage)
    temps = decisions.temperatures
    summary: dict = {
        "questions": len(rows),
        "temperature": None if temps is None else temps.ensemble,
    }
    if temps is not None:
        for row, x in zip(rows, np.exp(ensemble), strict=True):
            k = len(row["ensemble_probs"])
            row["calibrated_probs"] = x[:k].round(6).tolist()
            row["probability"] = row["calibrated_probs"][row["prediction"]]
    if max_risk is None and coverage is None:
        return summary
    assert decisions.holdout_log_probs is not None and decisions.holdout_labels is not None
    held = calibrated_ensemble(decisions.holdout_log_probs, temps)
    if max_risk is not None:
        correct = held.argmax(axis=1) == decisions.holdout_labels
        chosen: SelectiveThreshold = choose_threshold(max_prob(held), correct, max_risk)
        confidence = max_prob(ensemble)
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
        sets = conformal_sets(held, decisions.holdout_labels, ensemble, coverage, score)
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
    return summary


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


def ood_result(
    run: str | Path,
    ood_task: str | None = None,
    ood_file: str | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """:func:`~loraens.evaluation.ood.evaluate_run_ood`'s figures (the ``ood`` command's JSON),
    with, for a calibrated run, "single + TS" / "ensemble + TS" rows in its "ood" table and an
    "ensemble + TS" entry in its "auroc"; "ood_set" names the OOD set."""
    score = run_scorer(
        run,
        device=device,
        precision=precision,
        batch_size=batch_size,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    evaluated = evaluate_run_ood(run, ood_task, ood_file, score, limit=limit, seed=seed)
    return ood_json(run, evaluated)


def ood_json(run: str | Path, evaluated: RunOOD) -> dict:
    """The ``ood`` command's JSON of an OOD evaluation of ``run``: its figures, with the "+ TS"
    ones when the run is calibrated (see :func:`ood_result`)."""
    result = {"ood_set": evaluated.ood_set, **evaluated.metrics}
    temps = read_decisions(run).temperatures
    if temps is not None:
        scaled = ood_with_temperature(evaluated, temps)
        if "ood" in scaled:
            result["ood"] = result.get("ood", {}) | scaled["ood"]
        result["auroc"]["ensemble + TS"] = scaled["auroc"]
    return result
