"""Finding and classifying finished runs for the report.

``collect_runs(paths)`` searches ``paths`` for run directories and returns a :class:`RunSet`.
How runs are read (documented here because every figure relies on it):

- A training run counts once ``summary.json`` exists (it is written last); others are listed
  as ignored. A few-shot run is a folder with ``few_shot.json``.
- Runs are classified by their ``config.yaml``, never by folder names: task (``data.task``, else
  the eval file's stem), method, regulariser (KL β > 0; weight decay on A or B only; weight decay
  on everything other than the default 0.01; holdout patience; else "none"), LoRA dropout and
  the randomness flags. ``cell.json``, when present, only adds its label and seed to the tables.
- Runs that differ only in their seed form one *setting* (:class:`Setting`).
- Per task the *reference* is the unregularised LoRA ensemble (weight decay 0.01 on all, no
  dropout, both randomness sources) whose M is closest to the task's most common M. Other
  settings are compared with it; when a regulariser was run under several budgets, the one
  matching the reference's budget (model, epochs, lr, batch, data size, M) is used.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np

from loraens.config import POSTERIOR_METHODS, OptimConfig, TrainConfig
from loraens.rundir import (
    CellRecord,
    EvalLogProbs,
    FewShotResult,
    RunDir,
    RunSummary,
    read_jsonl,
)
from loraens.rundir.layout import (
    CONFIG_FILE,
    FEW_SHOT_FILE,
    POSTERIORS_DIR,
    RUN_MARKERS,
    SUMMARY_FILE,
)

__all__ = [
    "RANDOMNESS_ORDER",
    "FewShotRun",
    "Run",
    "RunSet",
    "Setting",
    "collect_runs",
    "distinct_values",
    "is_dropout_lora",
    "is_plain_lora",
    "provenance",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

_DEFAULT_WEIGHT_DECAY = OptimConfig().weight_decay  # the paper's unregularised AdamW default
# Methods whose members are distributions over adapter weights: posteriors over a LoRA run's
# members (loraens.posteriors) and BLoB; M of them form a mixture ("ens.").
BAYESIAN_METHODS = (*POSTERIOR_METHODS, "blob")

_RANDOMNESS = {
    (True, True): "init+data",
    (True, False): "init only",
    (False, True): "data only",
    (False, False): "none",
}
RANDOMNESS_ORDER = tuple(_RANDOMNESS.values())


def _num(x: float) -> str:
    return f"{x:g}"


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True, eq=False)
class Run:
    """A finished training run and how it is classified."""

    path: Path
    config: TrainConfig
    summary: RunSummary
    cell: CellRecord | None = None

    @cached_property
    def rows(self) -> list[dict]:
        """metrics.jsonl; a missing or torn file reads as no rows (the summary still counts)."""
        try:
            return read_jsonl(RunDir(self.path).metrics)
        except (OSError, ValueError):
            return []

    @property
    def task(self) -> str:
        data = self.config.data
        if data.task:
            return str(data.task)
        if data.eval_file:
            return Path(data.eval_file).stem
        return "unknown"

    @property
    def ood_task(self) -> str | None:
        return self.config.data.ood_task

    @property
    def method(self) -> str:
        """ensemble.method, or the posterior method of a posterior's folder (its summary)."""
        return self.summary.method or self.config.ensemble.method

    @property
    def members(self) -> int:
        return self.config.ensemble.members

    @property
    def seed(self) -> int:
        return _cell_seed(self.cell, self.config.ensemble.seed)

    @property
    def dropout(self) -> float:
        return float(self.config.lora.dropout)

    @property
    def randomness(self) -> str:
        ens = self.config.ensemble
        return _RANDOMNESS[bool(ens.vary_init), bool(ens.vary_data_order)]

    @property
    def regularisers(self) -> list[tuple[str, float]]:
        """(family, strength) of every regulariser on top of the paper's default."""
        optim = self.config.optim
        out = []
        if optim.kl_beta > 0:
            out.append(("KL", float(optim.kl_beta)))
        decay = float(optim.weight_decay)
        if optim.decay_target != "all":
            out.append((f"{optim.decay_target}-decay", decay))
        elif decay != _DEFAULT_WEIGHT_DECAY:
            out.append(("all-decay", decay))
        if optim.patience:
            out.append(("patience", float(optim.patience)))
        return out

    @property
    def family(self) -> str:
        return " + ".join(f for f, _ in self.regularisers) or "none"

    @property
    def strength(self) -> float | None:
        regs = self.regularisers
        return regs[0][1] if regs else None

    @property
    def regulariser(self) -> str:
        symbols = {"KL": "β=", "patience": ""}
        parts = [f"{f} {symbols.get(f, 'λ=')}{_num(s)}" for f, s in self.regularisers]
        return " + ".join(parts) or "none"

    @property
    def label(self) -> str:
        """The setting's name in legends and tables."""
        if self.method == "mc_dropout":
            base = f"MC dropout {_num(self.dropout)}"
        elif self.method == "last_layer":
            base = "last-layer ens."
        elif self.method in BAYESIAN_METHODS:
            base = self.method
        elif self.dropout > 0:
            base = f"LoRA ens. + dropout {_num(self.dropout)}"
        else:
            base = self.regulariser
        if self.method != "lora" or self.dropout > 0:
            base += "" if self.family == "none" else f" ({self.regulariser})"
        if self.randomness != "init+data":
            base += f" [{self.randomness}]"
        return base

    @property
    def planned_epochs(self) -> int:
        return self.config.optim.epochs

    @property
    def epochs(self) -> int:
        """Epochs actually trained (fewer than planned when holdout patience stopped it)."""
        trained = self.summary.epochs_trained
        return self.planned_epochs if trained is None else trained

    @property
    def lr(self) -> float:
        return float(self.config.optim.lr)

    @property
    def batch_size(self) -> int | None:
        return self.config.optim.batch_size

    @property
    def model(self) -> str:
        return Path(self.config.model.name_or_path).name

    @property
    def budget(self) -> tuple:
        """What must match for two settings to be compared like for like."""
        lora = self.config.lora
        return (
            self.model,
            self.planned_epochs,
            self.lr,
            self.batch_size,
            self.summary.train_questions,
            self.summary.eval_questions,
            self.members,
            lora.rank,
            lora.alpha,
            tuple(lora.target_modules or ()),
        )

    @property
    def setting_key(self) -> tuple:
        return (self.task, self.method, self.label, self.budget)

    @property
    def has_predictions(self) -> bool:
        return RunDir(self.path).predictions.is_file()

    @property
    def has_eval_log_probs(self) -> bool:
        """Every evaluated epoch's unrounded log-probs were saved (runs since Fig. 6 per epoch)."""
        return RunDir(self.path).eval_log_probs.is_file()

    @cached_property
    def eval_log_probs(self) -> EvalLogProbs | None:
        """eval_log_probs.safetensors, read once (several report sections use it); None when
        absent or unreadable (a warning says why)."""
        if not self.has_eval_log_probs:
            return None
        try:
            return RunDir(self.path).read_eval_log_probs()
        except (OSError, ValueError) as error:
            log.warning("cannot read the eval log-probs of %s: %s", self.path, error)
            return None

    @property
    def is_calibrated(self) -> bool:
        """Temperatures and held-out log-probs were saved (data.calibrate or optim.patience)."""
        run = RunDir(self.path)
        return run.calibration.is_file() and run.holdout_log_probs.is_file()

    def table(self, which: str) -> dict[str, float]:
        """The summary's "single (mean)" or "ensemble (M=...)" row, or (``which`` "single + TS",
        "ensemble + TS") either with its fitted temperatures."""
        table = self.summary.table
        if which.endswith(" + TS"):
            key = which
        elif which == "single":
            key = "single (mean)"
        else:
            key = next((k for k in table if k.startswith("ensemble (")), "")
        return {m: float(v) for m, v in table.get(key, {}).items()}


