"""Experiment tracking: a run's per-epoch metrics, configuration, card and figures sent to the
tool the user already looks at (``runtime.logger``: csv, tensorboard or mlflow).

Local-first: TensorBoard event files and an MLflow file store live in the run directory unless
``runtime.tracking_uri`` names another place. The tensorboard and mlflow packages are optional
extras, imported only when chosen.
"""

from loraens.tracking.base import MissingExtraError, epoch_metrics, flatten_params
from loraens.tracking.session import HEADLINE_METRICS, RunTracker, open_tracker, run_files

__all__ = [
    "HEADLINE_METRICS",
    "MissingExtraError",
    "RunTracker",
    "epoch_metrics",
    "flatten_params",
    "open_tracker",
    "run_files",
]
