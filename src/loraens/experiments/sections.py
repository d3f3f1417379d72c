"""The report's sections: one declaration per paper figure or table, in :data:`SECTIONS`.

A :class:`SectionSpec` says what each task contributes (``panel``: the runs it picks from a
:class:`RunSet`, what it draws and what it lacks), how the figure is drawn (``draw``, from
:mod:`loraens.experiments.figures`), its caption and any CSV. Everything the sections share (the
loop over tasks, the notes saying what is missing, the provenance footer, saving the files) is
:func:`loraens.experiments.report.build_section`.

How runs are chosen (see :mod:`loraens.experiments.runs` for settings and the reference):

- Figures built from metrics average a setting's seeds; figures built from predictions
  (reliability, Fig. 1a) or saved log-probs (Fig. 6) use one run.
- Where a figure shows one strength of a regulariser (Fig. 1a, 3, 5) it is the one with the
  lowest final in-distribution ensemble NLL; Fig. 2 shows every strength. Fig. 8 shows the
  weight decay λ run on the most of A only, B only and both.
- The differences table (differences.csv) gives every claim a 95% interval
  (:mod:`loraens.evaluation.intervals`): it pairs runs by seed and only on identical eval
  questions, and uses the final epoch's unrounded log-probs where saved.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from loraens.config import OptimConfig
from loraens.decisions.selective import risk_coverage
from loraens.decisions.stored import read_decisions
from loraens.decisions.tables import DECISION_COLUMNS, decision_rows, variants
from loraens.decisions.temperature import Temperatures
from loraens.evaluation.intervals import (
    DEFAULT_RESAMPLES,
    Difference,
    diversity_difference,
    ensemble_minus_single,
    paired_difference,
)
from loraens.evaluation.metrics import ensemble_log_probs, reliability_bins, summarize
from loraens.evaluation.tables import METRICS
from loraens.experiments import figures
from loraens.experiments.figures import Arrow, Bar, ConfidenceSet, Series, family_color
from loraens.experiments.runs import (
    BAYESIAN_METHODS,
    RANDOMNESS_ORDER,
    FewShotRun,
    Run,
    RunSet,
    Setting,
    distinct_values,
    is_dropout_lora,
    is_plain_lora,
)
from loraens.experiments.size_ablation import (
    EpochPools,
    PredictionPool,
    ablate_epoch_pools,
    read_epoch_pools,
    read_prediction_pool,
    size_differences,
    sizes_for_pool,
)
from loraens.rundir import RunDir
from loraens.rundir.layout import (
    CALIBRATION_FILE,
    EVAL_LOG_PROBS_FILE,
    HOLDOUT_LOG_PROBS_FILE,
    PREDICTIONS_FILE,
)

__all__ = ["SECTIONS", "Panel", "SectionSpec"]

log = logging.getLogger(__name__)

EARLY_STOP_EPOCHS = (1, 2, 3)  # §4: early stopping after 1, 2 or 3 epochs
SIZE_DRAWS = 5  # §5.3: 5 random subsets per ensemble size
RELIABILITY_BINS = 10
# App. B / Fig. 8: where very large weight decay goes (family of the run's regulariser, legend).
DECAY_TARGETS = (("all-decay", "A and B"), ("B-decay", "B only"), ("A-decay", "A only"))
DECAY_METRICS = ("accuracy", "nll")  # the paper's Fig. 8 rows
_DEFAULT_DECAY = OptimConfig().weight_decay  # the unregularised default, not "very large"


@dataclass
class Panel:
    """What one task gives a section: something to draw (or not), and the runs behind it.

    ``runs`` and ``few_shot`` feed the figure's provenance footer, even when this task's panel
    is not drawn. ``missing`` names what the task lacks (the note says the figure is "drawn
    without" or "needs" it); ``notes`` are further advice, each a sentence of its own.
    """

    data: Any = None  # what ``draw`` gets for this task; None or empty: nothing to draw
    title: str | None = None  # the panel's name in the figure; None: the task
    runs: list[Run] = field(default_factory=list)
    few_shot: list[FewShotRun] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # the section's CSV rows from this task
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def page_notes(self, task: str) -> list[str]:
        """The notes the page shows for this task: what it lacks, then any advice."""
        lacks = [_lacking(bool(self.data), self.missing)] if self.missing else []
        return [f"{task}: {note}" for note in lacks + self.notes]


@dataclass(frozen=True)
class SectionSpec:
    """A paper figure or table: which runs each task contributes, how it is drawn, its caption.

    ``draw(panels, footer)`` gets the drawn tasks' ``Panel.data`` keyed by panel title. When
    ``image`` holds ``{task}`` each task gets a figure of its own, and ``{task}`` and ``{run}``
    (the first run of the task's panel) in ``caption`` are filled in. Without ``draw`` the
    section is a table: the ``csv`` rows shown on the page. Every caption ends in provenance.
    """

    key: str
    title: str
    look_for: str
    panel: Callable[[RunSet, str], Panel]
    draw: Callable[[Mapping[str, Any], str], Figure] | None = None
    image: str = ""  # the PNG's file name
    caption: str = ""
    csv: str = ""  # file name for the panels' rows (written even when empty)
    columns: tuple[str, ...] = ()
    csv_if_rows: bool = False  # write the CSV only when some task gives rows


def _lacking(drawn: bool, missing: Sequence[str]) -> str:
    """The note for what a task lacks: the figure was drawn without it, or needs it."""
    return f"{'drawn without' if drawn else 'needs'} {' and '.join(missing)}."


# ----------------------------------------------------------------------------- helpers


def _pool(run: Run | FewShotRun | None) -> PredictionPool | None:
    """A run's predictions restricted to labelled questions, or None when unusable."""
    if run is None or not run.has_predictions:
        return None
    try:
        pool = read_prediction_pool(run.path)
    except (OSError, ValueError, KeyError) as error:
        log.warning("cannot read predictions of %s: %s", run.path, error)
        return None
    keep = pool.labels >= 0
    if not keep.any():
        return None
    return PredictionPool(
        pool.member_log_probs[:, keep],
        pool.labels[keep],
        [i for i, k in zip(pool.ids, keep, strict=True) if k],
    )


def _ensemble_nll(s: Setting) -> float:
    return s.table("ensemble").get("nll", math.inf)


def _best_strength(rs: RunSet, task: str, ref: Setting | None, family: str) -> Setting | None:
    """Among the strengths run of a regulariser family, the one with the lowest ensemble NLL
    (the paper also picks λ per task); None when none has an NLL."""
    options = [
        s
        for s in rs.variants(task, is_plain_lora, ref)
        if s.first.family == family and "nll" in s.table("ensemble")
    ]
    return min(options, key=_ensemble_nll, default=None)


def _one_per_family(settings: list[Setting]) -> list[Setting]:
    """The strength with the lowest in-distribution ensemble NLL per regulariser family, so
    an epoch plot keeps one colour per family and stays readable."""
    by_family: dict[str, list[Setting]] = defaultdict(list)
    for s in settings:
        by_family[s.first.family].append(s)
    return [min(group, key=_ensemble_nll) for group in by_family.values()]


def _series(
    s: Setting, split: str, metrics: Sequence[str], color: str, label: str | None = None
) -> list[Series]:
    """The ensemble (solid) and single-member mean (dashed) lines of one setting, named
    ``label`` in the legend (default: the setting's label)."""
    out = []
    for which in ("ensemble", "single"):
        curves = {m: s.curve(split, which, m) for m in metrics}
        curves = {m: c for m, c in curves.items() if c[0]}
        if not curves:
            continue
        epochs = next(iter(curves.values()))[0]
        # A metric evaluated at other epochs (only in hand-edited files) is left out, not shifted.
        values = {m: v for m, (e, v) in curves.items() if e == epochs}
        out.append(Series(label or s.first.label, color, epochs, values, dashed=which == "single"))
    return out


def _missing(*needs: tuple[str, object]) -> list[str]:
    """The names of the (name, found) inputs that were not found."""
    return [name for name, found in needs if not found]


# ----------------------------------------------------------------------------- reliability


def _reliability(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    pool = _pool(ref.first if ref else None)
    if pool is None or ref is None:
        return Panel(
            missing=["an unregularised LoRA run (method lora, no dropout) with predictions.jsonl"]
        )
    lp, y = pool.member_log_probs, pool.labels
    models = [
        ("single member (member 0)", lp[0]),
        (f"ensemble (M={lp.shape[0]})", ensemble_log_probs(lp)),
    ]
    return Panel(
        [(name, reliability_bins(x, y, RELIABILITY_BINS), summarize(x, y)) for name, x in models],
        runs=[ref.first],
    )


def _draw_reliability(panels: Mapping[str, Any], footer: str) -> Figure:
    ((task, models),) = panels.items()  # a figure per task
    return figures.reliability_figure(task, models, footer)


# ----------------------------------------------------------------------------- Fig. 1a


def _confidence_set(
    label: str, color: str, log_probs: np.ndarray, labels: np.ndarray, dashed: bool = False
) -> ConfidenceSet:
    """The confidences on wrong answers of one model, with its accuracy and ECE."""
    stats = summarize(log_probs, labels)
    wrong = _wrong_confidence(log_probs, labels)
    return ConfidenceSet(label, color, wrong, stats["accuracy"], stats["ece"], dashed)


def _wrong_confidence(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    wrong = log_probs.argmax(axis=1) != labels
    return np.exp(log_probs.max(axis=1))[wrong]


def _fig_1a(rs: RunSet, task: str) -> Panel:
    sets, panel = [], Panel()
    few = rs.few_shot_for(task)
    pool = _pool(few)
    if pool is not None and few is not None:
        lp = pool.member_log_probs
        conf = np.concatenate([_wrong_confidence(d, pool.labels) for d in lp])
        # Headline numbers: the mean over draws, as the paper reports few-shot.
        per_draw = [summarize(d, pool.labels) for d in lp]
        acc = float(np.mean([d["accuracy"] for d in per_draw]))
        cal = float(np.mean([d["ece"] for d in per_draw]))
        sets.append(ConfidenceSet(f"few-shot ({lp.shape[0]} draws)", "#9467bd", conf, acc, cal))
        panel.few_shot.append(few)
    else:
        panel.missing.append("a few-shot run with predictions.jsonl")
    ref = rs.reference(task)
    pool = _pool(ref.first if ref else None)
    if pool is not None and ref is not None:
        sets.append(_confidence_set("LoRA (M=1)", "#1f77b4", pool.member_log_probs[0], pool.labels))
        panel.runs.append(ref.first)
    else:
        panel.missing.append("an unregularised LoRA run with predictions")
    # The paper's regularised ensemble: weight decay on B if run, else KL.
    reg = _best_strength(rs, task, ref, "B-decay") or _best_strength(rs, task, ref, "KL")
    pool = _pool(reg.first if reg else None)
    if pool is not None and reg is not None:
        sets.append(
            _confidence_set(
                f"reg. LoRA ens. (M={pool.member_log_probs.shape[0]}, {reg.first.regulariser})",
                "#ff7f0e",
                ensemble_log_probs(pool.member_log_probs),
                pool.labels,
                dashed=True,
            )
        )
        panel.runs.append(reg.first)
    else:
        panel.missing.append("a LoRA run with weight decay on B or a KL penalty")
    panel.data = sets if len(sets) >= 2 else None
    return panel


# ----------------------------------------------------------------------------- Fig. 2


def _fig_2(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    arrows, panel = [], Panel()
    for s in rs.variants(task, is_plain_lora, ref):
        single, ens = s.table("single"), s.table("ensemble")
        if {"accuracy", "ece"} <= set(single) & set(ens):
            text = "" if s.first.family == "none" else s.first.regulariser.split(" ", 1)[-1]
            arrows.append(
                Arrow(
                    s.first.family,
                    s.first.strength,
                    text,
                    (single["accuracy"], single["ece"]),
                    (ens["accuracy"], ens["ece"]),
                    s.first.members,
                )
            )
            panel.runs += s.runs
    if ref is not None:
        arrows += _early_stop_arrows(ref)
    panel.data = arrows
    if not arrows:
        panel.missing.append("at least one finished LoRA ensemble run")
    if ref is not None and len({a.family for a in arrows}) < 2:
        panel.notes.append(
            "only the unregularised run; add KL (optim.kl_beta) or B-decay "
            "(optim.decay_target=B) runs to compare regularisers."
        )
    return panel


def _early_stop_arrows(ref: Setting) -> list[Arrow]:
    arrows = []
    curves = {
        (which, key): dict(zip(*ref.curve("eval", which, key), strict=True))
        for which in ("single", "ensemble")
        for key in ("accuracy", "ece")
    }
    for epoch in EARLY_STOP_EPOCHS:
        if epoch >= ref.first.epochs or any(epoch not in c for c in curves.values()):
            continue
        arrows.append(
            Arrow(
                "early stop",
                float(epoch),
                f"ep {epoch}",
                (curves["single", "accuracy"][epoch], curves["single", "ece"][epoch]),
                (curves["ensemble", "accuracy"][epoch], curves["ensemble", "ece"][epoch]),
            )
        )
    return arrows


# ----------------------------------------------------------------------------- Fig. 3


def _fig_3(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    lines = _series(ref, "eval", METRICS[:3], family_color("none")) if ref else []
    if not lines or ref is None:
        return Panel(missing=["an unregularised LoRA run with per-epoch eval rows"])
    panel = Panel(lines, runs=list(ref.runs))
    best = _best_strength(rs, task, ref, "B-decay")
    if best is not None:
        # Legend by family (one colour), the strength chosen per task in the panel title.
        panel.data += _series(best, "eval", METRICS[:3], family_color("B-decay"), "B-decay")
        panel.runs += best.runs
        panel.title = f"{task} ({best.first.regulariser})"
    else:
        panel.missing.append("a B-decay run (optim.decay_target=B)")
    return panel


# ----------------------------------------------------------------------------- Table 1


def _table_1(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    last = rs.variants(task, lambda r: r.method == "last_layer", ref)
    if ref is None or not last:
        missing = _missing(("a last_layer run", last), ("a LoRA run", ref is not None))
        return Panel(
            notes=[
                "Table 1 needs a last_layer run and a LoRA run on the same task "
                f"(missing: {', '.join(missing)})."
            ]
        )
    return Panel(
        rows=[_table_row(task, "LoRA ens.", ref), _table_row(task, "last-layer ens.", last[0])]
    )


def _table_row(task: str, name: str, s: Setting) -> dict:
    row = {
        "task": task,
        "method": name,
        "members": s.first.members,
        "seeds": " ".join(map(str, s.seeds)),
    }
    for which in ("ensemble", "single"):
        values = s.table(which)
        row |= {f"{which}_{m}": values.get(m) for m in METRICS}
    return row


# ----------------------------------------------------------------------------- Fig. 4

_DROPOUT_COLORS = ("#8c564b", "#17becf", "#e377c2", "#bcbd22")


def _fig_4(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    mc = rs.variants(task, lambda r: r.method == "mc_dropout", ref)
    ens = rs.variants(task, is_dropout_lora, ref)
    panel = Panel([])
    for i, s in enumerate(mc + ens):
        panel.data += _series(s, "eval", METRICS[:3], _DROPOUT_COLORS[i % len(_DROPOUT_COLORS)])
        panel.runs += s.runs
    if not mc or not ens:
        what = _missing(("an mc_dropout run", mc), ("a LoRA run with lora.dropout>0", ens))
        panel.notes.append("Fig. 4 " + _lacking(bool(panel.data), what))
    return panel


# ----------------------------------------------------------------------------- Fig. 5


def _fig_5(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    settings = _one_per_family(
        [
            s
            for s in rs.variants(task, is_plain_lora, ref)
            if any(r.get("split") == "ood" for r in s.first.rows)
        ]
    )
    panel = Panel([])
    for s in settings:
        # Legend by family (one colour); each row's chosen strengths go in its title.
        color, family = family_color(s.first.family), s.first.family
        panel.data += _merge_series(
            _series(s, "ood", METRICS[:3], color, family),
            _series(s, "ood_detection", ("neg_max_prob",), color, family),
        )
        panel.runs += s.runs
    if panel.data:
        ood = distinct_values(s.first.ood_task for s in settings)
        strengths = [
            s.first.regulariser.split(" ", 1)[-1] for s in settings if s.first.family != "none"
        ]
        panel.title = f"{task} → {ood}" + (f" ({', '.join(strengths)})" if strengths else "")
    elif any(r.task == task for r in rs.train):
        panel.missing.append("LoRA runs trained with data.ood_task (per-epoch 'ood' rows)")
    return panel


def _merge_series(metrics: list[Series], detection: list[Series]) -> list[Series]:
    """Join OOD metrics and AUROC lines of the same (setting, single/ensemble)."""
    out = []
    for m in metrics:
        d = next((d for d in detection if d.dashed == m.dashed), None)
        if d is not None and list(d.epochs) == list(m.epochs):
            m = Series(m.label, m.color, m.epochs, {**m.values, **d.values}, m.dashed)
        out.append(m)
    return out


# ----------------------------------------------------------------------------- Fig. 6


def _epoch_pools(run: Run) -> EpochPools | None:
    """A run's per-epoch pools (or final predictions) on labelled questions; None if unusable."""
    try:
        pools = read_epoch_pools(run.path)
    except (OSError, ValueError, KeyError) as error:
        log.warning("cannot read the eval log-probs of %s: %s", run.path, error)
        return None
    keep = pools.labels >= 0
    if not keep.any():
        return None
    return EpochPools(
        pools.epochs, pools.member_log_probs[:, :, keep], pools.labels[keep], pools.source
    )


def _fig_6(rs: RunSet, task: str) -> Panel:
    lora = [
        r
        for r in rs.train
        if r.task == task and r.method == "lora" and (r.has_eval_log_probs or r.has_predictions)
    ]
    if not lora:
        return Panel(missing=[f"a LoRA run with {EVAL_LOG_PROBS_FILE} or {PREDICTIONS_FILE}"])
    # The biggest pool; among equals one saved per epoch, then the unregularised plain setting.
    run = max(
        lora,
        key=lambda r: (
            r.members,
            r.has_eval_log_probs,
            is_plain_lora(r) and r.family == "none",
            -r.seed,
        ),
    )
    pools = _epoch_pools(run) if run.members >= 2 else None
    if pools is None or pools.member_log_probs.shape[1] < 2:
        return Panel(missing=["a LoRA run with at least 2 members"])
    pool_size = pools.member_log_probs.shape[1]
    ablation = ablate_epoch_pools(pools, sizes_for_pool(pool_size), SIZE_DRAWS)
    rows = [
        {
            "task": task,
            "run": str(run.path),
            "source": row["source"],
            "epoch": row["epoch"],
            "pool_size": row["pool_size"],
            "size": row["size"],
            "draws": row["draws"],
            **{f"mean_{m}": row["mean"][m] for m in METRICS},
            **{f"std_{m}": row["std"][m] for m in METRICS},
        }
        for row in ablation
    ]
    panel = Panel(ablation, runs=[run], rows=rows)
    if not pools.per_epoch:
        panel.title = f"{task}: final epoch only, rounded"
        panel.notes.append(
            f"Fig. 6 shows the final epoch only, from the rounded {PREDICTIONS_FILE}: "
            f"{rs.relative(run.path)} has no {EVAL_LOG_PROBS_FILE} (trained by an older "
            "loraens; retrain it for the per-epoch curves)."
        )
    return panel


# ----------------------------------------------------------------------------- Fig. 7


def _fig_7(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    settings = rs.variants(task, lambda r: r.method == "lora" and r.dropout == 0, ref)
    by_reg: dict[str, list[Setting]] = defaultdict(list)
    for s in settings:
        by_reg[s.first.regulariser].append(s)
    panel = Panel([])
    for reg, group in by_reg.items():
        if len({s.first.randomness for s in group}) < 2:
            continue
        group.sort(key=lambda s: RANDOMNESS_ORDER.index(s.first.randomness))
        for s in group:
            mean, std = s.table("ensemble"), s.table_std("ensemble")
            panel.data.append(
                Bar(
                    s.first.randomness,
                    reg,
                    family_color(s.first.family),
                    {m: (mean[m], std[m]) for m in METRICS[:3] if m in mean},
                    {m: v for m, v in s.table("single").items() if m in METRICS[:3]},
                )
            )
            panel.runs += s.runs
    if not panel.data and any(r.task == task and r.method == "lora" for r in rs.train):
        panel.missing.append(
            "LoRA runs differing only in randomness (ensemble.vary_init / "
            "ensemble.vary_data_order), e.g. init+data and init only or data only"
        )
    return panel


# ----------------------------------------------------------------------------- Fig. 8


def _fig_8(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    names = dict(DECAY_TARGETS)
    # {λ: {family: setting}} over the very large decays on A, B or both (plain LoRA runs).
    by_strength: dict[float, dict[str, Setting]] = defaultdict(dict)
    for s in rs.variants(task, is_plain_lora, ref):
        strength = s.first.strength
        if s.first.family in names and strength is not None and strength > _DEFAULT_DECAY:
            by_strength[strength][s.first.family] = s
    wanted = (
        "LoRA runs with very large weight decay on A only (optim.decay_target=A), on B only "
        "(B) and on both (all), at one strength"
    )
    if not by_strength:
        has_lora = any(r.task == task and r.method == "lora" for r in rs.train)
        return Panel(missing=[wanted] if has_lora else [])
    # The strength run with the most targets (the paper: one λ per task, 1e2 on cqa, 1e3 on
    # MMLU), then the one whose best target has the lowest final ensemble NLL.
    strength, chosen = max(
        by_strength.items(),
        key=lambda item: (len(item[1]), -min(_ensemble_nll(s) for s in item[1].values())),
    )
    # The family is "<decay_target>-decay": its prefix is the config value to set.
    absent = [
        f"{name} (optim.decay_target={family.removesuffix('-decay')})"
        for family, name in DECAY_TARGETS
        if family not in chosen
    ]
    panel = Panel([], title=f"{task} (λ={strength:g})")
    if absent:
        panel.missing.append(f"runs with weight decay λ={strength:g} on " + " and ".join(absent))
    if len(chosen) < 2:  # one target alone compares nothing
        return panel
    for family, name in DECAY_TARGETS:
        if (setting := chosen.get(family)) is not None:
            panel.data += _series(setting, "eval", DECAY_METRICS, family_color(family), name)
            panel.runs += setting.runs
            panel.rows += _decay_rows(task, name, strength, setting)
    return panel


def _decay_rows(task: str, name: str, strength: float, s: Setting) -> list[dict]:
    """Fig. 8's numbers: per evaluated epoch, ensemble and single-mean accuracy and NLL."""
    curves = {
        (which, m): dict(zip(*s.curve("eval", which, m), strict=True))
        for which in ("ensemble", "single")
        for m in DECAY_METRICS
    }
    epochs = sorted(set.intersection(*(set(c) for c in curves.values())))
    return [
        {
            "task": task,
            "decay_on": name,
            "weight_decay": strength,
            "seeds": " ".join(map(str, s.seeds)),
            "epoch": e,
            **{f"{which}_{m}": curves[which, m][e] for which, m in curves},
        }
        for e in epochs
    ]


# ----------------------------------------------------------------------------- decisions

DECISION_COVERAGE = 0.9  # target of the conformal sets in the table


def _calibrated_run(rs: RunSet, task: str) -> Run | None:
    """The reference run when it is calibrated, else the first calibrated LoRA run."""
    ref = rs.reference(task)
    runs = [r for r in rs.train if r.task == task and r.method != "last_layer"]
    runs.sort(key=lambda r: (ref is None or r not in ref.runs, r.seed, str(r.path)))
    return next((r for r in runs if r.is_calibrated and r.has_eval_log_probs), None)


def _decisions(rs: RunSet, task: str) -> Panel:
    run = _calibrated_run(rs, task)
    if run is None:
        return Panel(
            missing=[
                f"a LoRA run trained with data.calibrate (its {CALIBRATION_FILE}, "
                f"{HOLDOUT_LOG_PROBS_FILE} and {EVAL_LOG_PROBS_FILE})"
            ]
        )
    try:
        decided = read_decisions(run.path)
        evals = RunDir(run.path).read_eval_log_probs()
    except (OSError, ValueError) as error:
        log.warning("cannot read the decision files of %s: %s", run.path, error)
        return Panel(runs=[run], missing=["readable calibration files"])
    # The adapters kept (the best epoch under patience), else the last evaluated epoch.
    kept = run.summary.epoch_kept
    epoch = kept if kept is not None and kept in evals.epochs else evals.epochs[-1]
    lp = evals.at(epoch)
    labels = np.asarray(evals.labels)
    curves = {}
    for model, arrays in variants(lp, decided.temperatures).items():
        x = arrays[0]  # single models: member 0, as in the reliability diagrams
        correct = x.argmax(axis=1) == labels
        curve = risk_coverage(np.exp(x.max(axis=1)), correct)
        area = float(np.sum(curve.risk * np.diff(np.concatenate([[0.0], curve.coverage]))))
        curves[model] = (curve.coverage, curve.risk, area)
    rows = decision_rows(
        lp,
        labels,
        decided.temperatures,
        decided.holdout_log_probs,
        decided.holdout_labels,
        coverage=DECISION_COVERAGE,
    )
    csv_rows = [{"task": task, "run": rs.relative(run.path), "epoch": epoch, **row} for row in rows]
    return Panel(curves, runs=[run], rows=csv_rows)


def _ood_decisions(rs: RunSet, task: str) -> Panel:
    """Every OOD evaluation a calibrated run of the task carries (experiments' ood_eval)."""
    rows, runs = [], []
    for run in rs.train:
        if run.task != task:
            continue
        for path in RunDir(run.path).ood_results():
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                log.warning("cannot read %s: %s", path, error)
                continue
            runs.append(run)
            auroc = result.get("auroc", {})
            detection = {
                "single (mean)": auroc.get("single (mean)", {}),
                "ensemble": auroc.get("ensemble", {}),
                "ensemble + TS": auroc.get("ensemble + TS", {}),
            }
            for model, values in result.get("ood", {}).items():
                if model == "single (std)":
                    continue
                key = "ensemble" if model.startswith("ensemble (") else model
                rows.append(
                    {
                        "task": task,
                        "ood_set": result.get("ood_set", path.stem),
                        "run": rs.relative(run.path),
                        "model": model,
                        **{m: values.get(m) for m in ("accuracy", "nll", "ece")},
                        "auroc": detection.get(key, {}).get("neg_max_prob"),
                    }
                )
    if not rows:
        return Panel(missing=["runs with OOD evaluations (an experiment's ood_eval)"])
    return Panel(None, runs=sorted(set(runs), key=lambda r: str(r.path)), rows=rows)


# ----------------------------------------------------------------------------- differences

# ensemble − mean single member; wrong_confidence: mean confidence on wrong answers (Fig. 1a)
ENSEMBLE_GAIN_METRICS = ("nll", "ece", "accuracy", "brier", "wrong_confidence")
VERSUS_METRICS = ("nll", "ece", "accuracy")  # another method − the reference ensemble
# the mean single member, last − first evaluated epoch
OVERCONFIDENCE_METRICS = ("nll", "ece", "wrong_confidence")
# how much the members differ: another ensemble's members − the reference's (no labels needed)
DIVERSITY_MEASURES = ("mutual_information", "disagreement")
ENSEMBLE_GAIN_CLAIM = "ensemble − mean single member"
VERSUS_CLAIM = "method − reference ensemble"
# The bar a Bayesian method has to clear: the reference ensemble with its fitted temperatures.
CALIBRATED_VERSUS_CLAIM = "method − reference ensemble + TS"
DIVERSITY_CLAIM = "members' diversity: method − reference"
OVERCONFIDENCE_CLAIM = "over-confidence: last − first epoch"
# Fig. 6 with intervals: the reference's random size-M subsets against fewer members.
SIZE_CLAIM = "ensemble size: M members − fewer"
DIFFERENCE_COLUMNS = (
    "task", "claim", "metric", "a", "b", "a_value", "b_value", "difference", "low", "high",
    "seeds", "n_seeds", "seed_mean", "seed_sd", "seed_min", "seed_max", "questions",
    "resamples", "verdict",
)  # fmt: skip


@dataclass
class _Final:
    """One run's scored eval questions: (M, N, K) log-probs (members, passes or few-shot
    draws) on the labelled questions, and their labels."""

    member_log_probs: np.ndarray
    labels: np.ndarray


def _final(run: Run | FewShotRun) -> _Final | None:
    """The final eval log-probs: the kept epoch's unrounded ones when saved per epoch (as the
    decisions section reads them), else predictions.jsonl (few-shot, older runs)."""
    evals = run.eval_log_probs if isinstance(run, Run) else None
    if evals is not None and isinstance(run, Run):
        kept = run.summary.epoch_kept
        lp = evals.at(kept if kept in evals.epochs else evals.epochs[-1])
        keep = np.asarray(evals.labels) >= 0
        if keep.any():
            return _Final(lp[:, keep], np.asarray(evals.labels)[keep])
    pool = _pool(run)
    return None if pool is None else _Final(pool.member_log_probs, pool.labels)


def difference_row(
    task: str, claim: str, metric: str, a: str, b: str, seeds: Sequence[int], d: Difference
) -> dict:
    """One line of differences.csv: the claim A − B of ``metric`` and its interval."""
    return {
        "task": task,
        "claim": claim,
        "metric": metric,
        "a": a,
        "b": b,
        "a_value": d.a,
        "b_value": d.b,
        "difference": d.estimate,
        "low": d.low,
        "high": d.high,
        "seeds": " ".join(map(str, seeds)),
        "n_seeds": d.n_seeds,
        "seed_mean": d.seed_mean,
        "seed_sd": d.seed_sd,
        "seed_min": d.seed_min,
        "seed_max": d.seed_max,
        "questions": d.n_questions,
        "resamples": d.n_resamples,
        "verdict": "shown" if d.shown else "not shown",
    }


@dataclass
class _Reference:
    """The reference's seeds that share one set of eval questions, at the final epoch."""

    task: str
    runs: dict[int, Run]
    finals: dict[int, _Final]

    @property
    def labels(self) -> np.ndarray:
        return next(iter(self.finals.values())).labels

    @property
    def name(self) -> str:
        members = next(iter(self.finals.values())).member_log_probs.shape[0]
        return f"LoRA ens. (M={members})"

    def versus(
        self,
        name: str,
        runs: Sequence[Run | FewShotRun],
        model: Callable[[Run | FewShotRun, _Final], np.ndarray | None],
        panel: Panel,
        own_gain: bool = False,
        calibrated: bool = False,
    ) -> None:
        """Rows of ``name`` − the reference ensemble, over the seeds both have on the same
        questions; ``model`` turns a run's final log-probs into the compared model's (N, K)
        log-probs or (J, N, K) stack (None: not available). With ``own_gain``, also the
        compared ensemble minus its own mean member (Fig. 2's arrow, for every setting) and
        its members' diversity minus the reference members'. With ``calibrated``, against the
        reference ensemble + TS instead, on the seeds whose temperatures were fitted."""
        mine: dict[int, np.ndarray] = {}
        members: dict[int, np.ndarray] = {}
        skipped = []
        for run in runs:
            if run.seed not in self.finals or run.seed in mine:
                continue
            # The reference's own runs (temperature scaling) are read once.
            final = self.finals[run.seed] if self.runs.get(run.seed) is run else _final(run)
            if final is None:
                skipped.append(f"seed {run.seed} has no readable final eval log-probs")
            elif not np.array_equal(final.labels, self.labels):
                skipped.append(f"seed {run.seed} was scored on other eval questions")
            elif (scored := model(run, final)) is not None:
                mine[run.seed] = scored
                members[run.seed] = final.member_log_probs
        if skipped or not mine:
            why = "; ".join(skipped) or f"no run with the reference's seed(s) {sorted(self.finals)}"
            panel.notes.append(f"{name} − {self.name}: {why}.")
        if not mine:
            return
        baselines = self._scaled(mine) if calibrated else self._plain(mine)
        seeds = sorted(baselines)
        if not seeds:
            panel.notes.append(f"{name} − {self.name} + TS: the reference has no temperatures.")
            return
        claim = CALIBRATED_VERSUS_CLAIM if calibrated else VERSUS_CLAIM
        b = f"{self.name} + TS" if calibrated else self.name
        for metric in VERSUS_METRICS:
            d = paired_difference(
                [mine[s] for s in seeds], [baselines[s] for s in seeds], self.labels, metric
            )
            panel.rows.append(difference_row(self.task, claim, metric, name, b, seeds, d))
        if own_gain:
            stacks = [members[s] for s in seeds]
            for metric in ENSEMBLE_GAIN_METRICS:
                d = ensemble_minus_single(stacks, self.labels, metric)
                b = "its mean single member"
                row = difference_row(self.task, ENSEMBLE_GAIN_CLAIM, metric, name, b, seeds, d)
                panel.rows.append(row)
            references = [self.finals[s].member_log_probs for s in seeds]
            for measure in DIVERSITY_MEASURES:
                d = diversity_difference(stacks, references, measure)
                b = self.name  # its members against the reference's
                row = difference_row(self.task, DIVERSITY_CLAIM, measure, name, b, seeds, d)
                panel.rows.append(row)
        panel.runs += [r for r in runs if isinstance(r, Run) and r.seed in mine]
        panel.few_shot += [r for r in runs if isinstance(r, FewShotRun) and r.seed in mine]

    def _plain(self, seeds: Mapping[int, Any]) -> dict[int, np.ndarray]:
        return {s: ensemble_log_probs(self.finals[s].member_log_probs) for s in seeds}

    def _scaled(self, seeds: Mapping[int, Any]) -> dict[int, np.ndarray]:
        """The reference ensemble + TS of those ``seeds`` whose temperatures were fitted."""
        scaled = {s: _temperature_scaled(self.runs[s], self.finals[s]) for s in seeds}
        return {s: lp for s, lp in scaled.items() if lp is not None}


def _reference_finals(ref: Setting, task: str, panel: Panel) -> _Reference | None:
    runs: dict[int, Run] = {}
    finals: dict[int, _Final] = {}
    for run in ref.runs:
        if run.seed in finals:
            continue  # a second run of one seed: the first is the reference
        final = _final(run)
        if final is None:
            panel.notes.append(
                f"seed {run.seed} of the reference has no readable final eval log-probs."
            )
        elif finals and not np.array_equal(final.labels, next(iter(finals.values())).labels):
            panel.notes.append(
                f"seed {run.seed} of the reference was scored on other eval questions than "
                f"seed {next(iter(finals))}; left out."
            )
        else:
            runs[run.seed], finals[run.seed] = run, final
    return _Reference(task, runs, finals) if finals else None


def _ensemble_gain_rows(ref: _Reference) -> list[dict]:
    seeds = sorted(ref.finals)
    members = [ref.finals[s].member_log_probs for s in seeds]
    return [
        difference_row(
            ref.task,
            ENSEMBLE_GAIN_CLAIM,
            metric,
            ref.name,
            "mean single member",
            seeds,
            ensemble_minus_single(members, ref.labels, metric),
        )
        for metric in ENSEMBLE_GAIN_METRICS
    ]


def _size_rows(ref: _Reference) -> list[dict]:
    """Each size the reference's pool allows (M = 1, the paper's 3, 5, 10, 15 and the whole
    pool, as Fig. 6) against the mean single member and the next smaller size."""
    seeds = sorted(ref.finals)
    pools = [ref.finals[s].member_log_probs for s in seeds]
    pool_size = pools[0].shape[0]
    if pool_size < 3:  # M = 2 against one member is the ensemble's own gain row
        return []

    def name(m: int) -> str:
        if m == 1:
            return "mean single member"
        if m == pool_size:
            return ref.name
        return f"LoRA ens. (M={m}, mean of {SIZE_DRAWS} subsets of {pool_size})"

    return [
        difference_row(
            ref.task, SIZE_CLAIM, d.metric, name(d.size), name(d.versus), seeds, d.difference
        )
        for d in size_differences(pools, ref.labels, sizes_for_pool(pool_size), SIZE_DRAWS)
    ]


def _calibrated_gain_rows(ref: _Reference) -> list[dict]:
    """The temperature-scaled ensemble minus its temperature-scaled members (each with its own
    T): what ensembling adds once every model is calibrated on the hold-out."""
    scaled: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for seed, run in ref.runs.items():
        final = ref.finals[seed]
        temps = _temperatures(run, final) if run.is_calibrated else None
        if temps is not None:
            members = final.member_log_probs
            scaled[seed] = (temps.ensemble_scaled(members), temps.members_scaled(members))
    seeds = sorted(scaled)
    if not seeds:
        return []
    return [
        difference_row(
            ref.task,
            ENSEMBLE_GAIN_CLAIM,
            metric,
            f"{ref.name} + TS",
            "mean single member + TS",
            seeds,
            paired_difference(
                [scaled[s][0] for s in seeds], [scaled[s][1] for s in seeds], ref.labels, metric
            ),
        )
        for metric in ENSEMBLE_GAIN_METRICS
    ]


def _overconfidence_rows(ref: _Reference, panel: Panel) -> list[dict]:
    """The mean single member's NLL and ECE at the last evaluated epoch minus the first."""
    last: dict[int, np.ndarray] = {}
    first: dict[int, np.ndarray] = {}
    epochs: dict[int, tuple[int, int]] = {}
    for seed, run in ref.runs.items():
        evals = run.eval_log_probs
        if evals is None or len(evals.epochs) < 2:
            continue
        keep = np.asarray(evals.labels) >= 0
        if not np.array_equal(np.asarray(evals.labels)[keep], ref.labels):
            continue  # another eval set than the final one: not comparable across seeds
        first[seed] = evals.member_log_probs[0][:, keep]
        last[seed] = evals.member_log_probs[-1][:, keep]
        epochs[seed] = (evals.epochs[0], evals.epochs[-1])
    if not last:
        panel.notes.append(
            f"over-confidence over training needs the reference's {EVAL_LOG_PROBS_FILE} "
            "with at least two evaluated epochs."
        )
        return []
    seeds = sorted(last)
    a = f"mean single member, epoch {distinct_values(epochs[s][1] for s in seeds)}"
    b = f"mean single member, epoch {distinct_values(epochs[s][0] for s in seeds)}"
    return [
        difference_row(
            ref.task,
            OVERCONFIDENCE_CLAIM,
            metric,
            a,
            b,
            seeds,
            paired_difference(
                [last[s] for s in seeds], [first[s] for s in seeds], ref.labels, metric
            ),
        )
        for metric in OVERCONFIDENCE_METRICS
    ]


def _temperatures(run: Run | FewShotRun, final: _Final) -> Temperatures | None:
    """The run's fitted temperatures, when they fit its final members (None otherwise)."""
    try:
        temps = read_decisions(run.path).temperatures
    except (OSError, ValueError) as error:
        log.warning("cannot read the calibration of %s: %s", run.path, error)
        return None
    if temps is None or len(temps.members) != final.member_log_probs.shape[0]:
        return None
    return temps


def _temperature_scaled(run: Run | FewShotRun, final: _Final) -> np.ndarray | None:
    temps = _temperatures(run, final)
    return None if temps is None else temps.ensemble_scaled(final.member_log_probs)


def _members(run: Run | FewShotRun, final: _Final) -> np.ndarray:
    """(M, N, K): compared as its mean single member (few-shot: the mean over its draws)."""
    return final.member_log_probs


def _members_scaled(run: Run | FewShotRun, final: _Final) -> np.ndarray | None:
    temps = _temperatures(run, final)
    return None if temps is None else temps.members_scaled(final.member_log_probs)


def _early_stop_epochs(ref: _Reference) -> list[int]:
    """Epochs before the final one that every seed of the reference evaluated (at most 3, the
    paper's early-stopping budgets)."""
    common: set[int] | None = None
    for run in ref.runs.values():
        evals = run.eval_log_probs
        epochs = set(evals.epochs[:-1]) if evals is not None else set()
        common = epochs if common is None else common & epochs
    return sorted(common or set())[:3]


def _stopped_after(epoch: int) -> Callable[[Run | FewShotRun, _Final], np.ndarray | None]:
    def ensemble_at(run: Run | FewShotRun, final: _Final) -> np.ndarray | None:
        evals = run.eval_log_probs if isinstance(run, Run) else None
        if evals is None or epoch not in evals.epochs:
            return None
        keep = np.asarray(evals.labels) >= 0
        if not np.array_equal(np.asarray(evals.labels)[keep], final.labels):
            return None
        return ensemble_log_probs(evals.at(epoch)[:, keep])

    return ensemble_at


def _differences(rs: RunSet, task: str) -> Panel:
    ref = rs.reference(task)
    if ref is None:
        return Panel(missing=["an unregularised LoRA run (method lora, no dropout)"])
    panel = Panel(runs=list(ref.runs))
    reference = _reference_finals(ref, task, panel)
    if reference is None:
        panel.missing.append(
            f"the reference's final eval log-probs ({PREDICTIONS_FILE} or {EVAL_LOG_PROBS_FILE})"
        )
        return panel
    panel.rows += _ensemble_gain_rows(reference)
    panel.rows += _size_rows(reference)

    def ensemble(run: Run | FewShotRun, final: _Final) -> np.ndarray:
        return ensemble_log_probs(final.member_log_probs)

    # One strength per regulariser family (the lowest ensemble NLL, as in Fig. 1a, 3 and 5).
    regularised = [s for s in rs.variants(task, is_plain_lora, ref) if s.first.family != "none"]
    others = _one_per_family(regularised) if regularised else []
    others += rs.variants(task, lambda r: r.method == "mc_dropout", ref)
    others += rs.variants(task, lambda r: is_dropout_lora(r) and r.family == "none", ref)
    others += rs.variants(task, lambda r: r.method == "last_layer", ref)
    # Posteriors over the reference's members, and BLoB: a mixture ("ens.") of M of them.
    bayesian = rs.variants(task, lambda r: r.method in BAYESIAN_METHODS, ref)
    for s in others + bayesian:
        kind = " ens." if s in bayesian else ""
        name = f"{s.first.label}{kind} (M={s.first.members})"
        reference.versus(name, s.runs, ensemble, panel, own_gain=True)
    few = [f for f in rs.few_shot if f.task == task and f.has_predictions]
    if few:
        name = f"few-shot k={few[0].result.k} (mean of {few[0].result.draws} draws)"
        reference.versus(name, few, _members, panel)  # the mean over draws, as the paper
    # Early stopping needs no run of its own: with a constant learning rate, stopping after
    # epoch e gives the reference's epoch-e members (as Fig. 2's early-stop arrows read them).
    for epoch in _early_stop_epochs(reference):
        name = f"{reference.name} stopped after epoch {epoch}"
        reference.versus(name, list(reference.runs.values()), _stopped_after(epoch), panel)
    calibrated = [r for r in reference.runs.values() if r.is_calibrated]
    if calibrated:
        reference.versus(f"{reference.name} + TS", calibrated, _temperature_scaled, panel)
        panel.rows += _calibrated_gain_rows(reference)
        for s in bayesian:  # one member and the mixture, each with and without its own T
            scaled = [r for r in s.runs if r.is_calibrated]
            for name, plain, with_ts in (
                (f"{s.first.label} (M=1)", _members, _members_scaled),
                (f"{s.first.label} ens. (M={s.first.members})", ensemble, _temperature_scaled),
            ):
                reference.versus(name, s.runs, plain, panel, calibrated=True)
                reference.versus(f"{name} + TS", scaled, with_ts, panel, calibrated=True)
    panel.rows += _overconfidence_rows(reference, panel)
    return panel


# ----------------------------------------------------------------------------- the page's order

SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        key="fig-1a",
        title="Figure 1a: confidence on wrong answers",
        look_for="Few-shot is unsure but often wrong; a single fine-tuned LoRA is confidently "
        "wrong (mass near 1); the regularised ensemble should move mass back towards low "
        "confidence.",
        panel=_fig_1a,
        draw=figures.confidence_figure,
        image="fig-1a.png",
        caption="Histogram densities (20 shared bins on [0, 1]) of max p on wrongly answered "
        "eval questions. Few-shot pools all draws; LoRA (M=1) is member 0 of the "
        "unregularised run; the regularised ensemble uses the strength with the lowest "
        "ensemble NLL.",
    ),
    SectionSpec(
        key="reliability",
        title="Reliability diagrams (single member vs ensemble)",
        look_for="Bars on the diagonal are calibrated; bars below it mean over-confidence. The "
        "ensemble's bars should sit closer to the diagonal than member 0's.",
        panel=_reliability,
        draw=_draw_reliability,
        image="fig-reliability-{task}.png",
        caption=f"{{task}}: accuracy per confidence bin ({RELIABILITY_BINS} bins) of member 0 "
        "and of the ensemble of {run} (first seed). ECE in the titles uses the same "
        f"{RELIABILITY_BINS} bins.",
    ),
    SectionSpec(
        key="fig-2",
        title="Figure 2: single member → ensemble under each regulariser",
        look_for="Arrows should point right and down: ensembling raises accuracy and lowers "
        "ECE. Strong KL or very early stopping can shrink the arrows (members stay alike).",
        panel=_fig_2,
        draw=figures.arrows_figure,
        image="fig-2.png",
        caption="Tail: mean of the single members; head: the ensemble (final epoch of each "
        "run, averaged over seeds). Early-stop arrows are the unregularised run's eval rows "
        f"at epochs {', '.join(map(str, EARLY_STOP_EPOCHS))} (constant learning rate, so "
        "stopping there gives the same members).",
    ),
    SectionSpec(
        key="fig-3",
        title="Figure 3: metrics over training, unregularised vs weight decay on B",
        look_for="Accuracy rises for both; without regularisation NLL (and ECE) climb after a "
        "few epochs, weight decay on B keeps them down. The gap between dashed (single) and "
        "solid (ensemble) lines is what ensembling buys.",
        panel=_fig_3,
        draw=figures.training_curves_figure,
        image="fig-3.png",
        caption="Eval metrics per evaluated epoch, averaged over seeds. When several B-decay "
        "strengths were run, the one with the lowest final ensemble NLL is shown.",
    ),
    SectionSpec(
        key="table-1",
        title="Table 1: LoRA ensemble vs last-layer ensemble",
        look_for="Last-layer ensembles only tune the answer letters' output rows and underfit: "
        "expect clearly lower accuracy than the LoRA ensemble.",
        panel=_table_1,
        csv="table1.csv",
        columns=("task", "method", "members", "seeds")
        + tuple(f"{which}_{m}" for which in ("ensemble", "single") for m in METRICS),
    ),
    SectionSpec(
        key="fig-4",
        title="Figure 4: MC dropout vs LoRA ensemble with dropout",
        look_for="With the same number of members, MC dropout's solid line should sit barely "
        "above its dashed single line, while the LoRA ensemble with dropout gains clearly.",
        panel=_fig_4,
        draw=figures.dropout_figure,
        image="fig-4.png",
        caption="MC dropout averages M stochastic passes of one adapter (dashed: mean of the "
        "single passes); LoRA ens. + dropout trains M adapters with dropout.",
    ),
    SectionSpec(
        key="fig-5",
        title="Figure 5: out-of-distribution",
        look_for="Ensembles (solid) should have lower OOD NLL and ECE than single members "
        "(dashed). AUROC near or below 0.5 means −max p cannot tell the OOD questions apart.",
        panel=_fig_5,
        draw=figures.ood_figure,
        image="fig-5.png",
        caption="Rows: trained on the task left of the arrow, tested on the one right of it. "
        "One line pair per regulariser family: the strength with the lowest "
        "in-distribution ensemble NLL. AUROC treats OOD as the positive class with score "
        "−max p (single: mean of the members' AUROCs).",
    ),
    SectionSpec(
        key="fig-6",
        title="Figure 6: ensemble size",
        look_for="At every epoch all metrics improve with M (larger M: higher accuracy, lower "
        "NLL and ECE), with diminishing returns; the gaps widen as single members overfit.",
        panel=_fig_6,
        draw=figures.ensemble_size_figure,
        image="fig-6.png",
        caption=f"For each M (1, the paper's 3, 5, 10, 15 where the pool allows, and the whole "
        f"pool), {SIZE_DRAWS} random size-M subsets of the task's largest trained pool, the "
        f"same subsets at every evaluated epoch, from the unrounded {EVAL_LOG_PROBS_FILE}; "
        "band: ± 1 std over the subsets. A task evaluated at one epoch only is drawn against "
        f"M; a run without that file gives its final epoch from the rounded {PREDICTIONS_FILE} "
        "(named in its panel title). Numbers in size.csv.",
        csv="size.csv",
        columns=("task", "run", "source", "epoch", "pool_size", "size", "draws")
        + tuple(f"{s}_{m}" for s in ("mean", "std") for m in METRICS),
    ),
    SectionSpec(
        key="fig-7",
        title="Figure 7: sources of randomness",
        look_for="Each source alone should already lift the ensemble (bars) above the single "
        "members (diamonds); with neither, members are identical and the gap vanishes.",
        panel=_fig_7,
        draw=figures.randomness_figure,
        image="fig-7.png",
        caption="Bars: final ensemble metric (error bar: std over seeds); diamonds: mean of "
        "the single members. The y axes are zoomed and do not start at 0.",
    ),
    SectionSpec(
        key="fig-8",
        title="Figure 8: very large weight decay on A only, B only, or both",
        look_for="Decay on A and B together should underfit (clearly lower accuracy); on A "
        "only it should not stop NLL from climbing (overconfidence); on B only both accuracy "
        "and NLL should be good.",
        panel=_fig_8,
        draw=figures.decay_target_figure,
        image="fig-8.png",
        caption="App. B: LoRA ensembles (solid) and their single-member mean (dashed) with the "
        "same very large weight decay λ (in each row's title) applied to A only "
        "(optim.decay_target=A), B only (B) or both (all); eval metrics per evaluated epoch, "
        "averaged over seeds. Where several λ were run, the one run with the most targets. "
        "Numbers in decay_target.csv.",
        csv="decay_target.csv",
        columns=("task", "decay_on", "weight_decay", "seeds", "epoch")
        + tuple(f"{which}_{m}" for which in ("ensemble", "single") for m in DECAY_METRICS),
    ),
    SectionSpec(
        key="risk-coverage",
        title="Decisions: risk–coverage, temperature scaling and conformal answer sets",
        look_for="Curves lower and flatter are better: answering only the most confident "
        "questions should cut the error rate fast. TS leaves accuracy alone but should lower "
        "NLL and ECE; conformal sets should cover about 90% of the eval questions, the smaller "
        "the better.",
        panel=_decisions,
        draw=figures.risk_coverage_figure,
        image="fig-risk-coverage.png",
        caption="Risk (error rate of the answered) against coverage when answering by max p, "
        "from the eval log-probs of the adapters kept; single: member 0 (the table averages "
        "all members). TS: temperatures fitted on the run's held-out training questions "
        f"({CALIBRATION_FILE}); conformal sets: split conformal (LAC score) at "
        f"{DECISION_COVERAGE:.0%} target coverage, calibrated on the same held-out questions. "
        "Numbers in decisions.csv.",
        csv="decisions.csv",
        columns=("task", "run", "epoch", "model", *DECISION_COLUMNS),
    ),
    SectionSpec(
        key="ood-decisions",
        title="OOD under shift: single vs ensemble vs temperature scaling (BLoB's protocol)",
        look_for="Under near and far shift the ensemble should keep lower NLL and ECE than its "
        "members; temperatures fitted in-distribution may help less out of it. AUROC: how "
        "well −max p tells the OOD questions from the run's own eval questions.",
        panel=_ood_decisions,
        csv="ood_decisions.csv",
        columns=("task", "ood_set", "run", "model", "accuracy", "nll", "ece", "auroc"),
    ),
    SectionSpec(
        key="differences",
        title="Differences with 95% intervals: what the runs show",
        look_for="A difference (A − B) is shown only when its 95% interval excludes 0, "
        "whatever its sign; otherwise it is not shown. Intervals: paired bootstrap over the "
        f"eval questions ({DEFAULT_RESAMPLES} resamples, percentile), each resample drawing one "
        "set of questions for every seed and averaging the per-seed differences; the seed "
        "columns give the spread of the per-seed differences (sd with ddof 1). Final epoch: the "
        f"kept epoch's {EVAL_LOG_PROBS_FILE}, else {PREDICTIONS_FILE}. Compared with the "
        "reference ensemble: each regulariser family at its strength with the lowest ensemble "
        "NLL, MC dropout, last-layer ensembles, few-shot (mean over draws), the reference "
        "stopped after each of its first evaluated epochs (early stopping, up to 3) and the "
        "reference with temperature scaling, only on seeds the reference has and on the same "
        "questions. "
        "Every compared ensemble also gets its own ensemble − mean single member rows. "
        f"Ensemble size (Fig. 6 with intervals): each size M of the reference's pool (the mean "
        f"over the same {SIZE_DRAWS} random size-M subsets as Fig. 6, the same subsets in every "
        "seed) against the mean single member and against the next smaller size. "
        "Over-confidence: the mean single member at its last evaluated epoch minus its first. "
        "Members' diversity, for every compared ensemble against the reference's members: "
        "mutual_information is the mean over questions of H[ensemble] − mean H[member] (nats), "
        "disagreement the mean share of members whose answer is not the ensemble's. "
        "wrong_confidence is the mean confidence on wrongly answered questions (Fig. 1a). "
        "Numbers in differences.csv.",
        panel=_differences,
        csv="differences.csv",
        columns=DIFFERENCE_COLUMNS,
    ),
)
