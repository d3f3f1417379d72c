"""What a logger backend does, and the names its metrics get.

A backend sees plain numbers keyed by ``split/who/metric`` (``eval/ensemble/nll``,
``train/member-03/loss``) at an integer step, which is always the epoch (1-based): the epoch,
not a running counter, is what lets a resumed run log each step exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

ParamValue = str | int | float | bool


class MissingExtraError(RuntimeError):
    """The logger's package is not installed."""

    def __init__(self, logger: str, package: str):
        super().__init__(
            f"runtime.logger={logger} needs the {package} package, which is not installed: "
            f"pip install 'loraens[{logger}]' (or pip install {package}), or choose "
            f"--runtime.logger csv."
        )


class Backend(Protocol):
    """One experiment tracker's writer for one run."""

    def log_params(self, params: Mapping[str, ParamValue], metric_keys: Iterable[str]) -> None:
        """The run's configuration; ``metric_keys`` are the headline metrics to show beside it."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_text(self, name: str, text: str, step: int) -> None:
        """A markdown document (the run's card)."""

    def log_artifact(self, path: Path) -> None:
        """A file of the run (a PNG figure is also shown as an image where the tool can)."""

    def close(self, finished: bool) -> None: ...

    @property
    def resume_id(self) -> str | None:
        """What identifies this run in the tracker, to continue it on resume (None: nothing)."""


def flatten_params(config: Mapping[str, Mapping[str, object]]) -> dict[str, ParamValue]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}``; None and lists as text, which
    every tracker accepts as a hyper-parameter value."""
    flat: dict[str, ParamValue] = {}
    for section, values in config.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            flat[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def _who(member: object) -> str:
    return member if isinstance(member, str) else f"member-{member:02d}"


def epoch_metrics(rows: Iterable[Mapping]) -> dict[int, dict[str, float]]:
    """metrics.jsonl rows as ``{epoch: {"split/who/metric": value}}``, with the members' mean
    train loss as ``train/mean/loss``."""
    by_epoch: dict[int, dict[str, float]] = {}
    train_losses: dict[int, list[float]] = {}
    for row in rows:
        epoch, split, who = row["epoch"], row["split"], _who(row["member"])
        metrics = by_epoch.setdefault(epoch, {})
        for key, value in row.items():
            if key not in ("epoch", "split", "member") and isinstance(value, (int, float)):
                metrics[f"{split}/{who}/{key}"] = float(value)
        if split == "train":
            train_losses.setdefault(epoch, []).append(float(row["loss"]))
    for epoch, losses in train_losses.items():
        by_epoch[epoch]["train/mean/loss"] = sum(losses) / len(losses)
    return by_epoch
