"""An experiment file: a grid of cells (task × setting × seed), each one run of loraens.

```yaml
name: cpu-small                 # runs go to OUT/<name>/<task>/<cell>/seed-<seed>
base:                           # TrainConfig sections shared by every training cell
  optim: {epochs: 3, lr: 1.0e-3}
  data: {train_limit: 48, eval_limit: 80, ood_limit: 40}
tasks: [cqa, obqa]
seeds: [0]
ood: paper                      # score the paper's OOD partner every epoch (or {task: ood})
ood_eval:                       # after training, score these tasks' eval splits as OOD sets
  tasks: [arcc, mmlu-chem]      # (OUT/.../seed-<s>/ood/<task>.json, `loraens ood` figures,
  limit: 200                    #  with "+ TS" rows when the run is calibrated, and the
                                #  per-question ood/<task>_log_probs.safetensors)
cells:
  none: {}
  kl: {optim.kl_beta: [0.01, 0.05]}        # a list expands: kl-kl_beta=0.01, kl-kl_beta=0.05
  b_decay: {optim.weight_decay: 5.0, optim.decay_target: B}
  randomness-init_only: {ensemble.vary_data_order: false, tasks: [cqa]}
  few_shot: {kind: few_shot, k: 3, draws: 3}
  laplace: {kind: posterior, method: laplace, fit_on: none}   # no adapter trained again
```

A cell's keys are dotted TrainConfig fields, plus ``tasks`` / ``seeds`` (restrict or replace
the experiment's) and ``kind`` (``train``, the default, or ``few_shot`` with ``k``, ``draws``
and ``max_length``, or ``posterior`` with ``fit_on``, the training cell whose members it is
fitted on, and :class:`~loraens.config.PosteriorConfig` fields). Lists expand to one cell per
combination.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from loraens.config import PosteriorConfig, TrainConfig
from loraens.data.tasks import TASKS
from loraens.evaluation.ood import OOD_PAIRS

_FEW_SHOT_KEYS = {"k", "draws", "max_length"}
_POSTERIOR_KEYS = {f.name for f in fields(PosteriorConfig)} | {"fit_on"}
_TOP_KEYS = {"name", "description", "base", "tasks", "seeds", "ood", "ood_eval", "cells"}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a training run (``config``) or a few-shot evaluation."""

    task: str
    name: str
    seed: int
    kind: str
    config: TrainConfig
    few_shot: dict[str, int] = field(default_factory=dict)
    posterior: PosteriorConfig | None = None
    """A posterior cell's method and options; ``config`` is then its source cell's."""
    fitted_on: str = ""
    """A posterior cell's source: the training cell (same task and seed) it is fitted on."""

    @property
    def key(self) -> str:
        return f"{self.task}/{self.name}/seed-{self.seed}"

    def fields(self) -> dict[str, str]:
        """What ``--only`` filters match against."""
        return {"task": self.task, "cell": self.name, "seed": str(self.seed), "kind": self.kind}


