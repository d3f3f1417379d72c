"""`loraens train`: fine-tune an ensemble, evaluate it every epoch, write the run directory.

A run checkpoints after every epoch and can be continued from its directory: rerunning the same
command, or `loraens train --resume RUN_DIR`, picks up after the last complete epoch and ends
with exactly the adapters and metrics an uninterrupted run would have produced.

Under torchrun (or accelerate launch) the members, or each member's batches, are spread over the
processes (see :mod:`loraens.distributed`); rank 0 alone writes the run directory, in the same
format, so a run may continue on another number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loraens.baselines.last_layer import save_last_layer_member, train_last_layer
from loraens.config import TrainConfig
from loraens.data.prompts import EncodedQuestions, encode_questions, scoring_label_ids
from loraens.data.records import Question
from loraens.data.sources import (
    default_batch_size,
    load_ood_questions,
    load_run_data,
    split_holdout,
)
from loraens.decisions.stored import HOLDOUT_SOURCE, write_calibration
from loraens.decisions.tables import temperature_table
from loraens.distributed import Dist, env_world_size, launch
from loraens.evaluation.inference import score_members, score_variational
from loraens.evaluation.ood import detection_rows
from loraens.evaluation.predictions import write_predictions
from loraens.evaluation.tables import format_table, metric_rows, single_vs_ensemble
from loraens.io import write_json_atomic, write_jsonl_atomic
from loraens.models.loading import (
    BaseModel,
    hold_matmul_weights_in,
    load_base_model,
    resolve_model_path,
)
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import save_member
from loraens.provenance import provenance
from loraens.rundir import RunDir, RunSummary
from loraens.rundir.card import write_card
from loraens.rundir.load import refuse_remote_code
from loraens.runtime import (
    Runtime,
    peak_memory_gb,
    release_free_memory,
    reset_peak_memory,
    resolve_matmul_dtype,
    resolve_weights_dtype,
    runtime_from_config,
    scoring_runtime,
)
from loraens.tracking import RunTracker, open_tracker, run_files
from loraens.training.blob import KLStep
from loraens.training.checkpoint import (
    TrainState,
    load_checkpoint,
    load_stacked,
    save_checkpoint,
    stacked_tensors,
)
from loraens.training.eta import announce_duration
from loraens.training.optim import build_optimizer
from loraens.training.scoring_choice import choose_scoring, keep_stored_scoring
from loraens.training.seeds import member_seeds, rank_seed, schedule_seed
from loraens.training.trainer import EnsembleTrainer

log = logging.getLogger(__name__)

# Settings that change speed or display but not results: a rerun may differ in them.
_RESULT_NEUTRAL = {
    ("runtime", "progress"),
    ("runtime", "eval_batch_size"),
    ("runtime", "members_per_pass"),
    ("runtime", "packing"),
    ("runtime", "pack_tokens"),
    ("runtime", "memory_budget_gb"),
    ("runtime", "dist_timeout"),
    ("runtime", "logger"),
    ("runtime", "tracking_uri"),
}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the last complete checkpoint stays valid."""

    def __init__(self, run_dir: Path, epochs_done: int):
        super().__init__(
            f"Interrupted. The checkpoint after epoch {epochs_done} in {run_dir} is intact; "
            f"continue with: loraens train --resume {run_dir}"
        )


@dataclass
class TrainResult:
    run_dir: RunDir
    table: dict[str, dict[str, float]]
    summary: RunSummary
    rank: int = 0  # in a distributed run only rank 0 prints


def _config_differences(old: TrainConfig, new: TrainConfig) -> list[str]:
    # A key the old config.yaml lacks was added to loraens later: reading it gave the default,
    # which is what the run used.
    before_values = old.to_dict()
    differences = []
    for section, values in new.to_dict().items():
        for key, value in values.items():
            before = before_values[section][key]
            if (section, key) not in _RESULT_NEUTRAL and before != value:
                differences.append(f"{section}.{key}: {before!r} -> {value!r}")
    return differences


