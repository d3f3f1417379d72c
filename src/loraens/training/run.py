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
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraens.config import TrainConfig
from loraens.data.prompts import EncodedQuestions, encode_questions, label_token_ids
from loraens.data.records import Question
from loraens.data.sources import (
    default_batch_size,
    load_ood_questions,
    load_run_data,
    split_holdout,
)
from loraens.distributed import Dist, env_world_size, launch
from loraens.evaluation.inference import score_members
from loraens.evaluation.report import format_table, metric_rows, single_vs_ensemble
from loraens.io import write_json_atomic, write_jsonl_atomic
from loraens.methods.last_layer import save_last_layer_member, train_last_layer
from loraens.methods.ood import detection_rows
from loraens.models.loading import BaseModel, load_base_model, resolve_model_path
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import save_member
from loraens.provenance import provenance
from loraens.rundir import RunDir, write_predictions
from loraens.runtime import Runtime, resolve_runtime, resolve_weights_dtype
from loraens.training.checkpoint import (
    TrainState,
    load_checkpoint,
    load_stacked,
    save_checkpoint,
    stacked_tensors,
)
from loraens.training.eta import announce_duration
from loraens.training.optim import build_optimizer
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
    summary: dict
    rank: int = 0  # in a distributed run only rank 0 prints


def _config_differences(old: dict, new: dict) -> list[str]:
    # A key the old config lacks was added to loraens later: the run used its default.
    defaults = TrainConfig().to_dict()
    differences = []
    for section, values in new.items():
        for key, value in values.items():
            before = (old.get(section) or {}).get(key, defaults[section][key])
            if (section, key) not in _RESULT_NEUTRAL and before != value:
                differences.append(f"{section}.{key}: {before!r} -> {value!r}")
    return differences


def _prepare_run_dir(run: RunDir, cfg: TrainConfig) -> None:
    """Write the config of a new run, or check a rerun matches the run it continues."""
    if run.config.exists():
        differences = _config_differences(run.read_config(), cfg.to_dict())
        if differences:
            raise ValueError(
                f"{run.root} holds a run with a different configuration ("
                + "; ".join(differences)
                + "). Continue it with --resume, or choose another --out."
            )
        return
    if run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(
            f"{run.root} exists, is not empty and is not a loraens run; choose another --out."
        )
    run.write_config(cfg.to_dict())


def resume_config(run_dir: str | Path) -> TrainConfig:
    run = RunDir(Path(run_dir))
    if not run.config.exists():
        raise FileNotFoundError(f"Cannot resume: {run.root} has no config.yaml.")
    return TrainConfig.from_dict(run.read_config())


@dataclass
class _Setup:
    """Everything both training paths share: model, questions, encodings, seeds."""

    cfg: TrainConfig
    run: RunDir
    runtime: Runtime
    base: BaseModel
    train_qs: list[Question]
    eval_qs: list[Question]
    train_set: EncodedQuestions
    eval_set: EncodedQuestions
    holdout_set: EncodedQuestions
    ood_set: EncodedQuestions
    label_ids: torch.Tensor
    data_seeds: list[int]
    schedule: int | None
    started: float
    dist: Dist
    weights_dtype: torch.dtype


def _n_trained(cfg: TrainConfig) -> int:
    # MC dropout trains one adapter; its M "members" are stochastic passes at test time.
    return 1 if cfg.ensemble.method == "mc_dropout" else cfg.ensemble.members


def train_ensemble(cfg: TrainConfig, out_dir: str | Path) -> TrainResult:
    run = RunDir(Path(out_dir))
    batch_size = cfg.optim.batch_size or default_batch_size(cfg.data)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=batch_size))
    if cfg.ensemble.method == "last_layer" and env_world_size() > 1:
        raise ValueError(
            "ensemble.method=last_layer trains in seconds on cached features in one process; "
            "run it without torchrun or accelerate launch."
        )
    with launch(cfg.runtime.device, _n_trained(cfg), cfg.runtime.dist_timeout) as dist:

        def prepare() -> dict | None:
            _prepare_run_dir(run, cfg)
            return json.loads(run.summary.read_text()) if run.summary.exists() else None

        summary = dist.on_main(prepare)
        if summary is not None:
            log.info("%s is already complete.", run.root)
            return TrainResult(run, summary["table"], summary, dist.rank)
        setup = _set_up(cfg, run, dist)
        if cfg.ensemble.method == "last_layer":
            return _train_last_layer(setup)
        return _train_lora(setup)


