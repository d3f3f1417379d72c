"""The report's sections: one builder per paper figure or table, from runs to a :class:`Section`.

Each builder in :data:`SECTIONS` picks the runs a figure needs from a :class:`RunSet`, draws it
with :mod:`loraens.experiments.figures`, saves it (and any CSV of its numbers) through an
:class:`Output`, and says on the page what is missing when it cannot be drawn.

How runs are chosen (see :mod:`loraens.experiments.runs` for settings and the reference):

- Figures built from metrics average a setting's seeds; figures built from predictions
  (reliability, Fig. 1a, Fig. 6) use its first seed.
- Where a figure shows one strength of a regulariser (Fig. 1a, 3, 5) it is the one with the
  lowest final in-distribution ensemble NLL; Fig. 2 shows every strength.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from matplotlib.figure import Figure

from loraens.evaluation.metrics import ensemble_log_probs, reliability_bins, summarize
from loraens.evaluation.tables import METRICS
from loraens.experiments import figures
from loraens.experiments.figures import Arrow, Bar, ConfidenceSet, Series, family_color
from loraens.experiments.runs import (
    RANDOMNESS_ORDER,
    FewShotRun,
    Run,
    RunSet,
    Setting,
    distinct_values,
    is_plain_lora,
    provenance,
)
from loraens.experiments.size_ablation import (
    PredictionPool,
    ensemble_size_ablation,
    read_prediction_pool,
)

__all__ = ["SECTIONS", "Output", "Section"]

log = logging.getLogger(__name__)

EARLY_STOP_EPOCHS = (1, 2, 3)  # §4: early stopping after 1, 2 or 3 epochs
SIZE_DRAWS = 5  # §5.3: 5 random subsets per ensemble size
RELIABILITY_BINS = 10


@dataclass
class Section:
    """One part of the page: a paper figure or table, or why it could not be drawn."""

    key: str
    title: str
    look_for: str
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list[tuple[list[str], list[dict]]] = field(default_factory=list)  # (columns, rows)
    notes: list[str] = field(default_factory=list)  # what is missing

    def add_figure(self, out: Output, fig: Figure, name: str, caption: str) -> None:
        self.images.append((out.save_figure(fig, name), caption))


class Output(Protocol):
    """The report folder, as the builders write into it."""

    def save_figure(self, fig: Figure, name: str) -> str:
        """Save ``fig`` as ``name``; returns ``name``."""
        ...

    def write_csv(self, name: str, columns: Sequence[str], rows: Iterable[dict]) -> None: ...


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


def _reliability_sections(rs: RunSet, out: Output) -> Section:
    section = Section(
        "reliability",
        "Reliability diagrams (single member vs ensemble)",
        "Bars on the diagonal are calibrated; bars below it mean over-confidence. The "
        "ensemble's bars should sit closer to the diagonal than member 0's.",
    )
    for task in rs.tasks:
        ref = rs.reference(task)
        pool = _pool(ref.first if ref else None)
        if pool is None:
            section.notes.append(
                f"{task}: needs an unregularised LoRA run (method lora, no dropout) with "
                "predictions.jsonl."
            )
            continue
        lp, y = pool.member_log_probs, pool.labels
        ens = ensemble_log_probs(lp)
        panels = [
            ("single member (member 0)", lp[0]),
            (f"ensemble (M={lp.shape[0]})", ens),
        ]
        footer = provenance([ref.first])
        fig = figures.reliability_figure(
            task,
            [
                (name, reliability_bins(x, y, RELIABILITY_BINS), summarize(x, y))
                for name, x in panels
            ],
            footer,
        )
        section.add_figure(
            out,
            fig,
            f"fig-reliability-{task}.png",
            f"{task}: accuracy per confidence bin ({RELIABILITY_BINS} bins) of member 0 and "
            f"of the ensemble of {rs.relative(ref.first.path)} (first seed). ECE in the "
            f"titles uses the same {RELIABILITY_BINS} bins. {footer}",
        )
    return section


# ----------------------------------------------------------------------------- Fig. 1a


def _confidence_set(
    label: str, color: str, log_probs: np.ndarray, labels: np.ndarray, dashed: bool = False
) -> ConfidenceSet:
    """The confidences on wrong answers of one model, with its accuracy and ECE."""
    stats = summarize(log_probs, labels)
    return ConfidenceSet(
        label,
        color,
        _wrong_confidence(log_probs, labels),
        stats["accuracy"],
        stats["ece"],
        dashed=dashed,
    )


def _wrong_confidence(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    wrong = log_probs.argmax(axis=1) != labels
    return np.exp(log_probs.max(axis=1))[wrong]


def _fig_1a(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-1a",
        "Figure 1a: confidence on wrong answers",
        "Few-shot is unsure but often wrong; a single fine-tuned LoRA is confidently wrong "
        "(mass near 1); the regularised ensemble should move mass back towards low confidence.",
    )
    panels: dict[str, list[ConfidenceSet]] = {}
    used: list[Run] = []
    used_few: list[FewShotRun] = []
    for task in rs.tasks:
        sets, missing = [], []
        few = rs.few_shot_for(task)
        pool = _pool(few)
        if pool is not None:
            lp = pool.member_log_probs
            conf = np.concatenate([_wrong_confidence(d, pool.labels) for d in lp])
            # Headline numbers: the mean over draws, as the paper reports few-shot.
            per_draw = [summarize(d, pool.labels) for d in lp]
            acc = float(np.mean([d["accuracy"] for d in per_draw]))
            cal = float(np.mean([d["ece"] for d in per_draw]))
            sets.append(ConfidenceSet(f"few-shot ({lp.shape[0]} draws)", "#9467bd", conf, acc, cal))
            used_few.append(few)
        else:
            missing.append("a few-shot run with predictions.jsonl")
        ref = rs.reference(task)
        pool = _pool(ref.first if ref else None)
        if pool is not None:
            sets.append(
                _confidence_set("LoRA (M=1)", "#1f77b4", pool.member_log_probs[0], pool.labels)
            )
            used.append(ref.first)
        else:
            missing.append("an unregularised LoRA run with predictions")
        # The paper's regularised ensemble: weight decay on B if run, else KL.
        reg = _best_strength(rs, task, ref, "B-decay") or _best_strength(rs, task, ref, "KL")
        pool = _pool(reg.first if reg else None)
        if pool is not None:
            sets.append(
                _confidence_set(
                    f"reg. LoRA ens. (M={pool.member_log_probs.shape[0]}, {reg.first.regulariser})",
                    "#ff7f0e",
                    ensemble_log_probs(pool.member_log_probs),
                    pool.labels,
                    dashed=True,
                )
            )
            used.append(reg.first)
        else:
            missing.append("a LoRA run with weight decay on B or a KL penalty")
        if len(sets) >= 2:
            panels[task] = sets
        if missing:
            section.notes.append(
                f"{task}: {'drawn without' if len(sets) >= 2 else 'needs'} "
                + " and ".join(missing)
                + "."
            )
    if panels:
        footer = provenance(used, used_few)
        fig = figures.confidence_figure(panels, footer)
        section.add_figure(
            out,
            fig,
            "fig-1a.png",
            "Histogram densities (20 shared bins on [0, 1]) of max p on wrongly answered "
            "eval questions. Few-shot pools all draws; LoRA (M=1) is member 0 of the "
            "unregularised run; the regularised ensemble uses the strength with the lowest "
            f"ensemble NLL. {footer}",
        )
    return section


# ----------------------------------------------------------------------------- Fig. 2


def _fig_2(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-2",
        "Figure 2: single member → ensemble under each regulariser",
        "Arrows should point right and down: ensembling raises accuracy and lowers ECE. Strong "
        "KL or very early stopping can shrink the arrows (members stay alike).",
    )
    panels: dict[str, list[Arrow]] = {}
    used: list[Run] = []
    members = set()
    for task in rs.tasks:
        ref = rs.reference(task)
        arrows = []
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
                    )
                )
                used += s.runs
                members.add(s.first.members)
        if ref is not None:
            arrows += _early_stop_arrows(ref)
        if arrows:
            panels[task] = arrows
        else:
            section.notes.append(f"{task}: needs at least one finished LoRA ensemble run.")
        if ref is not None and len({a.family for a in arrows}) < 2:
            section.notes.append(
                f"{task}: only the unregularised run; add KL (optim.kl_beta) or B-decay "
                "(optim.decay_target=B) runs to compare regularisers."
            )
    if panels:
        footer = provenance(used)
        fig = figures.arrows_figure(
            panels, footer, "ensemble (M=" + "/".join(map(str, sorted(members))) + ")"
        )
        section.add_figure(
            out,
            fig,
            "fig-2.png",
            "Tail: mean of the single members; head: the ensemble (final epoch of each run, "
            "averaged over seeds). Early-stop arrows are the unregularised run's eval rows "
            f"at epochs {', '.join(map(str, EARLY_STOP_EPOCHS))} (constant learning rate, so "
            f"stopping there gives the same members). {footer}",
        )
    return section


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


def _fig_3(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-3",
        "Figure 3: metrics over training, unregularised vs weight decay on B",
        "Accuracy rises for both; without regularisation NLL (and ECE) climb after a few "
        "epochs, weight decay on B keeps them down. The gap between dashed (single) and solid "
        "(ensemble) lines is what ensembling buys.",
    )
    rows: dict[str, list[Series]] = {}
    used: list[Run] = []
    for task in rs.tasks:
        ref = rs.reference(task)
        lines = _series(ref, "eval", METRICS[:3], family_color("none")) if ref else []
        if not lines:
            section.notes.append(
                f"{task}: needs an unregularised LoRA run with per-epoch eval rows."
            )
            continue
        used += ref.runs
        title = task
        best = _best_strength(rs, task, ref, "B-decay")
        if best is not None:
            # Legend by family (one colour), the strength chosen per task in the panel title.
            lines += _series(best, "eval", METRICS[:3], family_color("B-decay"), "B-decay")
            used += best.runs
            title = f"{task} ({best.first.regulariser})"
        else:
            section.notes.append(f"{task}: drawn without a B-decay run (optim.decay_target=B).")
        rows[title] = lines
    if rows:
        footer = provenance(used)
        fig = figures.training_curves_figure(rows, footer)
        section.add_figure(
            out,
            fig,
            "fig-3.png",
            "Eval metrics per evaluated epoch, averaged over seeds. When several B-decay "
            "strengths were run, the one with the lowest final ensemble NLL is shown. " + footer,
        )
    return section


# ----------------------------------------------------------------------------- Table 1


def _table_1(rs: RunSet, out: Output) -> Section:
    section = Section(
        "table-1",
        "Table 1: LoRA ensemble vs last-layer ensemble",
        "Last-layer ensembles only tune the answer letters' output rows and underfit: "
        "expect clearly lower accuracy than the LoRA ensemble.",
    )
    rows = []
    for task in rs.tasks:
        ref = rs.reference(task)
        last = rs.variants(task, lambda r: r.method == "last_layer", ref)
        if ref is None or not last:
            missing = _missing(("a last_layer run", last), ("a LoRA run", ref is not None))
            section.notes.append(
                f"{task}: Table 1 needs a last_layer run and a LoRA run on the same task "
                f"(missing: {', '.join(missing)})."
            )
            continue
        for name, s in (("LoRA ens.", ref), ("last-layer ens.", last[0])):
            rows.append(_table_row(task, name, s))
    columns = ["task", "method", "members", "seeds"] + [
        f"{which}_{m}" for which in ("ensemble", "single") for m in METRICS
    ]
    out.write_csv("table1.csv", columns, rows)
    if rows:
        section.tables.append((columns, rows))
    return section


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


def _fig_4(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-4",
        "Figure 4: MC dropout vs LoRA ensemble with dropout",
        "With the same number of members, MC dropout's solid line should sit barely above its "
        "dashed single line, while the LoRA ensemble with dropout gains clearly.",
    )
    rows: dict[str, list[Series]] = {}
    used: list[Run] = []
    colors = ("#8c564b", "#17becf", "#e377c2", "#bcbd22")
    for task in rs.tasks:
        ref = rs.reference(task)
        mc = rs.variants(task, lambda r: r.method == "mc_dropout", ref)
        ens = rs.variants(task, lambda r: r.method == "lora" and r.dropout > 0, ref)
        lines = []
        for i, s in enumerate(mc + ens):
            lines += _series(s, "eval", METRICS[:3], colors[i % len(colors)])
            used += s.runs
        if not mc or not ens:
            what = _missing(("an mc_dropout run", mc), ("a LoRA run with lora.dropout>0", ens))
            section.notes.append(
                f"{task}: Fig. 4 {'drawn without' if lines else 'needs'} "
                + " and ".join(what)
                + "."
            )
        if lines:
            rows[task] = lines
    if rows:
        footer = provenance(used)
        fig = figures.dropout_figure(rows, footer)
        section.add_figure(
            out,
            fig,
            "fig-4.png",
            "MC dropout averages M stochastic passes of one adapter (dashed: mean of the "
            f"single passes); LoRA ens. + dropout trains M adapters with dropout. {footer}",
        )
    return section


# ----------------------------------------------------------------------------- Fig. 5


def _fig_5(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-5",
        "Figure 5: out-of-distribution",
        "Ensembles (solid) should have lower OOD NLL and ECE than single members (dashed). "
        "AUROC near or below 0.5 means −max p cannot tell the OOD questions apart.",
    )
    rows: dict[str, list[Series]] = {}
    used: list[Run] = []
    for task in rs.tasks:
        ref = rs.reference(task)
        settings = _one_per_family(
            [
                s
                for s in rs.variants(task, is_plain_lora, ref)
                if any(r.get("split") == "ood" for r in s.first.rows)
            ]
        )
        lines = []
        for s in settings:
            # Legend by family (one colour); each row's chosen strengths go in its title.
            color, family = family_color(s.first.family), s.first.family
            lines += _merge_series(
                _series(s, "ood", METRICS[:3], color, family),
                _series(s, "ood_detection", ("neg_max_prob",), color, family),
            )
            used += s.runs
        if lines:
            ood = distinct_values(s.first.ood_task for s in settings)
            strengths = [
                s.first.regulariser.split(" ", 1)[-1] for s in settings if s.first.family != "none"
            ]
            title = f"{task} → {ood}" + (f" ({', '.join(strengths)})" if strengths else "")
            rows[title] = lines
        elif any(r.task == task for r in rs.train):
            section.notes.append(
                f"{task}: needs LoRA runs trained with data.ood_task (per-epoch 'ood' rows)."
            )
    if rows:
        footer = provenance(used)
        fig = figures.ood_figure(rows, footer)
        section.add_figure(
            out,
            fig,
            "fig-5.png",
            "Rows: trained on the task left of the arrow, tested on the one right of it. "
            "One line pair per regulariser family: the strength with the lowest "
            "in-distribution ensemble NLL. "
            "AUROC treats OOD as the positive class with score −max p (single: mean of the "
            f"members' AUROCs). {footer}",
        )
    return section


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


def _fig_6(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-6",
        "Figure 6: ensemble size",
        "All metrics improve with M, with diminishing returns.",
    )
    rows: dict[str, list[dict]] = {}
    csv_rows: list[dict] = []
    used: list[Run] = []
    for task in rs.tasks:
        lora = [r for r in rs.train if r.task == task and r.method == "lora" and r.has_predictions]
        if not lora:
            section.notes.append(f"{task}: needs a LoRA run with predictions.jsonl.")
            continue
        # The biggest pool; among equals prefer the unregularised plain setting.
        run = max(lora, key=lambda r: (r.members, is_plain_lora(r) and r.family == "none", -r.seed))
        pool = _pool(run) if run.members >= 2 else None
        if pool is None or pool.member_log_probs.shape[0] < 2:
            section.notes.append(f"{task}: needs a LoRA run with at least 2 members.")
            continue
        size = pool.member_log_probs.shape[0]
        ablation = ensemble_size_ablation(
            pool.member_log_probs, pool.labels, tuple(range(1, size + 1)), SIZE_DRAWS
        )
        rows[task] = ablation
        used.append(run)
        for row in ablation:
            csv_rows.append(
                {
                    "task": task,
                    "run": str(run.path),
                    "pool_size": row["pool_size"],
                    "size": row["size"],
                    "draws": row["draws"],
                    **{f"mean_{m}": row["mean"][m] for m in METRICS},
                    **{f"std_{m}": row["std"][m] for m in METRICS},
                }
            )
    columns = ["task", "run", "pool_size", "size", "draws"] + [
        f"{s}_{m}" for s in ("mean", "std") for m in METRICS
    ]
    out.write_csv("size.csv", columns, csv_rows)
    if rows:
        footer = provenance(used)
        fig = figures.ensemble_size_figure(rows, footer)
        section.add_figure(
            out,
            fig,
            "fig-6.png",
            f"For each M, {SIZE_DRAWS} random size-M subsets of the task's largest trained "
            "pool (its final epoch, from predictions.jsonl); band: ± 1 std over the "
            f"subsets. Numbers in size.csv. {footer}",
        )
    return section


# ----------------------------------------------------------------------------- Fig. 7


def _fig_7(rs: RunSet, out: Output) -> Section:
    section = Section(
        "fig-7",
        "Figure 7: sources of randomness",
        "Each source alone should already lift the ensemble (bars) above the single members "
        "(diamonds); with neither, members are identical and the gap vanishes.",
    )
    panels: dict[str, list[Bar]] = {}
    used: list[Run] = []
    for task in rs.tasks:
        ref = rs.reference(task)
        settings = rs.variants(task, lambda r: r.method == "lora" and r.dropout == 0, ref)
        by_reg: dict[str, list[Setting]] = defaultdict(list)
        for s in settings:
            by_reg[s.first.regulariser].append(s)
        bars = []
        for reg, group in by_reg.items():
            if len({s.first.randomness for s in group}) < 2:
                continue
            group.sort(key=lambda s: RANDOMNESS_ORDER.index(s.first.randomness))
            for s in group:
                mean, std = s.table("ensemble"), s.table_std("ensemble")
                bars.append(
                    Bar(
                        s.first.randomness,
                        reg,
                        family_color(s.first.family),
                        {m: (mean[m], std[m]) for m in METRICS[:3] if m in mean},
                        {m: v for m, v in s.table("single").items() if m in METRICS[:3]},
                    )
                )
                used += s.runs
        if bars:
            panels[task] = bars
        elif any(r.task == task and r.method == "lora" for r in rs.train):
            section.notes.append(
                f"{task}: needs LoRA runs differing only in randomness (ensemble.vary_init / "
                "ensemble.vary_data_order), e.g. init+data and init only or data only."
            )
    if panels:
        footer = provenance(used)
        fig = figures.randomness_figure(panels, footer)
        section.add_figure(
            out,
            fig,
            "fig-7.png",
            "Bars: final ensemble metric (error bar: std over seeds); diamonds: mean of the "
            f"single members. The y axes are zoomed and do not start at 0. {footer}",
        )
    return section


# The page's order. A builder's name (less its underscores) keys the section if it fails.
SECTIONS: tuple[Callable[[RunSet, Output], Section], ...] = (
    _fig_1a,
    _reliability_sections,
    _fig_2,
    _fig_3,
    _table_1,
    _fig_4,
    _fig_5,
    _fig_6,
    _fig_7,
)