@dataclass(frozen=True, eq=False)
class FewShotRun:
    """A few-shot evaluation: ``few_shot.json`` and per-draw predictions."""

    path: Path
    result: FewShotResult
    cell: CellRecord | None = None

    @property
    def task(self) -> str:
        return str((self.cell.task if self.cell else "") or self.result.task or "unknown")

    @property
    def seed(self) -> int:
        return _cell_seed(self.cell, self.result.seed)

    @property
    def has_predictions(self) -> bool:
        return RunDir(self.path).predictions.is_file()


def _cell_seed(cell: CellRecord | None, default: int) -> int:
    """cell.json's seed wins: the experiment's cell seed names the run in tables."""
    return int(cell.seed) if cell is not None and cell.seed is not None else int(default)


def is_plain_lora(run: Run) -> bool:
    """A LoRA ensemble without dropout, varying both initialisation and data order."""
    return run.method == "lora" and run.dropout == 0 and run.randomness == "init+data"


def is_dropout_lora(run: Run) -> bool:
    """A LoRA ensemble trained with adapter dropout: Fig. 4's partner of MC dropout."""
    return run.method == "lora" and run.dropout > 0


# ----------------------------------------------------------------------------- settings


@dataclass
class Setting:
    """Runs that differ only in their seed, sorted by seed."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def table(self, which: str) -> dict[str, float]:
        """Mean over seeds of the summary's single-mean or ensemble row."""
        return self._over_seeds(which, np.mean)

    def table_std(self, which: str) -> dict[str, float]:
        return self._over_seeds(which, np.std)

    def _over_seeds(self, which: str, stat: Callable) -> dict[str, float]:
        tables = [r.table(which) for r in self.runs]
        keys = set.intersection(*(set(t) for t in tables))
        return {k: float(stat([t[k] for t in tables])) for k in keys}

    def curve(self, split: str, which: str, key: str) -> tuple[list[int], list[float]]:
        """Per-epoch ``key`` of the ensemble or the members' mean, averaged over seeds at the
        epochs every seed evaluated."""
        per_run = [_run_curve(r.rows, split, which, key) for r in self.runs]
        epochs = sorted(set.intersection(*(set(c) for c in per_run)))
        return epochs, [float(np.mean([c[e] for c in per_run])) for e in epochs]


