"""The run directory: everything a run produces, each file written atomically.

config.yaml          the resolved configuration
metrics.jsonl        one row per (epoch, split, member | "ensemble")
predictions.jsonl    per question: every member's p_T, the ensemble's, the label
members/member-XX/   each member as a PEFT adapter folder
summary.json         final single-vs-ensemble table, timings, throughput
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from loraens.data.records import Question
from loraens.evaluation.metrics import ensemble_log_probs
from loraens.io import write_jsonl_atomic, write_text_atomic


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    def member(self, m: int) -> Path:
        return self.root / "members" / f"member-{m:02d}"

    def member_folders(self) -> list[Path]:
        return sorted(p for p in (self.root / "members").glob("member-*") if p.is_dir())

    def write_config(self, config: dict) -> None:
        write_text_atomic(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config.read_text())


def probability_rows(questions: list[Question], member_log_probs: np.ndarray) -> list[dict]:
    """Per-question records of every member's probabilities and the ensemble's."""
    ensemble = np.exp(ensemble_log_probs(member_log_probs))
    members = np.exp(member_log_probs)
    rows = []
    for i, q in enumerate(questions):
        k = len(q.choices)
        member_probs = members[:, i, :k]
        top = member_probs.argmax(axis=1)
        rows.append(
            {
                "id": q.id,
                "answer": q.answer,
                "prediction": int(ensemble[i, :k].argmax()),
                "ensemble_probs": ensemble[i, :k].round(6).tolist(),
                "member_probs": member_probs.round(6).tolist(),
                # Share of members whose top choice differs from the ensemble's: the
                # disagreement a user can act on (0 = unanimous).
                "disagreement": float(np.mean(top != ensemble[i, :k].argmax())),
            }
        )
    return rows


def write_predictions(path: Path, questions: list[Question], member_log_probs: np.ndarray):
    write_jsonl_atomic(path, probability_rows(questions, member_log_probs))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
