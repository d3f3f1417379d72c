"""``loraens posterior``: fit a posterior on a finished run's members and score its questions.

The run's own data (its config's task or files, the same subsets and hold-out split) is read
again: Laplace's curvature from the training questions the members were trained on, its prior
precision and TFB's anchor from the held-out questions (or, for TFB, a named file). The
posterior is written as a run directory of its own (:mod:`loraens.posteriors.state`), scored
on the run's eval questions and held-out questions, so the report and every command read it
like a run; the members are never copied or trained again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loraens.config import PosteriorConfig, TrainConfig
from loraens.data.files import load_questions_file
from loraens.data.prompts import EncodedQuestions, encode_questions, scoring_label_ids
from loraens.data.records import Question
from loraens.data.sources import load_run_data, split_holdout
from loraens.evaluation.inference import score_draws, score_members
from loraens.evaluation.metrics import nll
from loraens.evaluation.predictions import write_predictions
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.io import write_jsonl_atomic
from loraens.posteriors.kfac import kfac_factors
from loraens.posteriors.laplace import LaplacePosterior, map_norms, tau_grid
from loraens.posteriors.methods import laplace_predictive, passes_per_question, tfb_predictive
from loraens.posteriors.predictive import linearised_log_probs
from loraens.posteriors.state import (
    PosteriorRecord,
    write_factors,
    write_posterior_record,
)
from loraens.posteriors.tfb import rotate, search_sigma, tfb_draws
from loraens.rundir import RunDir, RunSummary
from loraens.rundir.layout import POSTERIORS_DIR
from loraens.rundir.load import LoadedEnsemble, Predictive, load_run
from loraens.runtime import peak_memory_gb, reset_peak_memory

log = logging.getLogger(__name__)


Calibrate = Callable[
    [RunDir, int, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], dict
]


class PosteriorError(ValueError):
    """A run that cannot be given a posterior, or a posterior that cannot be fitted."""


@dataclass
class _Sets:
    train: list[Question]
    holdout: list[Question]
    eval: list[Question]


@dataclass
class PosteriorFit:
    folder: Path
    record: PosteriorRecord
    table: dict[str, dict[str, float]]


def fittable_config(run: RunDir) -> TrainConfig:
    """The run's config, or a :class:`PosteriorError` naming the run and why it cannot be
    given a posterior."""
    if not run.config.is_file():
        raise PosteriorError(f"{run.root} is not a run directory (no {run.config.name}).")
    cfg = run.read_config()
    if cfg.ensemble.method != "lora":
        raise PosteriorError(
            f"{run.root} is a {cfg.ensemble.method} run: a posterior is fitted around LoRA "
            f"members (ensemble.method lora), each trained to its own optimum."
        )
    if not run.member_folders():
        raise PosteriorError(
            f"{run.root} holds no saved members (members/member-XX): a posterior needs the "
            f"trained adapters, not only the run's records."
        )
    return cfg


def _question_sets(cfg: TrainConfig) -> _Sets:
    train, evaluation = load_run_data(cfg.data)
    holdout: list[Question] = []
    if cfg.optim.patience is not None or cfg.data.calibrate:
        train, holdout = split_holdout(train, cfg.optim.holdout_fraction, cfg.data.subset_seed)
    return _Sets(train, holdout, evaluation)


def _encode(loaded: LoadedEnsemble, questions: list[Question]) -> EncodedQuestions:
    model = loaded.model_config
    assert model is not None
    return encode_questions(
        loaded.base.tokenizer, questions, loaded.max_length, model.scoring, model.normalization
    )


def _mean_nll(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(…, members) :func:`~loraens.evaluation.metrics.nll` of (…, members, N, K) log-probs;
    ``labels`` (N,) shared, or (…, members, N) one set per member."""
    flat = log_probs.reshape(-1, *log_probs.shape[-2:])
    per = np.broadcast_to(labels, (*log_probs.shape[:-1],)).reshape(-1, labels.shape[-1])
    return np.asarray([nll(lp, y) for lp, y in zip(flat, per, strict=True)]).reshape(
        log_probs.shape[:-2]
    )


