"""The four models a calibrated run offers, and their decision figures side by side.

"single" is every member on its own (figures averaged over members), "ensemble" their averaged
distribution; "+ TS" rescales each member by its own temperature, or the ensemble by its own
(see :mod:`loraens.decisions.temperature`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from loraens.decisions.conformal import Score, conformal_sets
from loraens.decisions.selective import COVERAGES, accuracy_at_coverage, aurc, e_aurc
from loraens.decisions.temperature import Temperatures
from loraens.evaluation.metrics import ensemble_log_probs, max_prob, summarize
from loraens.evaluation.tables import METRICS

__all__ = [
    "DECISION_COLUMNS",
    "MODELS",
    "decision_rows",
    "format_decisions",
    "temperature_table",
    "variants",
]

MODELS = ("single", "ensemble", "single + TS", "ensemble + TS")
DECISION_COLUMNS = (
    *METRICS,
    "aurc",
    "e_aurc",
    *(f"accuracy@{int(c * 100)}" for c in COVERAGES),
    "set_coverage",
    "set_size",
)


def variants(member_log_probs: ArrayLike, temperatures: Temperatures | None) -> dict[str, list]:
    """Each model's (N, K) log-probs: one array per member for the single models."""
    lp = np.asarray(member_log_probs, dtype=np.float64)
    out = {"single": list(lp), "ensemble": [ensemble_log_probs(lp)]}
    if temperatures is not None:
        out["single + TS"] = list(temperatures.members_scaled(lp))
        out["ensemble + TS"] = [temperatures.ensemble_scaled(lp)]
    return out


def temperature_table(
    member_log_probs: ArrayLike, labels: ArrayLike, temperatures: Temperatures
) -> dict[str, dict[str, float]]:
    """summary.json's extra rows: "single + TS" (mean over members) and "ensemble + TS"."""
    models = variants(member_log_probs, temperatures)
    return {
        name: _mean([summarize(x, labels) for x in models[name]])
        for name in ("single + TS", "ensemble + TS")
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _figures(
    lp: np.ndarray,
    labels: np.ndarray,
    holdout: tuple[np.ndarray, np.ndarray] | None,
    coverage: float,
    score: Score,
) -> dict[str, float]:
    correct = lp.argmax(axis=1) == labels
    confidence = max_prob(lp)
    out = summarize(lp, labels)
    out |= {"aurc": aurc(confidence, correct), "e_aurc": e_aurc(confidence, correct)}
    for c in COVERAGES:
        out[f"accuracy@{int(c * 100)}"] = accuracy_at_coverage(confidence, correct, c)
    if holdout is not None:
        sets = conformal_sets(holdout[0], holdout[1], lp, coverage, score)
        out |= {"set_coverage": sets.empirical_coverage(labels), "set_size": sets.mean_size}
    return out


def decision_rows(
    member_log_probs: ArrayLike,
    labels: ArrayLike,
    temperatures: Temperatures | None = None,
    holdout_member_log_probs: ArrayLike | None = None,
    holdout_labels: ArrayLike | None = None,
    *,
    coverage: float = 0.9,
    score: Score = "lac",
) -> list[dict]:
    """One row per model (with "+ TS" rows when ``temperatures`` are given): accuracy, NLL,
    ECE, Brier, AURC, E-AURC, accuracy at 50/80/90% coverage, and, with held-out log-probs,
    the empirical coverage and mean size of conformal sets calibrated on them."""
    y = np.asarray(labels, dtype=np.int64)
    models = variants(member_log_probs, temperatures)
    held = None
    if holdout_member_log_probs is not None and holdout_labels is not None:
        held = variants(holdout_member_log_probs, temperatures)
    rows = []
    for name, arrays in models.items():
        per_array = [
            _figures(
                x,
                y,
                None if held is None else (held[name][i], np.asarray(holdout_labels)),
                coverage,
                score,
            )
            for i, x in enumerate(arrays)
        ]
        rows.append({"model": name, **_mean(per_array)})
    return rows


def format_decisions(rows: list[dict], title: str = "") -> str:
    """The decision rows as a text table (columns a row lacks are left out)."""
    columns = [c for c in DECISION_COLUMNS if any(c in r for r in rows)]
    header = f"{'':<15}" + "".join(f"{c:>13}" for c in columns)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row[c]:>13.4f}" if c in row else f"{'':>13}" for c in columns)
        lines.append(f"{row['model']:<15}" + cells)
    return "\n".join(lines)