def _prepare_run_dir(run: RunDir, cfg: TrainConfig) -> TrainConfig | None:
    """Check a rerun matches the run it continues and return the config to continue with (the
    run's own scoring mode in place of auto); None for a new run, whose config is written once
    its scoring mode is chosen (:func:`_choose_scoring`)."""
    if run.config.exists():
        stored = run.read_config()
        cfg = keep_stored_scoring(cfg, stored)
        differences = _config_differences(stored, cfg)
        if differences:
            raise ValueError(
                f"{run.root} holds a run with a different configuration ("
                + "; ".join(differences)
                + "). Continue it with --resume, or choose another --out."
            )
        if cfg.model.scoring == "auto":  # loraens writes the chosen mode, never auto
            raise ValueError(
                f"{run.config} says model.scoring: auto, which no run is trained with; set it "
                f"to the mode {run.root} was trained with (letter or answer_text)."
            )
        return cfg
    if run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(
            f"{run.root} exists, is not empty and is not a loraens run; choose another --out."
        )
    return None


def resume_config(run_dir: str | Path, *, trust_remote_code: bool = False) -> TrainConfig:
    """The saved configuration of the run to resume. ``--resume`` takes every setting from the
    directory, which may not be the user's: its trust_remote_code needs ``trust_remote_code``
    (``--model.trust_remote_code true``) too. A rerun with the user's own config does not."""
    run = RunDir(Path(run_dir))
    if not run.config.exists():
        raise FileNotFoundError(f"Cannot resume: {run.root} has no {run.config.name}.")
    cfg = run.read_config()
    refuse_remote_code(run.config, cfg.model, trust_remote_code, "--model.trust_remote_code true")
    return cfg


@dataclass
class _Setup:
    """What both training paths (LoRA and last-layer) share: model, questions, encodings, seeds."""

    cfg: TrainConfig
    run: RunDir
    runtime: Runtime
    base: BaseModel
    train_qs: list[Question]
    eval_qs: list[Question]
    train_set: EncodedQuestions
    eval_set: EncodedQuestions
    label_ids: torch.Tensor
    data_seeds: list[int]
    schedule: int | None
    started: float
    dist: Dist
    weights_dtype: torch.dtype
    matmul_dtype: torch.dtype  # the decoder's linear weights (model.dtype auto narrows them)
    tracker: RunTracker  # rank 0's logger (tensorboard, mlflow); a no-op elsewhere and for csv


@dataclass
class _ExtraSets:
    """Question sets LoRA training scores every epoch besides the eval split (empty if unused):
    the held-out share of train for early stopping, and the OOD set of Fig. 5."""

    holdout: EncodedQuestions
    ood: EncodedQuestions


def _batch_size(cfg: TrainConfig) -> int:
    assert cfg.optim.batch_size is not None  # train_ensemble resolves the task default first
    return cfg.optim.batch_size


def train_ensemble(cfg: TrainConfig, out_dir: str | Path) -> TrainResult:
    run = RunDir(Path(out_dir))
    batch_size = cfg.optim.batch_size or default_batch_size(cfg.data)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=batch_size))
    if cfg.ensemble.method == "last_layer" and env_world_size() > 1:
        raise ValueError(
            "ensemble.method=last_layer trains in seconds on cached features in one process; "
            "run it without torchrun or accelerate launch."
        )
    trained = cfg.ensemble.trained_adapters
    with launch(cfg.runtime.device, trained, cfg.runtime.dist_timeout) as dist:

        def prepare() -> tuple[TrainConfig | None, RunSummary | None]:
            continued = _prepare_run_dir(run, cfg)
            return continued, run.read_summary() if run.summary.exists() else None

        continued, summary = dist.on_main(prepare)
        if summary is not None:
            log.info("%s is already complete.", run.root)
            return TrainResult(run, summary.table, summary, dist.rank)
        new = continued is None
        setup, extra = _set_up(cfg if continued is None else continued, run, dist, new)
        with setup.tracker:
            if cfg.ensemble.method == "last_layer":
                return _train_last_layer(setup)
            return _train_lora(setup, extra)


