"""Ensemble-size ablation (§5.3, Fig. 6) from one trained pool, without retraining.

The paper trains a pool of 20 members and, for each ensemble size M, averages the metrics of 5
random size-M subsets. Members are independent, so a subset's ensemble is just the probability
average of its members' saved predictions: everything here works on stored log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from loraens.evaluation.metrics import ensemble_log_probs, summarize
from loraens.evaluation.tables import METRICS
from loraens.rundir import RunDir, read_jsonl

DEFAULT_SIZES = (1, 3, 5, 10, 15)
DEFAULT_DRAWS = 5

# predictions.jsonl rounds probabilities to 6 decimals, so a stored 0 means p < 5e-7. Reading it
# back as exactly 0 would make one such true label turn the NLL infinite; the bound keeps it
# finite (-log 5e-7 ≈ 14.5 nats, an underestimate of that question's true NLL).
ROUNDED_ZERO = 5e-7


def draw_subsets(pool_size: int, size: int, draws: int, seed: int) -> list[tuple[int, ...]]:
    """``draws`` independent random subsets of ``size`` distinct members (sorted indices).

    The generator is keyed by ``(seed, size)``, so the subsets for one M do not depend on which
    other sizes are studied. Subsets are drawn independently, so two draws may coincide (always
    when ``size == pool_size``).
    """
    if not 1 <= size <= pool_size:
        raise ValueError(f"subset size must lie in [1, {pool_size}], got {size}")
    rng = np.random.default_rng([seed, size])
    return [
        tuple(int(m) for m in np.sort(rng.choice(pool_size, size=size, replace=False)))
        for _ in range(draws)
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std; equal values give exactly (value, 0.0).

    np.mean of equal floats can be off by an ulp, which would make M = P (every draw the full
    pool) report a tiny non-zero spread instead of the full ensemble's own numbers.
    """
    if all(v == values[0] for v in values):
        return float(values[0]), 0.0
    return float(np.mean(values)), float(np.std(values))


def ensemble_size_ablation(
    member_log_probs: ArrayLike,
    labels: ArrayLike,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> list[dict]:
    """Ensemble metrics of random size-M subsets of a pool, mean and std over the draws.

    ``member_log_probs`` is the pool's (P, N, K) log p_T (``-inf`` padding). Sizes above P are
    skipped. Returns one row per size, in the order given::

        {"size": M, "pool_size": P, "draws": D, "subsets": [(...), ...],
         "mean": {metric: ...}, "std": {metric: ...}}

    ``std`` is the population std over the draws (as in the report tables); metrics are those
    of :func:`loraens.evaluation.metrics.summarize`.
    """
    lp = np.asarray(member_log_probs, dtype=np.float64)
    if lp.ndim != 3 or 0 in lp.shape:
        raise ValueError(f"member_log_probs must have shape (P, N, K), got {lp.shape}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    y = np.asarray(labels)
    pool_size = lp.shape[0]
    rows = []
    for size in sizes:
        if size > pool_size:
            continue
        subsets = draw_subsets(pool_size, size, draws, seed)
        scores = [summarize(ensemble_log_probs(lp[list(s)]), y) for s in subsets]
        rows.append(
            {
                "size": size,
                "pool_size": pool_size,
                "draws": draws,
                "subsets": subsets,
                "mean": {m: _mean_std([s[m] for s in scores])[0] for m in METRICS},
                "std": {m: _mean_std([s[m] for s in scores])[1] for m in METRICS},
            }
        )
    return rows


@dataclass(frozen=True)
class PredictionPool:
    """A run's saved per-member predictions: (P, N, K) log p_T, labels (-1: none) and ids."""

    member_log_probs: np.ndarray
    labels: np.ndarray
    ids: list[str]


def read_prediction_pool(
    path: str | Path, rounded_zero: float | None = ROUNDED_ZERO
) -> PredictionPool:
    """Rebuild the members' log-probs from ``predictions.jsonl`` (or a run directory holding it).

    Rows are padded with ``-inf`` past each question's options. Stored probabilities are
    rounded, so each member's row is renormalised over the question's options; stored zeros
    become ``rounded_zero`` first (``None`` keeps them 0, i.e. log p = -inf).
    """
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).predictions
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no predictions.")
    n_members = len(rows[0]["member_probs"])
    k_max = max(len(row["member_probs"][0]) for row in rows)
    out = np.full((n_members, len(rows), k_max), -np.inf)
    for i, row in enumerate(rows):
        probs = np.asarray(row["member_probs"], dtype=np.float64)
        if probs.shape[0] != n_members:
            raise ValueError(
                f"{path}: question {row['id']!r} has {probs.shape[0]} members, expected "
                f"{n_members}."
            )
        if rounded_zero is not None:
            probs = np.maximum(probs, rounded_zero)
        probs = probs / probs.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):  # log 0 = -inf is intended when rounded_zero is None
            out[:, i, : probs.shape[1]] = np.log(probs)
    labels = np.asarray([-1 if row["answer"] is None else row["answer"] for row in rows])
    return PredictionPool(out, labels, [row["id"] for row in rows])


def ablate_run_size(
    path: str | Path,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> list[dict]:
    """:func:`ensemble_size_ablation` on a run's ``predictions.jsonl`` (file or run directory)."""
    pool = read_prediction_pool(path)
    if (pool.labels < 0).any():
        raise ValueError(f"{path}: some predictions have no answer; the ablation needs labels.")
    return ensemble_size_ablation(pool.member_log_probs, pool.labels, sizes, draws, seed)