def _set_up(cfg: TrainConfig, run: RunDir, dist: Dist) -> _Setup:
    started = time.perf_counter()
    device = str(dist.device) if dist.active else cfg.runtime.device
    rt = cfg.runtime
    runtime = resolve_runtime(
        device, rt.precision, packing=rt.packing, pack_tokens=rt.pack_tokens,
        memory_budget_gb=rt.memory_budget_gb,
    )  # fmt: skip
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
    train_qs, eval_qs = load_run_data(cfg.data)
    holdout_qs: list[Question] = []
    if cfg.optim.patience is not None:
        train_qs, holdout_qs = split_holdout(
            train_qs, cfg.optim.holdout_fraction, cfg.data.subset_seed
        )
    ood_qs = load_ood_questions(cfg.data)
    max_choices = max(len(q.choices) for q in train_qs + eval_qs + ood_qs)
    label_ids = torch.tensor(label_token_ids(base.tokenizer, max_choices), device=runtime.device)

    def encode(questions: list[Question]) -> EncodedQuestions:
        return encode_questions(base.tokenizer, questions, cfg.model.max_length)

    train_set, eval_set, holdout_set = encode(train_qs), encode(eval_qs), encode(holdout_qs)
    ood_set = encode(ood_qs)
    encoded = (train_set, eval_set, holdout_set, ood_set)
    if (shortened := sum(e.n_shortened for e in encoded)) and dist.is_main:
        log.warning(
            "%d prompts exceeded max_length=%d and had their question text shortened.",
            shortened,
            cfg.model.max_length,
        )
    seed = cfg.ensemble.seed
    return _Setup(
        cfg=cfg,
        run=run,
        runtime=runtime,
        base=base,
        train_qs=train_qs,
        eval_qs=eval_qs,
        train_set=train_set,
        eval_set=eval_set,
        holdout_set=holdout_set,
        ood_set=ood_set,
        label_ids=label_ids,
        data_seeds=member_seeds(seed, cfg.ensemble.members, "data", cfg.ensemble.vary_data_order),
        schedule=schedule_seed(seed) if cfg.data.group_by_length else None,
        started=started,
        dist=dist,
        weights_dtype=weights_dtype,
    )


def _train_lora(s: _Setup) -> TrainResult:
    cfg, run, runtime, dist = s.cfg, s.run, s.runtime, s.dist
    n_trained = _n_trained(cfg)
    mc_passes = cfg.ensemble.members // n_trained
    mine = dist.members  # global indices of the members this process trains (all, alone)
    ensemble = LoRAEnsemble(
        s.base.model,
        len(mine),
        cfg.lora.rank,
        cfg.lora.alpha,
        cfg.lora.dropout,
        cfg.lora.target_modules,
    ).to(runtime.device)
    # Seeds come from the global member index, so a member is the same on any number of ranks.
    init_seeds = member_seeds(cfg.ensemble.seed, n_trained, "init", cfg.ensemble.vary_init)
    ensemble.init_members(init_seeds[mine.start : mine.stop])
    progress = cfg.runtime.progress and dist.is_main
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, cfg.optim),
        s.train_set,
        s.label_ids,
        runtime,
        data_seeds=s.data_seeds[mine.start : mine.stop],
        batch_size=cfg.optim.batch_size,
        schedule_seed=s.schedule,
        members_per_pass=cfg.runtime.members_per_pass,
        kl_beta=cfg.optim.kl_beta,
        dist=dist,
    )

    # LoRA dropout draws from torch's global generator: seed it so a rerun is bit-identical
    # (a resumed run restores the generator's state from the checkpoint instead). Each rank has
    # its own generator, so with lora.dropout > 0 a distributed run's masks differ from a
    # single process's: equal in distribution, not bit for bit.
    torch.manual_seed(rank_seed(cfg.ensemble.seed, dist.rank))
    if dist.on_main(lambda: (run.checkpoint / "state.json").exists()):
        state, best = load_checkpoint(run.checkpoint, ensemble, trainer.optimizer, dist)
        log.info("Resuming %s after epoch %d of %d.", run.root, state.epochs_done, cfg.optim.epochs)
    else:
        state, best = TrainState(n_train=len(s.train_qs)), None
        dist.on_main(
            lambda: write_json_atomic(
                run.provenance, provenance(s.base.path, s.train_qs, s.eval_qs)
            )
        )

    def evaluate(questions: EncodedQuestions = s.eval_set) -> np.ndarray:
        """Every member's log-probs (all M, on every rank): each rank scores its own members."""
        local = score_members(
            ensemble,
            questions,
            s.label_ids,
            runtime,
            batch_size=cfg.runtime.eval_batch_size,
            members_per_pass=cfg.runtime.members_per_pass,
            mc_dropout_passes=mc_passes,
            progress=progress,
            questions=dist.question_share(len(questions)),
        )
        return dist.gather_scores(local)

    labels = np.asarray(s.eval_set.labels)
    member_log_probs = None
    first_epoch = cfg.optim.epochs if state.stopped_early else state.epochs_done
    if dist.is_main:
        trainer.on_step = announce_duration(
            trainer, cfg, first_epoch, s.eval_set, s.ood_set, s.holdout_set
        )
    try:
        for epoch in range(first_epoch, cfg.optim.epochs):
            tick, tokens_before = time.perf_counter(), trainer.tokens_seen
            train_loss = trainer.train_epoch(epoch, progress=progress)
            state.train_seconds += time.perf_counter() - tick
            state.tokens_seen += dist.sum(trainer.tokens_seen - tokens_before)
            state.rows += [
                {"epoch": epoch + 1, "split": "train", "member": m, "loss": float(loss)}
                for m, loss in enumerate(train_loss)
            ]
            if epoch + 1 == cfg.optim.epochs or (epoch + 1) % cfg.runtime.eval_every == 0:
                member_log_probs = evaluate()
                epoch_rows = metric_rows(member_log_probs, labels, epoch=epoch + 1, split="eval")
                state.rows += epoch_rows
                if len(s.ood_set):
                    state.rows += _ood_rows(member_log_probs, evaluate(s.ood_set), s.ood_set, epoch)
                ens = epoch_rows[-1]
                log.info(
                    "epoch %d: ensemble acc %.3f nll %.3f ece %.3f | mean train loss %.3f",
                    epoch + 1,
                    ens["accuracy"],
                    ens["nll"],
                    ens["ece"],
                    train_loss.mean(),
                )
            state.epochs_done = epoch + 1
            if cfg.optim.patience is not None:
                holdout_rows = metric_rows(
                    evaluate(s.holdout_set),
                    np.asarray(s.holdout_set.labels),
                    epoch=epoch + 1,
                    split="holdout",
                )
                state.rows += holdout_rows
                # Rank 0's number decides for all ranks, so they cannot disagree on stopping.
                nll = dist.broadcast(holdout_rows[-1]["nll"])
                if state.best_holdout_nll is None or nll < state.best_holdout_nll:
                    state.best_epoch, state.best_holdout_nll = epoch + 1, nll
                    best = stacked_tensors(ensemble)
                state.stopped_early = epoch + 1 - state.best_epoch >= cfg.optim.patience
            save_checkpoint(run.checkpoint, ensemble, trainer.optimizer, state, best, dist)
            # metrics.jsonl is derived from the checkpoint's rows, so the two never disagree.
            dist.on_main(lambda: write_jsonl_atomic(run.metrics, state.rows))
            if state.stopped_early:
                log.info(
                    "Held-out NLL has not improved for %d epochs: stopping after epoch "
                    "%d, keeping epoch %d.",
                    cfg.optim.patience,
                    epoch + 1,
                    state.best_epoch,
                )
                break
    except KeyboardInterrupt:
        raise TrainingInterrupted(run.root, state.epochs_done) from None

    if best is not None and state.best_epoch != state.epochs_done:
        load_stacked(ensemble, best)
        member_log_probs = None
    if member_log_probs is None:  # resumed after the last epoch, or restored the best epoch
        member_log_probs = evaluate()
    stacked = dist.gather_members(stacked_tensors(ensemble))  # every member, from every rank

    def save_members() -> None:
        for m in range(n_trained):
            save_member(ensemble, m, run.member(m), cfg.model.name_or_path, stacked=stacked)

    dist.on_main(save_members)
    return _finish(s, state, member_log_probs)


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


