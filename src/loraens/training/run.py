"""`loraens train`: fine-tune an ensemble, evaluate it every epoch, write the run directory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraens.config import TrainConfig
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.data.sources import default_batch_size, load_run_data
from loraens.evaluation.inference import score_members
from loraens.evaluation.report import format_table, metric_rows, single_vs_ensemble
from loraens.io import write_json_atomic, write_jsonl_atomic
from loraens.models.loading import load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import save_member
from loraens.rundir import RunDir, write_predictions
from loraens.runtime import resolve_runtime
from loraens.training.optim import build_optimizer
from loraens.training.seeds import member_seeds, schedule_seed
from loraens.training.trainer import EnsembleTrainer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: RunDir
    table: dict[str, dict[str, float]]
    summary: dict


def train_ensemble(cfg: TrainConfig, out_dir: str | Path) -> TrainResult:
    run = RunDir(Path(out_dir))
    if run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(
            f"Run directory {run.root} already exists and is not empty; choose another --out."
        )
    started = time.perf_counter()
    runtime = resolve_runtime(cfg.runtime.device, cfg.runtime.precision)
    base = load_base_model(
        cfg.model.name_or_path,
        device=runtime.device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    train_qs, eval_qs = load_run_data(cfg.data)
    max_choices = max(len(q.choices) for q in train_qs + eval_qs)
    label_ids = torch.tensor(label_token_ids(base.tokenizer, max_choices), device=runtime.device)
    train_set = encode_questions(base.tokenizer, train_qs, cfg.model.max_length)
    eval_set = encode_questions(base.tokenizer, eval_qs, cfg.model.max_length)
    shortened = train_set.n_shortened + eval_set.n_shortened
    if shortened:
        log.warning(
            "%d prompts exceeded max_length=%d and had their question text shortened.",
            shortened,
            cfg.model.max_length,
        )

    n_members = cfg.ensemble.members
    ensemble = LoRAEnsemble(
        base.model,
        n_members,
        cfg.lora.rank,
        cfg.lora.alpha,
        cfg.lora.dropout,
        cfg.lora.target_modules,
    ).to(runtime.device)
    ensemble.init_members(
        member_seeds(cfg.ensemble.seed, n_members, "init", cfg.ensemble.vary_init)
    )
    batch_size = cfg.optim.batch_size or default_batch_size(cfg.data)
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, cfg.optim),
        train_set,
        label_ids,
        runtime,
        data_seeds=member_seeds(cfg.ensemble.seed, n_members, "data", cfg.ensemble.vary_data_order),
        batch_size=batch_size,
        schedule_seed=schedule_seed(cfg.ensemble.seed) if cfg.data.group_by_length else None,
        members_per_pass=cfg.runtime.members_per_pass,
    )
    resolved = cfg.to_dict()
    resolved["optim"]["batch_size"] = batch_size
    run.write_config(resolved)

    labels = np.asarray(eval_set.labels)
    rows: list[dict] = []
    train_seconds = 0.0
    member_log_probs = None
    for epoch in range(cfg.optim.epochs):
        tick = time.perf_counter()
        train_loss = trainer.train_epoch(epoch, progress=cfg.runtime.progress)
        train_seconds += time.perf_counter() - tick
        rows += [
            {"epoch": epoch + 1, "split": "train", "member": m, "loss": float(loss)}
            for m, loss in enumerate(train_loss)
        ]
        last = epoch + 1 == cfg.optim.epochs
        if last or (epoch + 1) % cfg.runtime.eval_every == 0:
            member_log_probs = score_members(
                ensemble,
                eval_set,
                label_ids,
                runtime,
                batch_size=cfg.runtime.eval_batch_size,
                members_per_pass=cfg.runtime.members_per_pass,
                progress=cfg.runtime.progress,
            )
            epoch_rows = metric_rows(member_log_probs, labels, epoch=epoch + 1, split="eval")
            rows += epoch_rows
            ens = epoch_rows[-1]
            log.info(
                "epoch %d: ensemble acc %.3f nll %.3f ece %.3f | mean train loss %.3f",
                epoch + 1,
                ens["accuracy"],
                ens["nll"],
                ens["ece"],
                train_loss.mean(),
            )
        write_jsonl_atomic(run.metrics, rows)

    for m in range(n_members):
        save_member(ensemble, m, run.member(m), base_model=cfg.model.name_or_path)
    write_predictions(run.predictions, eval_qs, member_log_probs)
    final_rows = [r for r in rows if r["split"] == "eval" and r["epoch"] == cfg.optim.epochs]
    table = single_vs_ensemble(final_rows)
    summary = {
        "table": table,
        "train_questions": len(train_qs),
        "eval_questions": len(eval_qs),
        "shortened_prompts": shortened,
        "train_seconds": train_seconds,
        "train_tokens_per_second": trainer.tokens_seen / max(train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - started,
        "precision": str(runtime.autocast_dtype or "fp32"),
        "device": str(runtime.device),
    }
    write_json_atomic(run.summary, summary)
    return TrainResult(run_dir=run, table=table, summary=summary)


def print_result(result: TrainResult) -> None:
    s = result.summary
    print(format_table(result.table, title=f"\nEval on {s['eval_questions']} questions"))
    print(
        f"\ntrained on {s['train_questions']} questions at "
        f"{s['train_tokens_per_second']:.0f} tokens/s ({s['precision']}, {s['device']}); "
        f"wall time {s['wall_seconds']:.0f} s; run directory: {result.run_dir.root}"
    )
