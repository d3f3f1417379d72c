"""A training run's logger: every epoch logged exactly once, whatever the interruptions.

The run directory's ``tracking.json`` records, per logger and destination, how many epochs
were logged (and the MLflow run id), so a resumed run continues the same tracker run from the
next epoch, and switching loggers on resume starts the new one from epoch 1. Logging happens
after an epoch's checkpoint, from the checkpoint's own rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from loraens.config import TrainConfig
from loraens.io import write_json_atomic
from loraens.rundir.layout import RunDir
from loraens.tracking.base import Backend, epoch_metrics, flatten_params

# Shown beside the hyper-parameters (TensorBoard's HParams tab).
HEADLINE_METRICS = tuple(f"eval/ensemble/{m}" for m in ("accuracy", "nll", "ece", "brier"))


class RunTracker:
    """Logs a run to ``backend`` (None: the run directory's files are the only log)."""

    def __init__(self, backend: Backend | None, state_path: Path, key: str):
        self.backend = backend
        self._state_path, self._key = state_path, key
        self._states = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self._state = self._states.setdefault(key, {"epochs_logged": 0})

    @property
    def epochs_logged(self) -> int:
        return int(self._state["epochs_logged"])

    @property
    def resume_id(self) -> str | None:
        """The tracker's id of this run from an earlier process (the MLflow run id)."""
        return self._state.get("resume_id")

    def _save(self, **changes: object) -> None:
        self._state.update(changes)
        if self.backend is not None and self.backend.resume_id is not None:
            self._state["resume_id"] = self.backend.resume_id
        write_json_atomic(self._state_path, self._states)

    def log_config(self, config: TrainConfig) -> None:
        """The configuration as hyper-parameters, once per tracker run."""
        if self.backend is None or self._state.get("config_logged"):
            return
        self.backend.log_params(flatten_params(config.to_dict()), HEADLINE_METRICS)
        self._save(config_logged=True)

    def log_epochs(self, rows: Iterable[Mapping]) -> None:
        """Every complete epoch in ``rows`` (a run's metric rows so far) not yet logged."""
        if self.backend is None:
            return
        for epoch, metrics in sorted(epoch_metrics(rows).items()):
            if epoch > self.epochs_logged:
                self.backend.log_metrics(metrics, epoch)
                self._save(epochs_logged=epoch)

    def log_finish(
        self,
        table: Mapping[str, Mapping[str, float]],
        step: int,
        card: str,
        artifacts: Sequence[Path],
    ) -> None:
        """The final single-vs-ensemble table (``final/<row>/<metric>``), the card, and the
        run's files that exist (figures are shown as images where the tool can)."""
        if self.backend is None or self._state.get("finished"):
            return
        final = {
            f"final/{_slug(row)}/{metric}": float(value)
            for row, values in table.items()
            for metric, value in values.items()
        }
        self.backend.log_metrics(final, step)
        self.backend.log_text("README.md", card, step)
        for path in artifacts:
            if path.is_file():
                self.backend.log_artifact(path)
        self._save(finished=True)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.backend is not None:
            self.backend.close(finished=kind is None and bool(self._state.get("finished")))


def _slug(row: str) -> str:
    """'ensemble (M=5)' -> 'ensemble', 'single (mean)' -> 'single_mean': stable metric names."""
    name = row.split(" (M=")[0]
    return name.replace(" (", "_").replace(")", "").replace(" ", "_")


def run_files(run: RunDir) -> list[Path]:
    """The files of a finishing run a tracker keeps: the card, config, metrics, predictions,
    provenance, and any figures (PNG) in the run directory."""
    files = [run.card, run.config, run.metrics, run.predictions, run.provenance]
    return [*files, *sorted(run.root.glob("*.png"))]


def open_tracker(config: TrainConfig, run: RunDir, enabled: bool = True) -> RunTracker:
    """The run's tracker for ``config.runtime.logger`` (a no-op one when not ``enabled``, as on
    every rank but 0); imports the logger's package only if it is chosen."""
    rt = config.runtime
    if rt.logger == "csv" or not enabled:
        return RunTracker(None, run.tracking_state, "csv")
    if rt.logger == "tensorboard":
        from loraens.tracking.tensorboard_backend import TensorBoardBackend

        log_dir = Path(rt.tracking_uri) if rt.tracking_uri else run.tensorboard
        tracker = RunTracker(None, run.tracking_state, f"tensorboard {log_dir}")
        tracker.backend = TensorBoardBackend(log_dir, first_step=tracker.epochs_logged + 1)
    else:
        from loraens.tracking.mlflow_backend import MlflowBackend

        uri = rt.tracking_uri or run.mlruns.resolve().as_uri()
        tracker = RunTracker(None, run.tracking_state, f"mlflow {uri}")
        tracker.backend = MlflowBackend(uri, run.root.name, tracker.resume_id)
    tracker.log_config(config)
    return tracker