def _load_model(
    cfg: TrainConfig, dist: Dist
) -> tuple[Runtime, tuple[torch.dtype, torch.dtype], BaseModel]:
    """The runtime, the (model, matmul weights) dtypes and the base model."""
    device = str(dist.device) if dist.active else cfg.runtime.device
    runtime = runtime_from_config(cfg.runtime, device)
    weights_dtype = resolve_weights_dtype(cfg.model.dtype, runtime)
    if dist.active:
        # The default model is converted on first use: once per node, not by every rank at once.
        if dist.local_rank == 0:
            resolve_model_path(cfg.model.name_or_path)
        dist.barrier()
        if not dist.is_main:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one "Loading weights" bar, not one per rank
    base = load_base_model(
        cfg.model.name_or_path,
        device=runtime.device,
        dtype=weights_dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    matmul_dtype = resolve_matmul_dtype(cfg.model.dtype, runtime)
    hold_matmul_weights_in(base.model, matmul_dtype)
    return runtime, (weights_dtype, matmul_dtype), base


def _encode_all(
    cfg: TrainConfig, base: BaseModel, dist: Dist, question_sets: list[list[Question]]
) -> list[EncodedQuestions]:
    model = cfg.model
    encoded = [
        encode_questions(base.tokenizer, qs, model.max_length, model.scoring, model.normalization)
        for qs in question_sets
    ]
    if (shortened := sum(e.n_shortened for e in encoded)) and dist.is_main:
        log.warning(
            "%d prompts exceeded max_length=%d and had their question text shortened.",
            shortened,
            cfg.model.max_length,
        )
    return encoded


def _choose_scoring(
    cfg: TrainConfig,
    run: RunDir,
    dist: Dist,
    runtime: Runtime,
    base: BaseModel,
    train_qs: list[Question],
) -> TrainConfig:
    """A new run's scoring mode, from zero-shot evidence on its training questions (auto), or
    checked against the others (an explicit mode); then its config, with that mode, written.
    Rank 0 alone scores; every rank gets its choice."""

    def choose() -> TrainConfig:
        score_runtime = scoring_runtime(runtime, cfg.runtime.score_precision)
        chosen = choose_scoring(cfg, base.model, base.tokenizer, train_qs, score_runtime)
        run.write_config(chosen)
        return chosen

    return dist.on_main(choose)


def _set_up(cfg: TrainConfig, run: RunDir, dist: Dist, new: bool) -> tuple[_Setup, _ExtraSets]:
    started = time.perf_counter()
    runtime, (weights_dtype, matmul_dtype), base = _load_model(cfg, dist)
    reset_peak_memory(runtime.device)  # this run's peak, not an earlier cell's in the process
    train_qs, eval_qs = load_run_data(cfg.data)
    if new:  # a resumed run keeps the mode in its config.yaml: it never chooses again
        cfg = _choose_scoring(cfg, run, dist, runtime, base, train_qs)
    # After config.yaml: the tracker logs the chosen mode, and a new run directory's first file
    # must be its config. (A logger whose package is missing thus fails after the model loads.)
    tracker = open_tracker(cfg, run, enabled=dist.is_main)
    holdout_qs: list[Question] = []
    if cfg.optim.patience is not None or cfg.data.calibrate:
        train_qs, holdout_qs = split_holdout(
            train_qs, cfg.optim.holdout_fraction, cfg.data.subset_seed
        )
    ood_qs = load_ood_questions(cfg.data)
    max_choices = max(len(q.choices) for q in train_qs + eval_qs + ood_qs)
    letters = scoring_label_ids(base.tokenizer, max_choices, cfg.model.scoring)
    label_ids = torch.tensor(letters, dtype=torch.long, device=runtime.device)
    train_set, eval_set, holdout_set, ood_set = _encode_all(
        cfg, base, dist, [train_qs, eval_qs, holdout_qs, ood_qs]
    )
    seed = cfg.ensemble.seed
    setup = _Setup(
        cfg=cfg,
        run=run,
        runtime=runtime,
        base=base,
        train_qs=train_qs,
        eval_qs=eval_qs,
        train_set=train_set,
        eval_set=eval_set,
        label_ids=label_ids,
        data_seeds=member_seeds(seed, cfg.ensemble.members, "data", cfg.ensemble.vary_data_order),
        schedule=schedule_seed(seed) if cfg.data.group_by_length else None,
        started=started,
        dist=dist,
        weights_dtype=weights_dtype,
        matmul_dtype=matmul_dtype,
        tracker=tracker,
    )
    return setup, _ExtraSets(holdout=holdout_set, ood=ood_set)


# ----------------------------------------------------------------------------- LoRA ensembles


@dataclass
class _Evaluator:
    """Every member's log-probs on a question set (all M, on every rank): each rank scores its
    own members (in data mode its share of the questions) and the scores are gathered."""

    ensemble: LoRAEnsemble
    label_ids: torch.Tensor
    runtime: Runtime
    dist: Dist
    batch_size: int
    members_per_pass: int | None
    mc_dropout_passes: int
    progress: bool
    blob_samples: int | None = None  # BLoB: each member's mean over this many weight draws
    seconds: dict[int, float] = field(default_factory=dict)
    """The last scoring time of each question set (keyed by the set's id)."""

    def __call__(self, questions: EncodedQuestions) -> np.ndarray:
        started = time.perf_counter()
        # Once per evaluated set, not per serve request (runtime.py): before, so that training's
        # freed pages are not kept under scoring's own, and after, for the next epoch's training.
        release_free_memory()
        if self.blob_samples is not None:  # every member's draws in one pass, all questions
            local = score_variational(
                self.ensemble, questions, self.label_ids, self.runtime, self.blob_samples,
                first_member=self.dist.members.start, batch_size=self.batch_size,
                progress=self.progress,
            )  # fmt: skip
        else:
            local = score_members(
                self.ensemble,
                questions,
                self.label_ids,
                self.runtime,
                batch_size=self.batch_size,
                members_per_pass=self.members_per_pass,
                mc_dropout_passes=self.mc_dropout_passes,
                progress=self.progress,
                questions=self.dist.question_share(len(questions)),
            )
        release_free_memory()
        scores = self.dist.gather_scores(local)
        self.seconds[id(questions)] = time.perf_counter() - started
        return scores


@dataclass
class _Fit:
    """A LoRA run in progress: this process's members, how they train and are scored, and what
    the checkpoint records."""

    ensemble: LoRAEnsemble
    trainer: EnsembleTrainer
    evaluate: _Evaluator
    progress: bool
    state: TrainState
    best: dict[str, torch.Tensor] | None = None  # adapters of the best held-out epoch


def _train_lora(s: _Setup, extra: _ExtraSets) -> TrainResult:
    fit = _build(s)
    _restore_or_start(s, fit)
    try:
        member_log_probs = _fit_epochs(s, extra, fit)
    except KeyboardInterrupt:
        raise TrainingInterrupted(s.run.root, fit.state.epochs_done) from None
    if fit.best is not None and fit.state.best_epoch != fit.state.epochs_done:
        load_stacked(fit.ensemble, fit.best)
        member_log_probs = None
    if member_log_probs is None:  # resumed after the last epoch, or restored the best epoch
        member_log_probs = fit.evaluate(s.eval_set)
    holdout = None
    if len(extra.holdout):  # calibration: the kept adapters on the held-out questions
        holdout = (fit.evaluate(extra.holdout), np.asarray(extra.holdout.labels))
    _save_members(s, fit)
    eval_seconds = fit.evaluate.seconds.get(id(s.eval_set))
    rows = _mean_weight_rows(s, fit) if fit.evaluate.blob_samples is not None else {}
    return _finish(s, fit.state, member_log_probs, holdout, eval_seconds, rows)


def _mean_weight_rows(s: _Setup, fit: _Fit) -> dict[str, dict[str, float]]:
    """BLoB's members scored with their mean weights alone ("N = 0"), as summary rows."""
    mean_weights = dataclasses.replace(fit.evaluate, blob_samples=None, seconds={})
    labels = np.asarray([q.answer for q in s.eval_qs])
    table = single_vs_ensemble(metric_rows(mean_weights(s.eval_set), labels))
    return {f"{name}, mean weights": row for name, row in table.items()}


def _build(s: _Setup) -> _Fit:
    """This process's members, initialised, with their optimiser, trainer and evaluator."""
    cfg, dist = s.cfg, s.dist
    n_trained = cfg.ensemble.trained_adapters
    mine = dist.members  # global indices of the members this process trains (all, alone)
    lora = cfg.lora
    ensemble = LoRAEnsemble(
        s.base.model, len(mine), lora.rank, lora.alpha, lora.dropout, lora.target_modules
    )
    blob = cfg.ensemble.method == "blob"
    if blob:
        ensemble.make_variational(cfg.blob.eps)
    ensemble.to(s.runtime.device)
    # Seeds come from the global member index, so a member is the same on any number of ranks.
    init_seeds = member_seeds(cfg.ensemble.seed, n_trained, "init", cfg.ensemble.vary_init)
    ensemble.init_members(init_seeds[mine.start : mine.stop])
    progress = cfg.runtime.progress and dist.is_main
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, cfg.optim),
        s.train_set,
        s.label_ids,
        s.runtime,
        data_seeds=s.data_seeds[mine.start : mine.stop],
        batch_size=_batch_size(cfg),
        schedule_seed=s.schedule,
        members_per_pass=cfg.runtime.members_per_pass,
        kl_beta=cfg.optim.kl_beta,
        dist=dist,
        loss=cfg.optim.loss,
    )
    evaluate = _Evaluator(
        ensemble,
        s.label_ids,
        scoring_runtime(s.runtime, cfg.runtime.score_precision),
        dist,
        batch_size=cfg.runtime.eval_batch_size,
        members_per_pass=cfg.runtime.members_per_pass,
        mc_dropout_passes=cfg.ensemble.passes_per_adapter,
        progress=progress,
        blob_samples=cfg.blob.eval_samples if blob else None,
    )
    if blob:
        trainer.after_step = KLStep(ensemble, cfg.blob, trainer.steps_per_epoch())
    return _Fit(ensemble, trainer, evaluate, progress, TrainState(n_train=len(s.train_qs)))