def _fit_laplace(
    loaded: LoadedEnsemble, cfg: PosteriorConfig, sets: _Sets, label_ids: torch.Tensor
) -> tuple[Predictive, dict, LaplacePosterior]:
    ensemble, runtime = loaded.ensemble, loaded.runtime
    log.info(
        "K-FAC factors of %d members on %d training questions", ensemble.n_members, len(sets.train)
    )
    factors = kfac_factors(
        ensemble,
        _encode(loaded, sets.train),
        label_ids,
        runtime,
        labels=cfg.fisher,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        keep=cfg.kfac_rank,
        full_up_to=cfg.full_factor_limit,
    )
    adapters = ensemble.stacked_adapters()
    prior = torch.ones(ensemble.n_members, dtype=torch.float64)
    posterior = LaplacePosterior(factors, map_norms(adapters), prior)
    selection = cfg.prior if cfg.prior != "auto" else ("holdout" if sets.holdout else "evidence")
    details: dict = {"prior_selection": selection}
    if selection == "holdout":
        if not sets.holdout:
            raise PosteriorError("posterior.prior holdout needs a run that held questions out.")
        grid = torch.tensor(tau_grid(), dtype=torch.float64)
        taus = grid[:, None].expand(-1, ensemble.n_members)
        lp = linearised_log_probs(
            ensemble,
            _encode(loaded, sets.holdout),
            label_ids,
            runtime,
            lambda jac: posterior.logit_covariance(jac, taus),
            link=cfg.link,
            batch_size=cfg.batch_size,
            desc="prior",
        )
        nll = _mean_nll(lp, np.asarray([q.answer for q in sets.holdout]))  # (τs, members)
        posterior.prior_precision = grid[torch.as_tensor(nll.argmin(0))]
        details["prior_search"] = [
            {"tau": float(t), "nll": row.tolist()} for t, row in zip(grid, nll, strict=True)
        ]
    else:
        posterior.fit_prior_by_evidence()
    details["prior_precision"] = posterior.prior_precision.tolist()
    log.info("prior precision (%s): %s", selection, details["prior_precision"])
    return laplace_predictive(ensemble, runtime, posterior, cfg), details, posterior


def _anchor(cfg: PosteriorConfig, sets: _Sets) -> list[Question]:
    if cfg.anchor_file is not None:
        return load_questions_file(cfg.anchor_file, require_answer=False)
    if not sets.holdout:
        raise PosteriorError(
            "tfb needs an anchor set: the run holds no questions out (train with "
            "--data.calibrate true) and no --posterior.anchor_file was given."
        )
    return sets.holdout


def _fit_tfb(
    loaded: LoadedEnsemble, cfg: PosteriorConfig, sets: _Sets, label_ids: torch.Tensor
) -> tuple[Predictive, dict, list[Question]]:
    ensemble, runtime = loaded.ensemble, loaded.runtime
    anchor = _anchor(cfg, sets)
    encoded = _encode(loaded, anchor)
    map_lp = score_members(ensemble, encoded, label_ids, runtime)
    pseudo = map_lp.argmax(-1)  # (members, N): the trained adapters' own answers
    rotated = rotate(ensemble.stacked_adapters())

    base_nll = _mean_nll(map_lp, pseudo)

    def change_at(sigma: torch.Tensor) -> torch.Tensor:
        draws = tfb_draws(rotated, sigma, cfg.search_samples, cfg.seed)
        lp = score_draws(ensemble, draws, cfg.search_samples, encoded, label_ids, runtime)
        change = np.abs(_mean_nll(lp, pseudo) - base_nll) / base_nll / len(anchor)
        log.info("tfb: sigma %s -> change %s", sigma.tolist(), change.tolist())
        return torch.as_tensor(change)

    found = search_sigma(
        change_at,
        ensemble.n_members,
        tolerance=cfg.tolerance,
        high=cfg.sigma_max,
        steps=cfg.search_steps,
    )
    details = {"sigma": found.sigma.tolist(), "sigma_search": found.steps}
    return tfb_predictive(ensemble, runtime, rotated, found.sigma, cfg), details, anchor


