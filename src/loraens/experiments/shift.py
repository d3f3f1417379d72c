"""The report's distribution-shift sections (BLoB's protocol, issue 29): shift.csv and
shift_differences.csv, from the per-question records of an experiment's ``ood_eval``
(``ood/<set>_log_probs.safetensors``, :class:`~loraens.rundir.OODLogProbs`).

Per training task, the reference (the unregularised LoRA ensemble of
:meth:`~loraens.experiments.runs.RunSet.reference`) gives four models: its members ("mean
single member": each member's figure, averaged over members), their ensemble, and both with
temperature scaling ("+ TS": the temperatures of the run's calibration.json, fitted on its
held-out training questions only); MC dropout and last-layer ensembles of the same task add
their own ensembles. Each OOD set, and the in-distribution questions every set is told apart
from, is scored by every model and seed:

- shift.csv: accuracy, NLL and ECE (mean over seeds and the per-seed spread), and the AUROC of
  telling the OOD set from the in-distribution questions (scores ``-max p``, entropy and, for
  an ensemble of members, their mutual information), with its 95% bootstrap interval over
  the questions of both sets (:func:`~loraens.evaluation.intervals.auroc_interval`);
- shift_differences.csv: A − B with its 95% paired-bootstrap interval pooled over seeds, as
  differences.csv (:func:`~loraens.evaluation.intervals.paired_difference`,
  :func:`~loraens.evaluation.intervals.auroc_difference`): ensemble − mean single member (with
  and without TS), ensemble + TS − ensemble, and the LoRA ensemble − MC dropout and −
  last-layer ensembles, on every set.

Runs are paired by seed and only on identical questions (the records' question ids); a seed
scored on other questions is left out with a note. Both CSVs are written only when some run
has records, so reports of experiments without ``ood_eval`` keep their files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from loraens.decisions.stored import temperatures_of
from loraens.decisions.temperature import Temperatures
from loraens.evaluation.intervals import (
    DEFAULT_RESAMPLES,
    METRIC_FUNCTIONS,
    Difference,
    auroc_difference,
    auroc_interval,
    paired_difference,
)
from loraens.evaluation.metrics import ensemble_log_probs, max_prob, mutual_information
from loraens.evaluation.metrics import predictive_entropy as entropy
from loraens.experiments.runs import BAYESIAN_METHODS, Run, RunSet, Setting
from loraens.experiments.sections import (
    CALIBRATED_VERSUS_CLAIM,
    DIFFERENCE_COLUMNS,
    ENSEMBLE_GAIN_CLAIM,
    Panel,
    SectionSpec,
    difference_row,
)
from loraens.rundir import OODLogProbs, RunDir
from loraens.rundir.layout import CALIBRATION_FILE, OOD_LOG_PROBS_SUFFIX

__all__ = ["SHIFT_COLUMNS", "SHIFT_DIFFERENCE_COLUMNS", "SHIFT_SECTIONS"]

log = logging.getLogger(__name__)

SHIFT_METRICS = ("accuracy", "nll", "ece")
# OOD scores (higher: more OOD); mutual_information needs an ensemble's members.
SHIFT_SCORES = ("neg_max_prob", "entropy", "mutual_information")
TS_CLAIM = "temperature scaling: + TS − without"
METHOD_CLAIM = "LoRA ensemble − method"
PARTS = ("in_distribution", "ood")
SHIFT_COLUMNS = (
    "task", "eval_set", "model", "metric", "value", "low", "high", "seeds", "n_seeds",
    "seed_sd", "seed_min", "seed_max", "questions", "in_questions", "resamples",
)  # fmt: skip
SHIFT_DIFFERENCE_COLUMNS = ("task", "eval_set", *DIFFERENCE_COLUMNS[1:])
_RECORDS = f"OOD records (an experiment's ood_eval: ood/<set>{OOD_LOG_PROBS_SUFFIX})"


# ----------------------------------------------------------------------------- models


@dataclass
class _Model:
    """One model of one seed on an OOD set and the in-distribution questions: per part, a
    (J, N, K) stack whose figures are averaged over J (the members of "mean single member";
    J = 1 for an ensemble) and, for an ensemble, its (M, N, K) members."""

    stacks: dict[str, np.ndarray]
    members: dict[str, np.ndarray] | None = None

    def scores(self, part: str, score: str) -> np.ndarray | None:
        """(J, N) OOD scores of the part's questions; None where the score is undefined."""
        if score == "mutual_information":
            if self.members is None:
                return None
            return np.round(np.maximum(mutual_information(self.members[part]), 0.0), 12)[None]
        f: Callable[[np.ndarray], np.ndarray] = (
            (lambda x: -max_prob(x)) if score == "neg_max_prob" else entropy
        )
        return np.stack([f(x) for x in self.stacks[part]])