def _restore_or_start(s: _Setup, fit: _Fit) -> None:
    """Continue from the run directory's checkpoint, or record the provenance of a new run."""
    run, dist = s.run, s.dist
    # LoRA dropout draws from torch's global generator: seed it so a rerun is bit-identical
    # (a resumed run restores the generator's state from the checkpoint instead). Each rank has
    # its own generator, so with lora.dropout > 0 a distributed run's masks differ from a
    # single process's: equal in distribution, not bit for bit.
    torch.manual_seed(rank_seed(s.cfg.ensemble.seed, dist.rank))
    if dist.on_main(lambda: run.checkpoint_state.exists()):
        fit.state, fit.best = load_checkpoint(
            run.checkpoint, fit.ensemble, fit.trainer.optimizer, dist
        )
        log.info(
            "Resuming %s after epoch %d of %d.", run.root, fit.state.epochs_done, s.cfg.optim.epochs
        )
    else:
        dist.on_main(
            lambda: write_json_atomic(
                run.provenance, provenance(s.base.path, s.train_qs, s.eval_qs)
            )
        )


def _fit_epochs(s: _Setup, extra: _ExtraSets, fit: _Fit) -> np.ndarray | None:
    """Train the remaining epochs, checkpointing after each; the last evaluated epoch's eval
    log-probs (None when no epoch was left to train)."""
    cfg = s.cfg
    member_log_probs = None
    first_epoch = cfg.optim.epochs if fit.state.stopped_early else fit.state.epochs_done
    if s.dist.is_main:
        fit.trainer.on_step = announce_duration(
            fit.trainer, cfg, first_epoch, s.eval_set, extra.ood, extra.holdout
        )
    for epoch in range(first_epoch, cfg.optim.epochs):
        train_loss = _train_epoch(s, fit, epoch)
        if epoch + 1 == cfg.optim.epochs or (epoch + 1) % cfg.runtime.eval_every == 0:
            member_log_probs = _evaluate_epoch(s, extra.ood, fit, epoch, train_loss)
        fit.state.epochs_done = epoch + 1
        if cfg.optim.patience is not None:
            _track_holdout(s, extra.holdout, fit, epoch)
        _save_checkpoint(s, fit)
        s.tracker.log_epochs(fit.state.rows)  # after the checkpoint: a resume never relogs it
        if fit.state.stopped_early:
            log.info(
                "Held-out NLL has not improved for %d epochs: stopping after epoch "
                "%d, keeping epoch %d.",
                cfg.optim.patience,
                epoch + 1,
                fit.state.best_epoch,
            )
            break
    return member_log_probs