def _run_curve(rows: list[dict], split: str, which: str, key: str) -> dict[int, float]:
    chosen = [r for r in rows if r.get("split") == split and r.get(key) is not None]
    if which == "ensemble":
        return {int(r["epoch"]): float(r[key]) for r in chosen if r.get("member") == "ensemble"}
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in chosen:
        if r.get("member") != "ensemble":
            per_epoch[int(r["epoch"])].append(float(r[key]))
    return {e: float(np.mean(v)) for e, v in per_epoch.items()}


def _budget_distance(s: Setting, reference: Setting | None) -> tuple:
    if reference is None:
        return (0, -len(s.runs), str(s.first.path))
    ref = reference.first.budget
    mismatches = sum(a != b for a, b in zip(s.first.budget, ref, strict=True))
    return (mismatches, -len(s.runs), str(s.first.path))


@dataclass
class RunSet:
    """Everything found under the given paths."""

    paths: list[Path]
    train: list[Run] = field(default_factory=list)
    few_shot: list[FewShotRun] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return sorted({r.task for r in self.train} | {f.task for f in self.few_shot})

    def settings(self, task: str, keep: Callable[[Run], bool] = lambda r: True) -> list[Setting]:
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for run in self.train:
            if run.task == task and keep(run):
                groups[run.setting_key].append(run)
        return [Setting(sorted(g, key=lambda r: (r.seed, str(r.path)))) for g in groups.values()]

    def reference(self, task: str) -> Setting | None:
        """The unregularised LoRA ensemble every figure compares against (see module doc)."""
        lora = [r for r in self.train if r.task == task and r.method == "lora"]
        if not lora:
            return None
        counts = Counter(r.members for r in lora)
        common = max(counts, key=lambda m: (counts[m], m))
        candidates = self.settings(task, is_plain_lora)
        candidates = [s for s in candidates if s.first.family == "none"]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda s: (abs(s.first.members - common), -len(s.runs), -s.first.epochs),
        )

    def variants(
        self, task: str, keep: Callable[[Run], bool], reference: Setting | None
    ) -> list[Setting]:
        """One setting per label: the one closest to the reference's budget."""
        by_label: dict[str, list[Setting]] = defaultdict(list)
        for s in self.settings(task, keep):
            by_label[s.first.label].append(s)
        chosen = []
        # The reference's own label always resolves to the reference: its distance is 0.
        for label in sorted(by_label, key=lambda k: (by_label[k][0].first.family != "none", k)):
            chosen.append(min(by_label[label], key=lambda s: _budget_distance(s, reference)))
        return chosen

    def few_shot_for(self, task: str) -> FewShotRun | None:
        runs = sorted(
            (f for f in self.few_shot if f.task == task), key=lambda f: (f.seed, str(f.path))
        )
        return next((f for f in runs if f.has_predictions), runs[0] if runs else None)

    def relative(self, path: Path) -> str:
        """A run's path relative to the given folder it was found in, for readable tables."""
        for root in self.paths:
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            return str(root.name / rel) if str(rel) != "." else root.name or str(root)
        return str(path)


# ----------------------------------------------------------------------------- collecting


