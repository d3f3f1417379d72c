"""MLflow runs, written through ``MlflowClient`` (no global active run is touched)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from loraens.tracking.base import MissingExtraError, ParamValue

EXPERIMENT = "loraens"
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100  # and of parameters


def allow_file_store(uri: str) -> None:
    """MLflow >= 3.7 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: a file store
    in the run directory is the local-first default, so opt in for ``file:`` URIs (a value the
    user set, even 'false', is kept)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class MlflowBackend:
    """One MLflow run in the experiment ``loraens``; ``run_id`` continues an existing run."""

    def __init__(self, tracking_uri: str, run_name: str, run_id: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise MissingExtraError("mlflow", "mlflow") from err
        self.tracking_uri = tracking_uri
        allow_file_store(tracking_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            experiment = self._client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self._client.create_experiment(EXPERIMENT)
            )
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    @property
    def resume_id(self) -> str | None:
        return self.run_id

    def log_params(self, params: Mapping[str, ParamValue], metric_keys: Iterable[str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, metrics=items[start : start + _BATCH])

    def log_text(self, name: str, text: str, step: int) -> None:
        self._client.log_text(self.run_id, text, name)

    def log_artifact(self, path: Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        self._client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