@dataclass(frozen=True)
class OODEval:
    """Tasks whose eval splits every finished training cell is scored on afterwards."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    """At most this many questions of each set (and of the cell's own eval split), drawn with
    the cell's data.subset_seed: the same questions for every seed and method."""


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    cells: list[Cell]
    ood_eval: OODEval = field(default_factory=OODEval)


class ExperimentError(ValueError):
    """A mistake in an experiment file, with the file and the cell it is in."""


def _fail(path: Path, where: str, message: str) -> ExperimentError:
    return ExperimentError(f"{path}: {where}: {message}")


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _expand(settings: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Cartesian product of the list-valued settings, with a name suffix per combination."""
    grid = {k: v for k, v in settings.items() if isinstance(v, list) and k != "lora.target_modules"}
    fixed = {k: v for k, v in settings.items() if k not in grid}
    if not grid:
        return [("", fixed)]
    combos = []
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(grid, values, strict=True))
        suffix = ",".join(f"{k.rsplit('.', 1)[-1]}={_format_value(v)}" for k, v in chosen.items())
        combos.append((f"-{suffix}", {**fixed, **chosen}))
    return combos


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key or "." in key:
        raise KeyError(dotted)
    target.setdefault(section, {})[key] = value


def _train_config(
    base: dict, overrides: dict[str, Any], task: str, seed: int, ood_task: str | None
) -> TrainConfig:
    values = copy.deepcopy(base)
    values.setdefault("data", {})["task"] = task
    values.setdefault("ensemble", {})["seed"] = seed
    if ood_task is not None:
        values["data"].setdefault("ood_task", ood_task)
    for dotted, value in overrides.items():
        _set_dotted(values, dotted, value)
    return TrainConfig.from_dict(values)


def _ood_tasks(path: Path, ood: Any) -> dict[str, str]:
    if ood in (None, False):
        return {}
    if ood == "paper":
        return dict(OOD_PAIRS)
    if isinstance(ood, dict):
        return {str(k): str(v) for k, v in ood.items()}
    raise _fail(path, "ood", f"expected 'paper' or a mapping task -> OOD task, got {ood!r}")


def _ood_eval(path: Path, value: Any) -> OODEval:
    if value is None:
        return OODEval()
    if not isinstance(value, dict) or set(value) - {"tasks", "limit"} or "tasks" not in value:
        raise _fail(path, "ood_eval", f"expected {{tasks: [...], limit: N}}, got {value!r}")
    limit = value.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise _fail(path, "ood_eval", f"limit must be a whole number >= 1, got {limit!r}")
    return OODEval(tuple(_check_tasks(path, "ood_eval: tasks", value["tasks"])), limit)


def _check_tasks(path: Path, where: str, tasks: list) -> list[str]:
    if not isinstance(tasks, list) or not tasks:
        raise _fail(path, where, f"expected a non-empty list of tasks, got {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise _fail(path, where, f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return [str(t) for t in tasks]


def _cells_of(path: Path, name: str, settings: dict, spec: dict, ood: dict[str, str]) -> list[Cell]:
    where = f"cell {name!r}"
    if not isinstance(settings, dict):
        raise _fail(path, where, f"expected a mapping of settings, got {settings!r}")
    settings = dict(settings)
    tasks = _check_tasks(path, f"{where}: tasks", settings.pop("tasks", spec["tasks"]))
    seeds = settings.pop("seeds", spec["seeds"])
    kind = settings.pop("kind", "train")
    if kind not in ("train", "few_shot", "posterior"):
        raise _fail(path, where, f"kind must be 'train', 'few_shot' or 'posterior', got {kind!r}")
    if kind == "posterior":
        return _posterior_cells(path, name, settings, tasks, seeds)
    cells = []
    for suffix, overrides in _expand(settings):
        for task, seed in itertools.product(tasks, seeds):
            few_shot = {}
            if kind == "few_shot":
                unknown = set(overrides) - _FEW_SHOT_KEYS
                if unknown:
                    raise _fail(
                        path,
                        where,
                        f"few_shot cells take {sorted(_FEW_SHOT_KEYS)}, not {sorted(unknown)}",
                    )
                few_shot, overrides = dict(overrides), {}
            try:
                config = _train_config(spec["base"], overrides, task, int(seed), ood.get(task))
            except KeyError as err:
                raise _fail(path, where, f"{err.args[0]!r} is not a 'section.field' key") from None
            except (ValueError, TypeError) as err:
                raise _fail(path, where, str(err)) from None
            cells.append(Cell(task, name + suffix, int(seed), kind, config, few_shot))
    return cells


def _posterior_cells(
    path: Path, name: str, settings: dict, tasks: list[str], seeds: list
) -> list[Cell]:
    """Posterior cells, each still without its source's config (see :func:`_attach_sources`)."""
    where = f"cell {name!r}"
    unknown = set(settings) - _POSTERIOR_KEYS
    if unknown:
        raise _fail(
            path, where, f"posterior cells take {sorted(_POSTERIOR_KEYS)}, not {sorted(unknown)}"
        )
    cells = []
    for suffix, values in _expand(settings):
        values = dict(values)
        fitted_on = str(values.pop("fit_on", "none"))
        try:
            posterior = PosteriorConfig(**values)
        except (ValueError, TypeError) as err:
            raise _fail(path, where, str(err)) from None
        for task, seed in itertools.product(tasks, seeds):
            placeholder = TrainConfig()
            cells.append(
                Cell(
                    task,
                    name + suffix,
                    int(seed),
                    "posterior",
                    placeholder,
                    {},
                    posterior,
                    fitted_on,
                )
            )
    return cells


def _attach_sources(path: Path, cells: list[Cell]) -> list[Cell]:
    """Give each posterior cell its source cell's config (the run it is fitted on)."""
    by_key = {c.key: c for c in cells if c.kind == "train"}
    attached = []
    for cell in cells:
        if cell.kind == "posterior":
            source = by_key.get(source_key(cell))
            if source is None:
                raise _fail(
                    path,
                    f"cell {cell.name!r}",
                    f"fit_on {cell.fitted_on!r} names no training cell of task {cell.task} "
                    f"and seed {cell.seed}",
                )
            cell = dataclasses.replace(cell, config=source.config)
        attached.append(cell)
    return attached


def source_key(cell: Cell) -> str:
    """The key of the training cell a posterior cell is fitted on."""
    return f"{cell.task}/{cell.fitted_on}/seed-{cell.seed}"


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file; every cell's config is checked before any runs."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: expected a mapping at the top level.")
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    for required in ("name", "tasks", "cells"):
        if required not in spec:
            raise ExperimentError(f"{path}: missing {required!r}.")
    spec.setdefault("base", {})
    spec.setdefault("seeds", [0])
    _check_tasks(path, "tasks", spec["tasks"])
    ood = _ood_tasks(path, spec.get("ood"))
    cells = [
        cell
        for name, settings in spec["cells"].items()
        for cell in _cells_of(path, str(name), settings or {}, spec, ood)
    ]
    cells = _attach_sources(path, cells)
    duplicates = {c.key for c in cells if sum(d.key == c.key for d in cells) > 1}
    if duplicates:
        raise ExperimentError(f"{path}: cells with the same name: {sorted(duplicates)}")
    return Experiment(
        str(spec["name"]),
        str(spec.get("description", "")),
        cells,
        _ood_eval(path, spec.get("ood_eval")),
    )


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Cells matching every ``field=value[,value...]`` filter (values may use * wildcards)."""
    chosen = cells
    for condition in only:
        name, sep, values = condition.partition("=")
        if not sep or name not in ("task", "cell", "seed", "kind"):
            raise ValueError(
                f"--only {condition!r}: expected task=..., cell=..., seed=... or kind=..."
            )
        patterns = values.split(",")
        chosen = [c for c in chosen if any(fnmatchcase(c.fields()[name], p) for p in patterns)]
    return chosen