def _train_epoch(s: _Setup, fit: _Fit, epoch: int) -> np.ndarray:
    """One epoch for every member; its timing, tokens and per-member train loss rows."""
    state = fit.state
    tick, tokens_before = time.perf_counter(), fit.trainer.tokens_seen
    train_loss = fit.trainer.train_epoch(epoch, progress=fit.progress)
    state.train_seconds += time.perf_counter() - tick
    state.tokens_seen += s.dist.sum(fit.trainer.tokens_seen - tokens_before)
    state.rows += [
        {"epoch": epoch + 1, "split": "train", "member": m, "loss": float(loss)}
        for m, loss in enumerate(train_loss)
    ]
    return train_loss


def _evaluate_epoch(
    s: _Setup, ood: EncodedQuestions, fit: _Fit, epoch: int, train_loss: np.ndarray
) -> np.ndarray:
    """The epoch's eval rows, and its OOD rows when there is an OOD set; the eval log-probs."""
    member_log_probs = fit.evaluate(s.eval_set)
    labels = np.asarray(s.eval_set.labels)
    epoch_rows = metric_rows(member_log_probs, labels, epoch=epoch + 1, split="eval")
    fit.state.rows += epoch_rows
    # Unrounded, every evaluated epoch (Fig. 6 per epoch); written before this epoch's
    # checkpoint, so a resume redoes and rewrites it, never skips it.
    s.dist.on_main(lambda: s.run.write_eval_log_probs(epoch + 1, member_log_probs, labels))
    if len(ood):
        fit.state.rows += _ood_rows(member_log_probs, fit.evaluate(ood), ood, epoch)
    ens = epoch_rows[-1]
    members = epoch_rows[:-1]
    # The mean member beside the ensemble: over-confidence shows as its NLL and ECE climbing.
    log.info(
        "epoch %d: ensemble acc %.3f nll %.3f ece %.3f | mean member nll %.3f ece %.3f "
        "| mean train loss %.3f",
        epoch + 1,
        ens["accuracy"],
        ens["nll"],
        ens["ece"],
        np.mean([row["nll"] for row in members]),
        np.mean([row["ece"] for row in members]),
        train_loss.mean(),
    )
    return member_log_probs


