"""`loraens evaluate` and `loraens predict`: score a trained run's saved members."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraens.data.files import load_questions_file
from loraens.data.prompts import LETTERS, encode_questions, label_token_ids
from loraens.data.records import Question
from loraens.data.tasks import load_task
from loraens.evaluation.inference import score_members
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.io import write_jsonl_atomic
from loraens.models.loading import BaseModel, load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import AdapterError, adapter_shape, load_members
from loraens.rundir import RunDir, probability_rows
from loraens.runtime import Runtime, resolve_runtime


@dataclass
class LoadedEnsemble:
    ensemble: LoRAEnsemble
    base: BaseModel
    runtime: Runtime
    max_length: int
    mc_dropout_passes: int = 1


def load_run(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> LoadedEnsemble:
    """The base model of a finished run with every saved member stacked onto it."""
    run = RunDir(Path(run_dir))
    if not run.config.exists():
        raise FileNotFoundError(f"{run.root} is not a loraens run directory (no config.yaml).")
    folders = run.member_folders()
    if not folders:
        raise AdapterError(f"{run.root} holds no saved members (members/member-XX folders).")
    cfg = run.read_config()
    method = cfg["ensemble"].get("method", "lora")
    if method == "last_layer":
        raise ValueError(
            f"{run.root} is a last-layer ensemble: its metrics and predictions are in the run "
            f"directory; evaluate, predict and ood score LoRA runs."
        )
    runtime = resolve_runtime(device, precision)
    base = load_base_model(
        cfg["model"]["name_or_path"],
        device=runtime.device,
        trust_remote_code=cfg["model"]["trust_remote_code"],
    )
    rank, alpha, targets = adapter_shape(folders)
    mc_dropout = method == "mc_dropout"
    dropout = cfg["lora"]["dropout"] if mc_dropout else 0.0
    ensemble = LoRAEnsemble(base.model, len(folders), rank, alpha, dropout, targets)
    load_members(ensemble, folders)
    ensemble.to(runtime.device).eval()
    passes = cfg["ensemble"]["members"] if mc_dropout else 1
    return LoadedEnsemble(ensemble, base, runtime, cfg["model"]["max_length"], passes)


def score_questions(
    loaded: LoadedEnsemble,
    questions: list[Question],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Every member's log p_T on ``questions``: (members, questions, max options)."""
    tokenizer = loaded.base.tokenizer
    label_ids = torch.tensor(label_token_ids(tokenizer, max(len(q.choices) for q in questions)))
    return score_members(
        loaded.ensemble,
        encode_questions(tokenizer, list(questions), loaded.max_length),
        label_ids.to(loaded.runtime.device),
        loaded.runtime,
        batch_size=batch_size,
        mc_dropout_passes=loaded.mc_dropout_passes,
        progress=progress,
    )


def evaluate_run(
    loaded: LoadedEnsemble,
    questions: list[Question],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Metric rows (per member and ensemble) and the single-vs-ensemble table."""
    if any(q.answer is None for q in questions):
        raise ValueError("Evaluation needs an answer for every question; use predict instead.")
    member_log_probs = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = metric_rows(member_log_probs, np.asarray([q.answer for q in questions]), split="eval")
    return rows, single_vs_ensemble(rows)


def predict_file(
    loaded: LoadedEnsemble,
    questions: list[Question],
    output: Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Write one JSONL line per question: answer letter, ensemble probability, disagreement."""
    member_log_probs = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = []
    for row in probability_rows(questions, member_log_probs):
        k = row["prediction"]
        rows.append(
            {
                "id": row["id"],
                "prediction": k,
                "letter": LETTERS[k],
                "probability": row["ensemble_probs"][k],
                "disagreement": row["disagreement"],
                "ensemble_probs": row["ensemble_probs"],
                "member_probs": row["member_probs"],
            }
        )
    write_jsonl_atomic(output, rows)
    return rows


def questions_for(task: str | None, file: str | None, require_answer: bool) -> list[Question]:
    """The eval split of a task, or the questions of a user's file (exactly one of the two)."""
    if (task is None) == (file is None):
        raise ValueError("Give exactly one of --task or --file.")
    if task is not None:
        return load_task(task)[1]
    return load_questions_file(file, require_answer=require_answer)
