"""The run directory's JSON records, each written and read back through one dataclass.

A record is written with ``write_json_atomic`` (sorted keys), exactly as these files have always
been written, so old runs read back unchanged. Reading is lenient about what older loraens
versions wrote (fields added later default to None; fields since dropped are ignored) and strict
about the rest: a missing or mistyped field fails naming the file and the field.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from loraens.io import write_json_atomic

R = TypeVar("R")


class RecordError(ValueError):
    """A run-directory file that exists but does not hold the record it should."""


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False  # JSON true is no count
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)


def record_from_dict(cls: type[R], data: Any, source: str | Path) -> R:
    """``cls`` from a decoded JSON object, or a :class:`RecordError` naming ``source``."""
    if not isinstance(data, dict):
        raise RecordError(f"{source}: expected a JSON object, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]  # R is always a dataclass
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecordError(f"{source}: field {f.name!r} is missing.")
            continue
        if not _matches(data[f.name], hints[f.name]):
            raise RecordError(
                f"{source}: field {f.name!r} should be {_type_name(hints[f.name])}, "
                f"got {data[f.name]!r}."
            )
        values[f.name] = data[f.name]
    try:
        return cls(**values)
    except ValueError as err:  # a record's own checks (__post_init__) on values of the right type
        raise RecordError(f"{source}: {err}") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def read_record(cls: type[R], path: Path) -> R:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # also UnicodeDecodeError
        raise RecordError(f"{path} is not valid JSON ({err}).") from err
    return record_from_dict(cls, data, path)


def write_record(record: Any, path: Path) -> None:
    write_json_atomic(path, asdict(record))


@dataclass
class RunSummary:
    """summary.json: a training run's final table and timings. Written last: its presence
    marks the run complete."""

    table: dict[str, dict[str, float]]
    """single_vs_ensemble of the adapters saved (the best epoch under patience, else the last)"""
    train_questions: int
    eval_questions: int
    train_seconds: float
    train_tokens_per_second: float
    wall_seconds: float
    precision: str
    device: str
    # Added after the first release: None when an older run lacks them.
    method: str | None = None
    epochs_trained: int | None = None
    epoch_kept: int | None = None
    weights_dtype: str | None = None
    processes: int | None = None
    distributed_mode: str | None = None
    matmul_weights_dtype: str | None = None
    """dtype the decoder's linear weights were held in (model.dtype auto: the compute dtype);
    loading the run rounds them the same way, so its scores match the run's own"""
    score_precision: str | None = None
    """precision of the run's own evaluation (runtime.score_precision resolved)"""
    eval_seconds: float | None = None
    """scoring the eval set once with every member (the last time it was scored): with
    eval_questions, the inference cost per question of the whole ensemble"""
    peak_memory_gb: float | None = None
    """the process's peak memory (CPU: resident set, GPU: allocated), loading included"""
    fit_seconds: float | None = None
    """a posterior's fitting time on top of training its members (train_seconds: the run it
    was fitted on)"""


@dataclass
class FewShotResult:
    """few_shot.json: the few-shot baseline's per-draw metrics, their mean and std. Written
    last: its presence marks a few-shot cell complete."""

    k: int
    draws: int
    seed: int
    per_draw: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    # Added by the experiment runner (absent from `loraens few-shot --output` files).
    task: str | None = None
    model: str | None = None
    eval_questions: int | None = None


@dataclass
class CellRecord:
    """cell.json: the experiment cell a folder belongs to. The report only takes its label and
    seed, so a partial record still reads."""

    experiment: str = ""
    task: str = ""
    cell: str = ""
    seed: int | None = None
    kind: str = "train"


@dataclass
class CalibrationRecord:
    """calibration.json: temperatures fitted on held-out questions (the questions' member
    log-probs are in holdout_log_probs.safetensors; selective and conformal thresholds are
    chosen from them when asked, as they depend on the target)."""

    member_temperatures: list[float]
    """One T per member, in member order (MC dropout: per stochastic pass)."""
    ensemble_temperature: float
    """T of the members' averaged distribution."""
    questions: int
    """Held-out questions the temperatures were fitted on."""
    source: str
    """Where they came from: "training hold-out" or the questions file given to calibrate."""
    holdout_nll: dict[str, float] = field(default_factory=dict)
    """Held-out NLL before and after scaling ("single", "single + TS", "ensemble", ...)."""

    def __post_init__(self):
        temperatures = [*self.member_temperatures, self.ensemble_temperature]
        if not self.member_temperatures or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
            for t in temperatures
        ):
            raise ValueError(
                f"temperatures must be finite numbers > 0, got members "
                f"{self.member_temperatures!r} and ensemble {self.ensemble_temperature!r}."
            )
        if self.questions < 1:
            raise ValueError(f"questions must be >= 1, got {self.questions}.")
