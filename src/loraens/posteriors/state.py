"""A fitted posterior on disk: ``posterior.json`` and, for Laplace, its K-FAC eigenpairs.

A posterior's folder is a run directory of its own (config.yaml, metrics.jsonl,
predictions.jsonl, eval and held-out log-probs, calibration.json, summary.json, card), so
``evaluate``, ``predict``, ``ood``, ``serve``, ``calibrate`` and the report read it like any run.
It holds no adapters: ``posterior.json`` names the run whose members it was fitted on (a path
relative to the folder), and ``posterior_state.safetensors`` the Laplace factors (for
SmolLM2-135M with q and v adapted at r = 8, about 125 MB per member: large, so experiments
keep it out of git, like the members).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from loraens.config import PosteriorConfig
from loraens.io import atomic_path
from loraens.posteriors.kfac import KronEigen
from loraens.rundir.records import read_record, write_record

RECORD_FILE = "posterior.json"
STATE_FILE = "posterior_state.safetensors"


@dataclass
class PosteriorRecord:
    """posterior.json: what was fitted on which run, what it chose and what it cost."""

    method: str
    source: str
    """The run whose members the posterior is around, relative to this folder."""
    members: int
    config: dict
    """The :class:`~loraens.config.PosteriorConfig` it was fitted with."""
    fit_questions: int
    """Questions the fit read: training questions (laplace) or anchor questions (tfb)."""
    fit_seconds: float
    peak_memory_gb: float
    """Peak memory of the fitting process (CPU: resident set; GPU: allocated)."""
    eval_questions: int = 0
    eval_seconds: float = 0.0
    """Scoring the eval set with the posterior's predictive (all members)."""
    passes: str = ""
    """What scoring one question costs, in the stacked pass."""
    prior_precision: list[float] = field(default_factory=list)
    """laplace: τ per member."""
    prior_selection: str = ""
    """laplace: "evidence" or "holdout"."""
    prior_search: list[dict] = field(default_factory=list)
    """laplace with held-out selection: {"tau", "nll"} per grid point, nll per member."""
    sigma: list[float] = field(default_factory=list)
    """tfb: σ per member."""
    sigma_search: list[dict] = field(default_factory=list)
    """tfb: {"sigma", "change"} per evaluation of the bisection, per member."""

    @property
    def posterior_config(self) -> PosteriorConfig:
        return PosteriorConfig(**self.config)


def write_posterior_record(folder: Path, record: PosteriorRecord) -> None:
    write_record(record, folder / RECORD_FILE)


def read_posterior_record(folder: Path) -> PosteriorRecord:
    return read_record(PosteriorRecord, folder / RECORD_FILE)


def is_posterior(folder: Path) -> bool:
    return (folder / RECORD_FILE).is_file()


def write_factors(folder: Path, factors: dict[str, KronEigen]) -> None:
    tensors = {
        f"{key}/{name}": value.contiguous()
        for key, eig in factors.items()
        for name, value in asdict(eig).items()
    }
    with atomic_path(folder / STATE_FILE) as tmp:
        save_file(tensors, str(tmp))


def read_factors(folder: Path) -> dict[str, KronEigen]:
    tensors = load_file(str(folder / STATE_FILE))
    keys = sorted({name.rsplit("/", 1)[0] for name in tensors})
    return {
        key: KronEigen(
            **{name: tensors[f"{key}/{name}"] for name in KronEigen.__dataclass_fields__}
        )
        for key in keys
    }
