"""A run directory's decision files, read and written without torch (the report reads them):
the held-out log-probs and the temperatures fitted on them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraens.decisions.temperature import LOG_T_BOUNDS, Temperatures, fit_temperatures
from loraens.evaluation.metrics import ensemble_log_probs, nll
from loraens.rundir import CalibrationRecord, RunDir

__all__ = [
    "HOLDOUT_SOURCE",
    "RunDecisions",
    "fit_calibration",
    "read_decisions",
    "temperatures_of",
    "write_calibration",
]

log = logging.getLogger(__name__)

HOLDOUT_SOURCE = "training hold-out"


def fit_calibration(
    member_log_probs: np.ndarray, labels: np.ndarray, source: str
) -> tuple[Temperatures, CalibrationRecord]:
    """Temperatures fitted on held-out (M, N, K) log-probs, and the record that stores them."""
    temps = fit_temperatures(member_log_probs, labels)
    at_bound = [t for t in (*temps.members, temps.ensemble) if _at_bound(t)]
    if at_bound:
        # T = 100 flattens answers to uniform: the model did worse than chance on the held-out
        # questions (T = 0.01: it was never wrong there). Either way too few, or too easy, to
        # tell a temperature; more held-out questions (optim.holdout_fraction) help.
        log.warning(
            "%d of %d temperatures hit the search bound [0.01, 100] on %d held-out questions; "
            "temperature scaling there only flattens (or sharpens) answers to the extreme.",
            len(at_bound),
            len(temps.members) + 1,
            len(labels),
        )
    models: dict[str, float] = {
        "single": float(np.mean([nll(x, labels) for x in member_log_probs])),
        "single + TS": float(
            np.mean([nll(x, labels) for x in temps.members_scaled(member_log_probs)])
        ),
        "ensemble": nll(ensemble_log_probs(member_log_probs), labels),
        "ensemble + TS": nll(temps.ensemble_scaled(member_log_probs), labels),
    }
    record = CalibrationRecord(
        member_temperatures=list(temps.members),
        ensemble_temperature=temps.ensemble,
        questions=int(len(labels)),
        source=source,
        holdout_nll=models,
    )
    return temps, record


def _at_bound(t: float) -> bool:
    return any(math.isclose(math.log(t), b, abs_tol=1e-6) for b in LOG_T_BOUNDS)


def write_calibration(
    run: RunDir, epoch: int, member_log_probs: np.ndarray, labels: np.ndarray, source: str
) -> Temperatures:
    """Save the held-out log-probs and the temperatures fitted on them; the temperatures."""
    # Fitted on the float32 values the file keeps, so a refit from the file gives the same T.
    member_log_probs = np.asarray(member_log_probs, dtype=np.float32).astype(np.float64)
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
