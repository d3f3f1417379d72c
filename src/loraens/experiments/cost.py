"""The report's cost section (issue 29): what each method costs beside what it buys.

Per task and setting (mean over seeds, as recorded in each run's summary.json), for its single
members and its ensemble, each with and without its fitted temperatures: accuracy, NLL and
ECE, the training time of the members, a posterior's fitting time on top, the scoring time per
question and the peak memory; and a figure of NLL against the scoring time per question.
A single member's scoring time is the ensemble's divided by M: in the stacked pass every
member is a group of rows, so a member's share of the pass is its share of the rows
(Laplace's Jacobians and TFB's draws too).
Runs written before these were recorded show no scoring time or memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from loraens.experiments.figures import _finish
from loraens.experiments.runs import RunSet, Setting
from loraens.experiments.sections import Panel, SectionSpec

__all__ = ["COST_COLUMNS", "COST_SECTIONS"]

TS_SUFFIX = " + TS"
COST_COLUMNS = (
    "task", "model", "method", "members", "seeds", "accuracy", "nll", "ece", "train_seconds",
    "fit_seconds", "eval_seconds_per_question", "peak_memory_gb", "device", "precision",
)  # fmt: skip


def _mean(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else math.nan


def _per_question(setting: Setting) -> float:
    return _mean(
        [
            r.summary.eval_seconds / r.summary.eval_questions
            if r.summary.eval_seconds is not None and r.summary.eval_questions
            else None
            for r in setting.runs
        ]
    )


def _rows(task: str, setting: Setting) -> list[dict]:
    first = setting.first
    members = first.members
    common = {
        "task": task,
        "method": first.method,
        "seeds": " ".join(map(str, setting.seeds)),
        "train_seconds": _mean([r.summary.train_seconds for r in setting.runs]),
        "fit_seconds": _mean([r.summary.fit_seconds for r in setting.runs]),
        "peak_memory_gb": _mean([r.summary.peak_memory_gb for r in setting.runs]),
        "device": first.summary.device,
        "precision": first.summary.precision,
    }
    per_question = _per_question(setting)
    rows = []
    # "+ TS": the same models with their fitted temperatures, at the same cost (a 1-D fit).
    for which, size, scaled in (
        ("single", 1, ""),
        ("ensemble", members, ""),
        ("single + TS", 1, TS_SUFFIX),
        ("ensemble + TS", members, TS_SUFFIX),
    ):
        table = setting.table(which)
        if not table:
            continue
        ensemble = which.startswith("ensemble")
        name = f"{first.label} (M={size})" if ensemble else f"{first.label}, one member"
        rows.append(
            {
                **common,
                "model": name + scaled,
                "members": size,
                "accuracy": table.get("accuracy", math.nan),
                "nll": table.get("nll", math.nan),
                "ece": table.get("ece", math.nan),
                "eval_seconds_per_question": per_question * size / members,
            }
        )
    return rows


def _cost(rs: RunSet, task: str) -> Panel:
    panel = Panel()
    for setting in rs.settings(task):
        panel.rows += _rows(task, setting)
        panel.runs += list(setting.runs)
    drawable = [r for r in panel.rows if not math.isnan(r["eval_seconds_per_question"])]
    panel.data = drawable
    if panel.rows and not drawable:
        panel.missing.append("runs that recorded their scoring time (summary.json eval_seconds)")
    return panel


def cost_figure(panels: Mapping[str, Sequence[Mapping]], footer: str) -> Figure:
    """NLL against the scoring time per question, one point per model, one panel per task."""
    fig = Figure(figsize=(5.0 * len(panels), 4.0))
    for i, (task, rows) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        colors: dict[str, str] = {}
        for row in rows:
            marker = "o" if row["members"] > 1 else "s"
            model = str(row["model"]).removesuffix(TS_SUFFIX)
            color = colors.setdefault(model, f"C{len(colors) % 10}")
            scaled = str(row["model"]).endswith(TS_SUFFIX)  # hollow: with temperatures
            face = "none" if scaled else color
            x, y = row["eval_seconds_per_question"], row["nll"]
            ax.scatter(x, y, marker=marker, edgecolors=color, facecolors=face)
            if not scaled:  # its hollow twin shares its colour; labels would pile up at TS's NLL
                ax.annotate(row["model"], (x, y), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("scoring time per question (s, log)")
        ax.set_ylabel("NLL")
        ax.set_title(task)
    return _finish(fig, "Calibration against inference cost", footer)


COST_SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        key="cost",
        title="Cost: training, fitting, scoring time per question and memory beside NLL",
        look_for="Lower and further left is better: a posterior on one adapter should be "
        "compared with the ensemble at the same scoring cost. Times are comparable only "
        "between runs on the same device and precision (the table's last columns).",
        panel=_cost,
        draw=cost_figure,
        image="fig-cost.png",
        caption="Squares: a single member (its share of the stacked pass, 1/M of the "
        "ensemble's time); circles: ensembles and mixtures; hollow, in the same colour: the "
        "same model with its fitted temperatures (+ TS). Means over seeds.",
        csv="cost.csv",
        columns=COST_COLUMNS,
    ),
)