def fit_posterior(
    run_dir: str | Path,
    cfg: PosteriorConfig,
    out: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 32,
    progress: bool = False,
    trust_remote_code: bool = False,
    calibrate: Calibrate | None = None,
) -> PosteriorFit:
    """Fit ``cfg``'s posterior on the run at ``run_dir`` and write it to ``out`` (default
    ``<run>/posteriors/<method>``): records, eval and held-out scores, summary last.
    ``calibrate`` (given the folder, the epoch, the held-out and the eval log-probs with
    labels) writes the held-out records and temperatures and returns the summary's "+ TS"
    rows, when there are held-out questions."""
    source = RunDir(Path(run_dir))
    train_cfg = fittable_config(source)
    folder = Path(out) if out is not None else source.root / POSTERIORS_DIR / cfg.method
    loaded = load_run(source.root, device, precision, trust_remote_code=trust_remote_code)
    reset_peak_memory(loaded.runtime.device)  # this fit's peak, loading included from here
    sets = _question_sets(train_cfg)
    n_letters = max(len(q.choices) for q in sets.train + sets.holdout + sets.eval)
    letters = scoring_label_ids(loaded.base.tokenizer, n_letters, train_cfg.model.scoring)
    label_ids = torch.tensor(letters, dtype=torch.long, device=loaded.runtime.device)
    started = time.perf_counter()
    state = None
    if cfg.method == "laplace":
        predictive, details, state = _fit_laplace(loaded, cfg, sets, label_ids)
        fit_questions = len(sets.train)
    else:
        predictive, details, anchor = _fit_tfb(loaded, cfg, sets, label_ids)
        fit_questions = len(anchor)
    fit_seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        write_factors(folder, state.factors)
    record = PosteriorRecord(
        method=cfg.method,
        source=os.path.relpath(source.root.resolve(), folder.resolve()),
        members=loaded.ensemble.n_members,
        config=asdict(cfg),
        fit_questions=fit_questions,
        fit_seconds=fit_seconds,
        peak_memory_gb=peak_memory_gb(loaded.runtime.device),
        passes=passes_per_question(cfg, loaded.ensemble.n_members, n_letters),
        **details,
    )
    table = _score_and_write(
        RunDir(folder), source, train_cfg, record, predictive, loaded, sets, label_ids,
        batch_size=batch_size, progress=progress, calibrate=calibrate,
    )  # fmt: skip
    return PosteriorFit(folder, record, table)


def _score_and_write(
    run: RunDir,
    source: RunDir,
    train_cfg: TrainConfig,
    record: PosteriorRecord,
    predictive: Predictive,
    loaded: LoadedEnsemble,
    sets: _Sets,
    label_ids: torch.Tensor,
    *,
    batch_size: int,
    progress: bool,
    calibrate: Calibrate | None,
) -> dict[str, dict[str, float]]:
    """Score the held-out and eval questions with ``predictive``; write every record."""
    trained = source.read_summary()
    epoch = trained.epoch_kept or trained.epochs_trained or train_cfg.optim.epochs
    run.write_config(train_cfg)
    held = None
    if sets.holdout:
        lp_held = predictive(
            _encode(loaded, sets.holdout), label_ids, batch_size=batch_size, progress=progress
        )
        held = (lp_held, np.asarray([q.answer for q in sets.holdout]))
        if calibrate is None:  # else calibrate writes them with its temperatures
            run.write_holdout_log_probs(epoch, *held)
    started = time.perf_counter()
    lp = predictive(_encode(loaded, sets.eval), label_ids, batch_size=batch_size, progress=progress)
    record.eval_seconds = time.perf_counter() - started
    record.eval_questions = len(sets.eval)
    record.peak_memory_gb = max(record.peak_memory_gb, peak_memory_gb(loaded.runtime.device))
    labels = np.asarray([q.answer for q in sets.eval])
    rows = metric_rows(lp, labels, epoch=epoch, split="eval")
    table = single_vs_ensemble(rows)
    if held is not None and calibrate is not None:
        table |= calibrate(run, epoch, held, (lp, labels))
    run.write_eval_log_probs(epoch, lp, labels)
    write_jsonl_atomic(run.metrics, rows)
    write_predictions(run.predictions, sets.eval, lp)
    write_posterior_record(run.root, record)
    summary = RunSummary(
        method=record.method,
        epochs_trained=trained.epochs_trained,
        epoch_kept=epoch,
        table=table,
        train_questions=trained.train_questions,
        eval_questions=len(sets.eval),
        train_seconds=trained.train_seconds,
        train_tokens_per_second=trained.train_tokens_per_second,
        wall_seconds=record.fit_seconds + record.eval_seconds,
        precision=str(loaded.runtime.autocast_dtype or "fp32"),
        device=str(loaded.runtime.device),
        weights_dtype=trained.weights_dtype,
        matmul_weights_dtype=trained.matmul_weights_dtype,
        score_precision=str(loaded.runtime.autocast_dtype or "fp32"),
        eval_seconds=record.eval_seconds,
        peak_memory_gb=record.peak_memory_gb,
        fit_seconds=record.fit_seconds,
    )
    run.write_summary(summary)  # written last: its presence marks the posterior complete
    return table