def _finish(s: _Setup, state: TrainState, member_log_probs: np.ndarray) -> TrainResult:
    cfg, run, runtime, dist = s.cfg, s.run, s.runtime, s.dist
    # From the adapters actually saved (the best epoch under optim.patience, else the last).
    labels = np.asarray([q.answer for q in s.eval_qs])
    table = single_vs_ensemble(metric_rows(member_log_probs, labels))
    summary = {
        "method": cfg.ensemble.method,
        "epochs_trained": state.epochs_done,
        "epoch_kept": state.best_epoch or state.epochs_done,
        "table": table,
        "train_questions": state.n_train,
        "eval_questions": len(s.eval_qs),
        "train_seconds": state.train_seconds,
        "train_tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - s.started,
        "precision": str(runtime.autocast_dtype or "fp32"),
        "weights_dtype": str(s.weights_dtype),
        "device": str(runtime.device),
        "processes": dist.world_size,
        "distributed_mode": dist.mode,
    }

    def write() -> None:
        write_predictions(run.predictions, s.eval_qs, member_log_probs)
        # Written last: its presence is what marks the run complete.
        write_json_atomic(run.summary, summary)

    dist.on_main(write)
    return TrainResult(run_dir=run, table=table, summary=summary, rank=dist.rank)


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
        batch_size=cfg.optim.batch_size,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        epochs=cfg.optim.epochs,
        on_epoch=on_epoch,
    )
    state.train_seconds = time.perf_counter() - tick
    state.epochs_done = cfg.optim.epochs
    for m in range(ensemble.n_members):
        save_last_layer_member(ensemble, m, run.member(m))
    return _finish(s, state, final["log_probs"])


def print_result(result: TrainResult) -> None:
    if result.rank != 0:
        return
    s = result.summary
    print(format_table(result.table, title=f"\nEval on {s['eval_questions']} questions"))
    print(
        f"\ntrained on {s['train_questions']} questions at "
        f"{s['train_tokens_per_second']:.0f} tokens/s ({s['precision']}, {s['device']}); "
        f"wall time {s['wall_seconds']:.0f} s; run directory: {result.run_dir.root}"
    )