def _track_holdout(s: _Setup, holdout: EncodedQuestions, fit: _Fit, epoch: int) -> None:
    """Early stopping: score the held-out share, keep the best epoch's adapters, and decide
    whether optim.patience epochs have passed without improvement."""
    state = fit.state
    assert s.cfg.optim.patience is not None  # only called with early stopping on
    holdout_rows = metric_rows(
        fit.evaluate(holdout), np.asarray(holdout.labels), epoch=epoch + 1, split="holdout"
    )
    state.rows += holdout_rows
    # Rank 0's number decides for all ranks, so they cannot disagree on stopping.
    nll = s.dist.broadcast(holdout_rows[-1]["nll"])
    if state.best_holdout_nll is None or nll < state.best_holdout_nll:
        state.best_epoch, state.best_holdout_nll = epoch + 1, nll
        fit.best = stacked_tensors(fit.ensemble)
    state.stopped_early = epoch + 1 - state.best_epoch >= s.cfg.optim.patience


def _save_checkpoint(s: _Setup, fit: _Fit) -> None:
    save_checkpoint(
        s.run.checkpoint, fit.ensemble, fit.trainer.optimizer, fit.state, fit.best, s.dist
    )
    # metrics.jsonl is derived from the checkpoint's rows, so the two never disagree.
    s.dist.on_main(lambda: write_jsonl_atomic(s.run.metrics, fit.state.rows))


def _save_members(s: _Setup, fit: _Fit) -> None:
    """Every trained member as a PEFT adapter folder, written by rank 0 alone."""
    stacked = s.dist.gather_members(stacked_tensors(fit.ensemble))  # from every rank

    def save() -> None:
        for m in range(s.cfg.ensemble.trained_adapters):
            path = s.run.member(m)
            save_member(fit.ensemble, m, path, s.cfg.model.name_or_path, stacked=stacked)

    s.dist.on_main(save)


def _ood_rows(
    eval_log_probs: np.ndarray, ood_log_probs: np.ndarray, ood_set: EncodedQuestions, epoch: int
) -> list[dict]:
    """Fig. 5's per-epoch rows: metrics on the OOD set (if labelled) and how well it is told
    apart from the eval set."""
    rows = detection_rows(eval_log_probs, ood_log_probs, epoch=epoch + 1)
    labels = np.asarray(ood_set.labels)
    if (labels >= 0).all():
        rows = metric_rows(ood_log_probs, labels, epoch=epoch + 1, split="ood") + rows
    return rows


# ----------------------------------------------------------------------------- both paths