def _ensemble(record: OODLogProbs) -> _Model:
    members = {"in_distribution": record.in_log_probs, "ood": record.ood_log_probs}
    stacks = {part: ensemble_log_probs(lp)[None] for part, lp in members.items()}
    return _Model(stacks, members)


def _reference_models(
    record: OODLogProbs, temps: Temperatures | None, names: dict[str, str]
) -> dict[str, _Model]:
    """The reference run's single members and ensemble, and both + TS with ``temps``."""
    members = {"in_distribution": record.in_log_probs, "ood": record.ood_log_probs}
    models = {names["single"]: _Model(dict(members)), names["ensemble"]: _ensemble(record)}
    if temps is not None:
        models[names["single + TS"]] = _Model(
            {p: temps.members_scaled(lp) for p, lp in members.items()}
        )
        models[names["ensemble + TS"]] = _Model(
            {p: temps.ensemble_scaled(lp)[None] for p, lp in members.items()}
        )
    return models


def _names(members: int, method: str = "") -> dict[str, str]:
    """The four models of a run of LoRA members (``method`` ""), or of a Bayesian method's run
    (its single members are that method with M = 1: Laplace-LoRA, TFB, BLoB)."""
    ensemble = f"{method or 'LoRA'} ens. (M={members})"
    single = f"{method} (M=1)" if method else "mean single member"
    return {
        "single": single,
        "single + TS": f"{single} + TS",
        "ensemble": ensemble,
        "ensemble + TS": f"{ensemble} + TS",
    }


def _temperatures(run: Run, members: int) -> Temperatures | None:
    """The run's fitted temperatures, when it has them for its ``members`` members."""
    try:
        record = RunDir(run.path).read_calibration()
    except (OSError, ValueError) as error:
        log.warning("cannot read the %s of %s: %s", CALIBRATION_FILE, run.path, error)
        return None
    temps = None if record is None else temperatures_of(record)
    return temps if temps is not None and len(temps.members) == members else None


# ----------------------------------------------------------------------------- records


def _record(run: Run, ood_set: str) -> OODLogProbs | None:
    folder = RunDir(run.path)
    if not folder.ood_log_probs(ood_set).is_file():
        return None
    try:
        return folder.read_ood_log_probs(ood_set)
    except (OSError, ValueError) as error:
        log.warning("cannot read the OOD records of %s: %s", run.path, error)
        return None


def _record_sets(run: Run) -> list[str]:
    """The OOD sets a run has records of."""
    folder = RunDir(run.path)
    return [p.stem for p in folder.ood_results() if folder.ood_log_probs(p.stem).is_file()]


@dataclass
class _ShiftSet:
    """One OOD set of a task: every model's per-seed scores, all on the same questions."""

    name: str
    in_ids: list[str]
    ood_ids: list[str]
    labels: dict[str, np.ndarray]  # part -> (N,) labels, -1 where unknown
    models: dict[str, dict[int, _Model]] = field(default_factory=dict)  # name -> seed -> model
    names: dict[str, str] = field(default_factory=dict)  # the reference's model names

    def same_questions(self, record: OODLogProbs) -> bool:
        return record.in_ids == self.in_ids and record.ood_ids == self.ood_ids

    def add(self, seed: int, models: dict[str, _Model]) -> None:
        for name, model in models.items():
            self.models.setdefault(name, {})[seed] = model


def _shift_set(ref: Setting, others: list[Setting], ood_set: str, panel: Panel) -> _ShiftSet | None:
    """The reference's seeds (and the other settings' runs of those seeds) with records of
    ``ood_set`` on the questions of the reference's first such seed."""
    shift: _ShiftSet | None = None
    for run in ref.runs:
        record = _record(run, ood_set)
        if record is None or (
            shift is not None and run.seed in shift.models[shift.names["ensemble"]]
        ):
            continue
        if shift is None:
            labels = {"in_distribution": record.in_labels, "ood": record.ood_labels}
            shift = _ShiftSet(ood_set, record.in_ids, record.ood_ids, labels)
            shift.names = _names(record.in_log_probs.shape[0])
        if not shift.same_questions(record):
            panel.notes.append(
                f"{ood_set}: seed {run.seed} of the reference scored other questions; left out."
            )
            continue
        temps = _temperatures(run, record.in_log_probs.shape[0])
        shift.add(run.seed, _reference_models(record, temps, shift.names))
    if shift is None:
        return None
    seeds = set(shift.models[shift.names["ensemble"]])
    for setting in others:
        name = f"{setting.first.label} (M={setting.first.members})"
        bayesian = setting.first.method in BAYESIAN_METHODS
        if bayesian:
            name = _names(setting.first.members, setting.first.method)["ensemble"]
        for run in setting.runs:
            record = _record(run, ood_set) if run.seed in seeds else None
            if record is None or run.seed in shift.models.get(name, {}):
                continue
            if shift.same_questions(record) and bayesian:
                members = record.in_log_probs.shape[0]
                models = _names(members, run.method)
                shift.add(run.seed, _reference_models(record, _temperatures(run, members), models))
            elif shift.same_questions(record):
                shift.add(run.seed, {name: _ensemble(record)})
            else:
                panel.notes.append(
                    f"{ood_set}: {name} seed {run.seed} scored other questions; left out."
                )
    return shift


