"""Ensemble-size ablation (§5.3, Fig. 6) from one trained pool, without retraining.

The paper trains a pool of 20 members and, for each ensemble size M, averages the metrics of 5
random size-M subsets, at every epoch. Members are independent, so a subset's ensemble is just
the probability average of its members' saved predictions: everything here works on stored
log-probs. A run's unrounded per-epoch log-probs (``eval_log_probs.safetensors``) are used when
present; runs written before that file existed fall back to ``predictions.jsonl`` (final epoch
only: exact log-probs in files written since they were added, rounded probabilities in older
ones).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from loraens.evaluation.intervals import DEFAULT_RESAMPLES, Difference, paired_difference
from loraens.evaluation.metrics import ensemble_log_probs, summarize
from loraens.evaluation.tables import METRICS
from loraens.rundir import EvalLogProbs, RunDir, read_jsonl

DEFAULT_SIZES = (1, 3, 5, 10, 15)  # M = 1 and the paper's {3, 5, 10, 15}
DEFAULT_DRAWS = 5

# An older predictions.jsonl holds only probabilities rounded to 6 decimals, so a stored 0 means
# p < 5e-7. Reading it back as exactly 0 would make one such true label turn the NLL infinite;
# the bound keeps it finite (-log 5e-7 ≈ 14.5 nats, an underestimate of that question's true NLL).
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


def sizes_for_pool(pool_size: int) -> tuple[int, ...]:
    """The sizes Fig. 6 studies for a pool of P members: M = 1, the paper's that fit, and P."""
    return tuple(sorted({m for m in DEFAULT_SIZES if m <= pool_size} | {pool_size}))


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


SIZE_METRICS = ("accuracy", "nll", "ece")  # Fig. 6's panels


@dataclass(frozen=True)
class SizeDifference:
    """Size-M ensembles (the mean over their random subsets) minus ``versus``-member ones.

    ``versus == 1`` is the mean single member over the whole pool (every member, not a draw of
    them); otherwise the next smaller size studied, on its own subsets.
    """

    size: int
    versus: int
    metric: str
    difference: Difference


def _size_stack(pool: np.ndarray, size: int, draws: int, seed: int) -> np.ndarray:
    """(J, N, K): every member (size 1) or the ensembles of ``draws`` random size-M subsets."""
    if size == 1:
        return pool
    return np.stack(
        [ensemble_log_probs(pool[list(s)]) for s in draw_subsets(len(pool), size, draws, seed)]
    )


def size_differences(
    pools: Sequence[ArrayLike],
    labels: ArrayLike,
    sizes: tuple[int, ...],
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> list[SizeDifference]:
    """How much each ensemble size gains, with paired-bootstrap intervals pooled over seeds.

    ``pools`` holds one (P, N, K) member log-prob array per training seed, every one scored on
    the same questions (``labels``) with the same pool size P. For each size M > 1 in ``sizes``
    (at most P), the size-M model is the :func:`ensemble_size_ablation` subsets (the same in
    every seed, keyed by ``seed`` and M), its metric their mean; it is compared with the mean
    single member and with the next smaller size, on every :data:`SIZE_METRICS` metric.
    """
    stacks = [np.asarray(lp, dtype=np.float64) for lp in pools]
    if not stacks or len({lp.shape for lp in stacks}) != 1 or stacks[0].ndim != 3:
        raise ValueError(
            f"pools must be (P, N, K) arrays of one shape, got {[lp.shape for lp in stacks]}"
        )
    pool_size = stacks[0].shape[0]
    studied = sorted({1, *(m for m in sizes if 1 <= m <= pool_size)})
    models = {m: [_size_stack(lp, m, draws, seed) for lp in stacks] for m in studied}
    out = []
    for smaller, size in itertools.pairwise(studied):
        for versus in dict.fromkeys((1, smaller)):
            for metric in SIZE_METRICS:
                d = paired_difference(
                    models[size], models[versus], labels, metric, n_resamples=n_resamples
                )
                out.append(SizeDifference(size, versus, metric, d))
    return out


@dataclass(frozen=True)
class PredictionPool:
    """A run's saved per-member predictions: (P, N, K) log p_T, labels (-1: none) and ids."""

    member_log_probs: np.ndarray
    labels: np.ndarray
    ids: list[str]


def _row_log_probs(row: dict, rounded_zero: float | None) -> np.ndarray:
    """One predictions.jsonl row's (M, K) member log-probs: exact when the row has them."""
    if "member_log_probs" in row:
        # Renormalising these would move them by an ulp and no longer match summary.json.
        return np.asarray(row["member_log_probs"], dtype=np.float64)
    probs = np.asarray(row["member_probs"], dtype=np.float64)
    if rounded_zero is not None:
        probs = np.maximum(probs, rounded_zero)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):  # log 0 = -inf is intended when rounded_zero is None
        return np.log(probs)