def _finish(
    s: _Setup,
    state: TrainState,
    member_log_probs: np.ndarray,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
    eval_seconds: float | None = None,
    extra_rows: dict[str, dict[str, float]] | None = None,
) -> TrainResult:
    run, runtime, dist = s.run, s.runtime, s.dist
    # From the adapters actually saved (the best epoch under optim.patience, else the last).
    labels = np.asarray([q.answer for q in s.eval_qs])
    table = single_vs_ensemble(metric_rows(member_log_probs, labels))
    epoch_kept = state.best_epoch or state.epochs_done
    if holdout is not None:
        # Rank 0 fits and writes them; on_main hands every rank the same temperatures.
        temps = dist.on_main(lambda: write_calibration(run, epoch_kept, *holdout, HOLDOUT_SOURCE))
        table |= temperature_table(member_log_probs, labels, temps)
    table |= extra_rows or {}
    summary = RunSummary(
        method=s.cfg.ensemble.method,
        epochs_trained=state.epochs_done,
        epoch_kept=epoch_kept,
        table=table,
        train_questions=state.n_train,
        eval_questions=len(s.eval_qs),
        train_seconds=state.train_seconds,
        train_tokens_per_second=state.tokens_seen / max(state.train_seconds, 1e-9),
        wall_seconds=time.perf_counter() - s.started,
        precision=str(runtime.autocast_dtype or "fp32"),
        weights_dtype=str(s.weights_dtype),
        matmul_weights_dtype=str(s.matmul_dtype),
        score_precision=str(
            scoring_runtime(runtime, s.cfg.runtime.score_precision).autocast_dtype or "fp32"
        ),
        device=str(runtime.device),
        eval_seconds=eval_seconds,
        peak_memory_gb=peak_memory_gb(runtime.device),
        processes=dist.world_size,
        distributed_mode=dist.mode,
    )

    def write() -> None:
        write_predictions(run.predictions, s.eval_qs, member_log_probs)
        card = write_card(run, s.cfg, summary)
        s.tracker.log_epochs(state.rows)  # epochs a resume found checkpointed but not logged
        s.tracker.log_finish(table, summary.epoch_kept or state.epochs_done, card, run_files(run))
        run.write_summary(summary)  # written last: its presence marks the run complete

    dist.on_main(write)
    return TrainResult(run_dir=run, table=table, summary=summary, rank=dist.rank)


# ----------------------------------------------------------------------------- last-layer ensembles


def _train_last_layer(s: _Setup) -> TrainResult:
    """Last-layer ensembles train in seconds on cached features: no checkpoints needed, an
    interrupted run simply starts over (deterministically)."""
    cfg, run = s.cfg, s.run
    state = TrainState(n_train=len(s.train_qs))
    write_json_atomic(run.provenance, provenance(s.base.path, s.train_qs, s.eval_qs))
    labels = np.asarray(s.eval_set.labels)
    final = {}

    def on_epoch(epoch: int, losses: np.ndarray, member_log_probs: np.ndarray) -> None:
        state.rows += [
            {"epoch": epoch + 1, "split": "train", "member": m, "loss": float(loss)}
            for m, loss in enumerate(losses)
        ]
        state.rows += metric_rows(member_log_probs, labels, epoch=epoch + 1, split="eval")
        write_jsonl_atomic(run.metrics, state.rows)
        run.write_eval_log_probs(epoch + 1, member_log_probs, labels)
        s.tracker.log_epochs(state.rows)
        final["log_probs"] = member_log_probs

    tick = time.perf_counter()
    ensemble = train_last_layer(
        s.base.model,
        s.train_set,
        s.eval_set,
        s.label_ids,
        s.runtime,
        n_members=cfg.ensemble.members,
        data_seeds=s.data_seeds,
        schedule_seed=s.schedule,
        batch_size=_batch_size(cfg),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        epochs=cfg.optim.epochs,
        on_epoch=on_epoch,
        loss=cfg.optim.loss,
    )
    state.train_seconds = time.perf_counter() - tick
    state.epochs_done = cfg.optim.epochs
    if cfg.data.calibrate:
        log.warning(
            "data.calibrate: last-layer runs are not calibrated yet (no held-out scoring); "
            "the held-out questions were only left out of training."
        )
    for m in range(ensemble.n_members):
        save_last_layer_member(ensemble, m, run.member(m))
    return _finish(s, state, final["log_probs"])


def print_result(result: TrainResult) -> None:
    if result.rank != 0:
        return
    s = result.summary
    print(format_table(result.table, title=f"\nEval on {s.eval_questions} questions"))
    print(
        f"\ntrained on {s.train_questions} questions at "
        f"{s.train_tokens_per_second:.0f} tokens/s ({s.precision}, {s.device}); "
        f"wall time {s.wall_seconds:.0f} s; run directory: {result.run_dir.root}"
    )