def _candidate_dirs(root: Path) -> Iterable[Path]:
    if any((root / name).is_file() for name in RUN_MARKERS):
        yield root
        # A run's own subfolders (members/, checkpoint/) are never runs; the posteriors
        # `loraens posterior` fits on it (posteriors/<method>) are.
        fitted = root / POSTERIORS_DIR
        if fitted.is_dir():
            for child in sorted(p for p in fitted.iterdir() if p.is_dir()):
                yield from _candidate_dirs(child)
        return
    # Hidden folders hold atomic-write temporaries or tool state, never runs.
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for child in children:
        yield from _candidate_dirs(child)


def _load(path: Path) -> Run | FewShotRun | str:
    """The run at ``path``, or why it is ignored."""
    run = RunDir(path)
    try:
        cell = run.read_cell()
    except (OSError, ValueError):
        cell = None  # only a label and a seed: the run still counts without them
    if run.few_shot.is_file():
        result = _read(run.read_few_shot, FEW_SHOT_FILE)
        return result if isinstance(result, str) else FewShotRun(path, result, cell)
    if cell is not None and cell.kind == "few_shot":
        return f"incomplete (no {FEW_SHOT_FILE})"
    if not run.summary.is_file():
        return f"incomplete (no {SUMMARY_FILE})"
    summary = _read(run.read_summary, SUMMARY_FILE)
    if isinstance(summary, str):
        return summary
    config = _read(run.read_config, CONFIG_FILE)
    if isinstance(config, str):
        return config
    return Run(path, config, summary, cell)


def _read(reader: Callable[[], T], name: str) -> T | str:
    """What ``reader`` returns, or why the file cannot be read (a reason to list it ignored)."""
    try:
        return reader()
    except (OSError, ValueError) as err:
        return f"unreadable {name}: {err}"


def collect_runs(paths: Sequence[str | Path]) -> RunSet:
    """Find run directories in ``paths`` (each a run directory or a folder searched
    recursively). Every directory is read once, however many given paths contain it."""
    runs = RunSet(paths=[Path(p) for p in paths])
    seen: set[Path] = set()
    for root in runs.paths:
        if not root.is_dir():
            runs.ignored.append((root, "not a directory"))
            continue
        for path in _candidate_dirs(root):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            loaded = _load(path)
            if isinstance(loaded, Run):
                runs.train.append(loaded)
            elif isinstance(loaded, FewShotRun):
                runs.few_shot.append(loaded)
            else:
                runs.ignored.append((path, loaded))
    runs.train.sort(key=lambda r: (r.task, r.label, r.seed, str(r.path)))
    runs.few_shot.sort(key=lambda f: (f.task, f.seed, str(f.path)))
    return runs


# ----------------------------------------------------------------------------- provenance


def _or_unknown(value: object) -> object:
    return "?" if value is None else value


def distinct_values(items: Iterable[object]) -> str:
    """The distinct values in first-seen order, joined by "/"; "?" when there are none."""
    unique = list(dict.fromkeys(str(i) for i in items))
    return "/".join(unique) if unique else "?"


def provenance(runs: Sequence[Run], few_shot: Sequence[FewShotRun] = ()) -> str:
    """Model, data, budget and seeds behind a figure: its footer and part of its caption."""
    parts = []
    models = [r.model for r in runs] + [Path(f.result.model or "?").name for f in few_shot]
    parts.append(f"model {distinct_values(models)}")
    data = defaultdict(set)
    for r in runs:
        data[r.task].add(f"{r.summary.train_questions} train / {r.summary.eval_questions} eval q")
    for f in few_shot:
        data[f.task].add(f"few-shot: {_or_unknown(f.result.eval_questions)} eval q")
    parts.append("data " + "; ".join(f"{t} ({', '.join(sorted(v))})" for t, v in data.items()))
    if runs:
        batch = distinct_values(r.batch_size or "task default" for r in runs)
        parts.append(
            f"budget {distinct_values(r.epochs for r in runs)} epochs, "
            f"lr {distinct_values(r.lr for r in runs)}, "
            f"M {distinct_values(sorted({r.members for r in runs}))}, batch {batch}"
        )
    if few_shot:
        parts.append(
            "few-shot k "
            + distinct_values(f.result.k for f in few_shot)
            + ", draws "
            + distinct_values(f.result.draws for f in few_shot)
        )
    seeds = sorted({r.seed for r in runs} | {f.seed for f in few_shot})
    parts.append(f"seeds {distinct_values(seeds)}")
    return " · ".join(parts)