def _shift_sets(rs: RunSet, task: str, panel: Panel) -> list[_ShiftSet]:
    """Every OOD set the task's reference has records of, with the settings compared."""
    ref = rs.reference(task)
    if ref is None:
        panel.missing.append(f"an unregularised LoRA run (method lora, no dropout) with {_RECORDS}")
        return []
    others = rs.variants(task, lambda r: r.method == "mc_dropout", ref)
    others += rs.variants(task, lambda r: r.method == "last_layer", ref)
    others += rs.variants(task, lambda r: r.method in BAYESIAN_METHODS, ref)
    names = sorted({name for run in ref.runs for name in _record_sets(run)})
    sets = [s for name in names if (s := _shift_set(ref, others, name, panel)) is not None]
    if not sets:
        panel.missing.append(f"{_RECORDS} of the reference {rs.relative(ref.first.path)}")
        return []
    panel.runs += list(ref.runs) + [r for s in others for r in s.runs]
    return sets


# ----------------------------------------------------------------------------- shift.csv


def _eval_set(task: str, shift: _ShiftSet, part: str) -> str:
    return f"{task} (in distribution)" if part == "in_distribution" else shift.name


def _spread(values: Sequence[float]) -> dict:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return {"seed_sd": sd, "seed_min": float(np.min(values)), "seed_max": float(np.max(values))}


def _metric_rows(task: str, shift: _ShiftSet, part: str) -> list[dict]:
    """Accuracy, NLL and ECE of every model on one part's labelled questions."""
    labels = shift.labels[part]
    keep = labels >= 0
    if not keep.any():
        return []
    rows = []
    for name, per_seed in shift.models.items():
        seeds = sorted(per_seed)
        for metric in SHIFT_METRICS:
            f = METRIC_FUNCTIONS[metric]
            values = [
                float(np.mean([f(x[keep], labels[keep]) for x in per_seed[s].stacks[part]]))
                for s in seeds
            ]
            rows.append(
                {
                    "task": task,
                    "eval_set": _eval_set(task, shift, part),
                    "model": name,
                    "metric": metric,
                    "value": float(np.mean(values)),
                    "seeds": " ".join(map(str, seeds)),
                    "n_seeds": len(seeds),
                    **_spread(values),
                    "questions": int(keep.sum()),
                }
            )
    return rows


