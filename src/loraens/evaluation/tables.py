"""Metric rows for metrics.jsonl and the single-vs-ensemble summary table."""

from __future__ import annotations

import numpy as np

from loraens.evaluation.metrics import ensemble_log_probs, summarize

METRICS = ("accuracy", "nll", "ece", "brier")


def metric_rows(member_log_probs: np.ndarray, labels: np.ndarray, **keys) -> list[dict]:
    """One row per member and one for the ensemble, each tagged with ``keys`` (epoch, split)."""
    rows = [{**keys, "member": m, **summarize(lp, labels)} for m, lp in enumerate(member_log_probs)]
    rows.append(
        {**keys, "member": "ensemble", **summarize(ensemble_log_probs(member_log_probs), labels)}
    )
    return rows


def single_vs_ensemble(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean (and spread) of the single members against the ensemble, from one epoch's rows."""
    members = [r for r in rows if r["member"] != "ensemble"]
    ensemble = next(r for r in rows if r["member"] == "ensemble")
    return {
        "single (mean)": {k: float(np.mean([r[k] for r in members])) for k in METRICS},
        "single (std)": {k: float(np.std([r[k] for r in members])) for k in METRICS},
        f"ensemble (M={len(members)})": {k: float(ensemble[k]) for k in METRICS},
    }


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    width = max([18, *(len(name) + 2 for name in table)])
    header = f"{'':<{width}}" + "".join(f"{k:>10}" for k in METRICS)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for name, values in table.items():
        lines.append(f"{name:<{width}}" + "".join(f"{values[k]:>10.4f}" for k in METRICS))
    return "\n".join(lines)
