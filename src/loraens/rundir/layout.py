"""The run directory's layout: the one place that names its files.

config.yaml              the resolved configuration (:class:`~loraens.config.TrainConfig`)
metrics.jsonl            one row per (epoch, split, member | "ensemble")
predictions.jsonl        per question, at the epoch kept: the label, every member's p_T and the
                         ensemble's, rounded for reading and as exact float64 log p_T (the
                         file alone reproduces summary.json; older files: rounded p_T only)
eval_log_probs.safetensors  every member's unrounded eval log p_T at every evaluated epoch
holdout_log_probs.safetensors  every member's log p_T on the held-out training questions (the
                         adapters kept), with data.calibrate or optim.patience; same format
calibration.json         temperatures fitted on them (:class:`CalibrationRecord`)
ood/<set>.json           an OOD evaluation of the run (an experiment's ood_eval)
ood/<set>_log_probs.safetensors  its per-question records: every member's log p_T on the OOD
                         questions and on the in-distribution ones, labels and question ids
members/member-XX/       each member as a PEFT adapter folder
posteriors/<method>/     a posterior fitted on the members (`loraens posterior`), itself read as
                         a run: these records plus posterior.json (loraens.posteriors.state)
checkpoint/state.json    the epoch count and metric rows so far (with the checkpoint's tensors)
summary.json             final single-vs-ensemble table, timings, throughput (:class:`RunSummary`)
few_shot.json            a few-shot cell's result, in place of summary.json (:class:`FewShotResult`)
cell.json                which experiment cell a folder belongs to (:class:`CellRecord`)
provenance.json          model and data fingerprints
README.md                the run's model card (base model, data, members, results, how to load)
tracking.json            what the tensorboard / mlflow logger has logged so far (epochs, run id)
tensorboard/             TensorBoard event files (runtime.logger=tensorboard)
mlruns/                  an MLflow file store (runtime.logger=mlflow)

An exported ensemble (`loraens export`) is a folder read as a run too: its members are PEFT
adapters laid out as PEFT's multi-adapter ``save_pretrained`` writes them (the adapter named
``default`` at the root, every other one in a subfolder named after it), listed in order in
ensemble.json beside the config, summary, provenance and card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from numpy.typing import ArrayLike

from loraens.config import TrainConfig
from loraens.io import write_text_atomic
from loraens.rundir.log_probs import (
    EvalLogProbs,
    OODLogProbs,
    read_eval_log_probs,
    read_ood_log_probs,
    write_eval_log_probs,
    write_ood_log_probs,
)
from loraens.rundir.records import (
    CalibrationRecord,
    CellRecord,
    FewShotResult,
    RunSummary,
    read_record,
    write_record,
)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_LOG_PROBS_FILE = "eval_log_probs.safetensors"
HOLDOUT_LOG_PROBS_FILE = "holdout_log_probs.safetensors"
CALIBRATION_FILE = "calibration.json"
SUMMARY_FILE = "summary.json"
FEW_SHOT_FILE = "few_shot.json"
CELL_FILE = "cell.json"
PROVENANCE_FILE = "provenance.json"
OOD_DIR = "ood"
OOD_LOG_PROBS_SUFFIX = "_log_probs.safetensors"  # inside OOD_DIR, after the set's name
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE_FILE = "state.json"  # inside CHECKPOINT_DIR
CARD_FILE = "README.md"
TRACKING_STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MEMBERS_DIR = "members"
POSTERIORS_DIR = "posteriors"  # `loraens posterior` writes <run>/posteriors/<method>
EXPORT_MANIFEST_FILE = "ensemble.json"
# PEFT's name for the adapter it saves at a folder's root.
PEFT_DEFAULT_ADAPTER = "default"

# Any of these makes a folder a run (its own subfolders, members/ and checkpoint/, never are).
RUN_MARKERS = (CONFIG_FILE, FEW_SHOT_FILE, CELL_FILE)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS_FILE

    @property
    def eval_log_probs(self) -> Path:
        return self.root / EVAL_LOG_PROBS_FILE

    @property
    def holdout_log_probs(self) -> Path:
        return self.root / HOLDOUT_LOG_PROBS_FILE

    @property
    def calibration(self) -> Path:
        return self.root / CALIBRATION_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def few_shot(self) -> Path:
        return self.root / FEW_SHOT_FILE

    @property
    def cell(self) -> Path:
        return self.root / CELL_FILE

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoint_state(self) -> Path:
        """Present once an epoch's checkpoint is complete: the run can be resumed."""
        return self.checkpoint / CHECKPOINT_STATE_FILE

    @property
    def card(self) -> Path:
        return self.root / CARD_FILE

    @property
    def tracking_state(self) -> Path:
        return self.root / TRACKING_STATE_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def mlruns(self) -> Path:
        return self.root / MLFLOW_DIR

    @property
    def export_manifest(self) -> Path:
        return self.root / EXPORT_MANIFEST_FILE

    def ood_result(self, ood_set: str) -> Path:
        """The JSON of the run's OOD evaluation on ``ood_set`` (a task name)."""
        return self.root / OOD_DIR / f"{ood_set}.json"

    def ood_results(self) -> list[Path]:
        return sorted((self.root / OOD_DIR).glob("*.json"))

    def ood_log_probs(self, ood_set: str) -> Path:
        """The per-question records of the run's OOD evaluation on ``ood_set``."""
        return self.root / OOD_DIR / f"{ood_set}{OOD_LOG_PROBS_SUFFIX}"

    def write_ood_log_probs(self, ood_set: str, record: OODLogProbs) -> None:
        write_ood_log_probs(self.ood_log_probs(ood_set), record)

    def read_ood_log_probs(self, ood_set: str) -> OODLogProbs:
        return read_ood_log_probs(self.ood_log_probs(ood_set))

    def member(self, m: int) -> Path:
        return self.root / MEMBERS_DIR / f"member-{m:02d}"

    def member_folders(self) -> list[Path]:
        """Every member's adapter folder in member order, in a run or an exported ensemble."""
        if self.export_manifest.is_file():
            return [self.exported_adapter(name) for name in self.exported_adapter_names()]
        return sorted(p for p in (self.root / MEMBERS_DIR).glob("member-*") if p.is_dir())

    def exported_adapter_names(self) -> list[str]:
        names = json.loads(self.export_manifest.read_text()).get("adapters")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.export_manifest} does not list the adapters' names.")
        return names

    def exported_adapter(self, name: str) -> Path:
        """Where an exported ensemble keeps adapter ``name`` (PEFT's multi-adapter layout)."""
        return self.root if name == PEFT_DEFAULT_ADAPTER else self.root / name

    def write_config(self, config: TrainConfig) -> None:
        write_text_atomic(self.config, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def read_config(self) -> TrainConfig:
        """The run's configuration; keys a config lacks (added to loraens later) take their
        defaults, which is what the run used."""
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a loraens run directory (no {CONFIG_FILE})."
            )
        try:
            values = yaml.safe_load(self.config.read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"expected a mapping of sections, got {type(values).__name__}")
            return TrainConfig.from_dict(values)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{self.config} is not a valid loraens config: {err}") from err

    def write_eval_log_probs(
        self, epoch: int, member_log_probs: ArrayLike, labels: ArrayLike
    ) -> None:
        """Record an evaluated epoch's (M, N, K) eval log-probs (see :mod:`.log_probs`)."""
        write_eval_log_probs(self.eval_log_probs, epoch, member_log_probs, labels)

    def read_eval_log_probs(self) -> EvalLogProbs:
        return read_eval_log_probs(self.eval_log_probs)

    def write_holdout_log_probs(
        self, epoch: int, member_log_probs: ArrayLike, labels: ArrayLike
    ) -> None:
        """Record the (M, N, K) log-probs of the held-out questions used for calibration."""
        write_eval_log_probs(self.holdout_log_probs, epoch, member_log_probs, labels)

    def read_holdout_log_probs(self) -> EvalLogProbs:
        return read_eval_log_probs(self.holdout_log_probs)

    def read_calibration(self) -> CalibrationRecord | None:
        """The run's fitted temperatures; None for a run never calibrated."""
        if not self.calibration.is_file():
            return None
        return read_record(CalibrationRecord, self.calibration)

    def write_calibration(self, record: CalibrationRecord) -> None:
        write_record(record, self.calibration)

    def read_summary(self) -> RunSummary:
        return read_record(RunSummary, self.summary)

    def write_summary(self, summary: RunSummary) -> None:
        write_record(summary, self.summary)

    def read_few_shot(self) -> FewShotResult:
        return read_record(FewShotResult, self.few_shot)

    def write_few_shot(self, result: FewShotResult) -> None:
        write_record(result, self.few_shot)

    def read_cell(self) -> CellRecord | None:
        """The folder's cell record; None outside an experiment."""
        return read_record(CellRecord, self.cell) if self.cell.is_file() else None

    def write_cell(self, record: CellRecord) -> None:
        write_record(record, self.cell)