def _score_pairs(
    per_seed: dict[int, _Model], seeds: Sequence[int], score: str
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each seed's (in-distribution, OOD) scores; None when a seed's model lacks the score."""
    pairs = []
    for s in seeds:
        s_in, s_out = (per_seed[s].scores(part, score) for part in PARTS)
        if s_in is None or s_out is None:
            return None
        pairs.append((s_in, s_out))
    return pairs


def _auroc_rows(task: str, shift: _ShiftSet) -> list[dict]:
    """Every model's AUROC of telling the OOD set from the in-distribution questions."""
    rows = []
    for name, per_seed in shift.models.items():
        seeds = sorted(per_seed)
        for score in SHIFT_SCORES:
            pairs = _score_pairs(per_seed, seeds, score)
            if pairs is None:
                continue
            interval = auroc_interval(pairs)
            rows.append(
                {
                    "task": task,
                    "eval_set": shift.name,
                    "model": name,
                    "metric": f"auroc_{score}",
                    "value": interval.estimate,
                    "low": interval.low,
                    "high": interval.high,
                    "seeds": " ".join(map(str, seeds)),
                    "n_seeds": interval.n_seeds,
                    **_spread(interval.per_seed),
                    "questions": len(shift.ood_ids),
                    "in_questions": len(shift.in_ids),
                    "resamples": interval.n_resamples,
                }
            )
    return rows


def _fullest(sets: list[_ShiftSet]) -> _ShiftSet:
    """The set with the most (model, seed) records: its in-distribution questions stand for
    every set's (the same questions, scored once per run)."""
    return max(sets, key=lambda s: sum(len(seeds) for seeds in s.models.values()))


def _shift(rs: RunSet, task: str) -> Panel:
    panel = Panel()
    sets = _shift_sets(rs, task, panel)
    if sets:  # the in-distribution questions are the same for every set: shown once
        panel.rows += _metric_rows(task, _fullest(sets), "in_distribution")
    for shift in sets:
        panel.rows += _metric_rows(task, shift, "ood") + _auroc_rows(task, shift)
    return panel


# ----------------------------------------------------------------------------- differences


def _claims(shift: _ShiftSet) -> list[tuple[str, str, str]]:
    """(claim, A, B) of every difference the set's models allow."""
    n = shift.names
    claims = [
        (ENSEMBLE_GAIN_CLAIM, n["ensemble"], n["single"]),
        (ENSEMBLE_GAIN_CLAIM, n["ensemble + TS"], n["single + TS"]),
        (TS_CLAIM, n["ensemble + TS"], n["ensemble"]),
    ]
    others = [m for m in shift.models if m not in n.values()]
    claims += [(METHOD_CLAIM, n["ensemble"], m) for m in others]
    # Against the cheapest strong baseline, the ensemble with its fitted temperatures.
    claims += [(CALIBRATED_VERSUS_CLAIM, m, n["ensemble + TS"]) for m in others]
    for method in BAYESIAN_METHODS:  # a mixture of posteriors against one of them
        single = _names(0, method)["single"]
        for ens in (m for m in shift.models if m.startswith(f"{method} ens. (M=")):
            claims.append((ENSEMBLE_GAIN_CLAIM, ens, single + (" + TS" if "+ TS" in ens else "")))
    return [(c, a, b) for c, a, b in claims if a in shift.models and b in shift.models]


def _difference_rows(task: str, shift: _ShiftSet, part: str) -> list[dict]:
    labels = shift.labels[part]
    keep = labels >= 0
    rows = []
    for claim, a, b in _claims(shift):
        seeds = sorted(set(shift.models[a]) & set(shift.models[b]))
        found: list[tuple[str, Difference]] = []
        if keep.any():
            for metric in SHIFT_METRICS:
                x, z = ([shift.models[m][s].stacks[part][:, keep] for s in seeds] for m in (a, b))
                found.append((metric, paired_difference(x, z, labels[keep], metric)))
        for score in SHIFT_SCORES if part == "ood" else ():
            pairs = [_score_pairs(shift.models[m], seeds, score) for m in (a, b)]
            if pairs[0] is not None and pairs[1] is not None:
                found.append((f"auroc_{score}", auroc_difference(pairs[0], pairs[1])))
        eval_set = _eval_set(task, shift, part)
        for metric, d in found:
            row = difference_row(task, claim, metric, a, b, seeds, d)
            rows.append({**row, "eval_set": eval_set})
    return rows


def _shift_differences(rs: RunSet, task: str) -> Panel:
    panel = Panel()
    sets = _shift_sets(rs, task, panel)
    if sets:
        panel.rows += _difference_rows(task, _fullest(sets), "in_distribution")
    for shift in sets:
        panel.rows += _difference_rows(task, shift, "ood")
    return panel


# ----------------------------------------------------------------------------- the sections

SHIFT_SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        key="shift",
        title="Distribution shift: accuracy, NLL, ECE and OOD detection on every shifted set",
        look_for="Under shift every model should lose accuracy and calibration; the ensemble "
        "should keep a lower NLL and ECE than its members, and temperatures fitted in "
        "distribution may help less out of it. AUROC above 0.5: the score ranks the shifted "
        "questions as more uncertain than the in-distribution ones.",
        panel=_shift,
        csv="shift.csv",
        csv_if_rows=True,
        columns=SHIFT_COLUMNS,
    ),
    SectionSpec(
        key="shift-differences",
        title="Distribution shift: differences with 95% intervals",
        look_for="A − B on each eval set, shown when its 95% interval excludes 0, as in the "
        f"differences table: paired bootstrap over the set's questions ({DEFAULT_RESAMPLES} "
        "resamples, one draw for every seed; AUROC: the questions of both sets resampled).",
        panel=_shift_differences,
        csv="shift_differences.csv",
        csv_if_rows=True,
        columns=SHIFT_DIFFERENCE_COLUMNS,
    ),
)