def read_prediction_pool(
    path: str | Path, rounded_zero: float | None = ROUNDED_ZERO
) -> PredictionPool:
    """Rebuild the members' log-probs from ``predictions.jsonl`` (or a run directory holding it).

    Rows are padded with ``-inf`` past each question's options. A row's exact
    ``member_log_probs`` are taken as they are. A row without them (a file written before they
    were added) has only rounded probabilities: each member's row is renormalised over the
    question's options, and stored zeros become ``rounded_zero`` first (``None`` keeps them 0,
    i.e. log p = -inf).
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
        lp = _row_log_probs(row, rounded_zero)
        if lp.shape[0] != n_members:
            raise ValueError(
                f"{path}: question {row['id']!r} has {lp.shape[0]} members, expected {n_members}."
            )
        out[:, i, : lp.shape[1]] = lp
    labels = np.asarray([-1 if row["answer"] is None else row["answer"] for row in rows])
    return PredictionPool(out, labels, [row["id"] for row in rows])


SOURCE_LOG_PROBS = "eval_log_probs"  # per epoch, unrounded
SOURCE_PREDICTIONS = "predictions"  # final epoch only (rounded in files before log-probs)


@dataclass(frozen=True)
class EpochPools:
    """A run's pool at each evaluated epoch: (E, P, N, K) log p_T, labels, and where from.

    ``epochs[i]`` is None when the epoch is unknown (a bare ``predictions.jsonl``).
    """

    epochs: list[int | None]
    member_log_probs: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def per_epoch(self) -> bool:
        return self.source == SOURCE_LOG_PROBS


def read_epoch_pools(path: str | Path) -> EpochPools:
    """A run's pools per evaluated epoch from ``eval_log_probs.safetensors``; without that file
    (older runs, or ``path`` naming ``predictions.jsonl``), the final epoch from
    ``predictions.jsonl``, labelled with the summary's kept epoch when there is one."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if run.eval_log_probs.is_file():
            saved: EvalLogProbs = run.read_eval_log_probs()
            return EpochPools(
                list(saved.epochs), saved.member_log_probs, saved.labels, SOURCE_LOG_PROBS
            )
        epoch = None
        if run.summary.is_file():
            summary = run.read_summary()
            epoch = summary.epoch_kept or summary.epochs_trained
        pool = read_prediction_pool(run.predictions)
    else:
        epoch, pool = None, read_prediction_pool(path)
    return EpochPools([epoch], pool.member_log_probs[None], pool.labels, SOURCE_PREDICTIONS)


def ablate_epoch_pools(
    pools: EpochPools,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> list[dict]:
    """:func:`ensemble_size_ablation` at every epoch: its rows with ``epoch`` and ``source``
    added, by epoch then size. The subsets of one M are the same at every epoch (they depend
    on the seed and M only), so a curve over epochs follows the same ensembles."""
    rows = []
    for epoch, lp in zip(pools.epochs, pools.member_log_probs, strict=True):
        for row in ensemble_size_ablation(lp, pools.labels, sizes, draws, seed):
            rows.append({"epoch": epoch, "source": pools.source, **row})
    return rows


def ablate_run_size(
    path: str | Path,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> list[dict]:
    """:func:`ablate_epoch_pools` on a run directory (per epoch when it has
    ``eval_log_probs.safetensors``) or on a ``predictions.jsonl`` file (final epoch)."""
    pools = read_epoch_pools(path)
    if (pools.labels < 0).any():
        raise ValueError(f"{path}: some predictions have no answer; the ablation needs labels.")
    return ablate_epoch_pools(pools, sizes, draws, seed)
